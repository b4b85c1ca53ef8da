"""Serving a ViT-B-32 soup on the CPU: the soup against one model and an ensemble, and the in-process ceiling.

The stand-in CLIP of the local runs is so small that serving it measures the
HTTP path, not the model. This script builds a synthetic run folder whose model
has the real ViT-B-32 cost (``soup_ray.bench.synthetic_run.build_vit_run``:
random-init open_clip ``ViT-B-32``, 224 px, ``--members`` fake trials of the
same weights, so K, the ensemble the soup is compared with, is ``--members``).
Accuracy is meaningless here; only cost is measured. The test images are the
digits test split rendered at 224 px.

Then ``soup_ray.bench.serving_bench.run_bench`` measures it (one application at a time on
one local Ray). Each target may use the whole machine, as a user would deploy it: the soup
and the single model run as ``--model-replicas`` replicas (default min(K, CPU cores)), the
ensemble as its K member replicas; every model replica gets the same CPU share. The figures
are written to
``bench/results/serve_cpu_vitb32.json`` (+ ``.png``).

    python bench/serve_cpu.py                       # soup, single, ensemble of 5, ceiling
    python bench/serve_cpu.py --only soup           # soup + ceiling only (fastest)
    python bench/serve_cpu.py --replica-threads 2   # every replica may use 2 torch threads

ViT-B-32 on one CPU thread takes roughly 0.1-0.3 s per image, so the levels
are short and few by default; every level is bounded by --requests and
--seconds, the whole run by --time-budget.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from soup_ray.bench.loadgen import parse_concurrency
from soup_ray.bench.serving_bench import BenchSettings, format_table, run_bench, write_bench
from soup_ray.bench.synthetic_run import build_vit_run
from soup_ray.run_dir import RunDir

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serve_cpu_vitb32.json"


def _log(msg: str) -> None:
    print(f"[serve_cpu] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run-dir",
        type=Path,
        help="where to build the synthetic run (default: a temporary folder, "
        "removed afterwards); an existing built run is reused",
    )
    ap.add_argument(
        "--config-from",
        type=Path,
        help="a digits run folder whose config.json to adapt (default: tune_configs/local.yaml)",
    )
    ap.add_argument("--members", type=int, default=5, help="fake completed trials = the soup's size K (default: 5)")
    ap.add_argument(
        "--only",
        default="soup,single,ensemble_k,ensemble_all",
        help="targets (default: all; 'soup' for the soup and the ceiling only)",
    )
    ap.add_argument("--concurrency", default="1,4,16", help="concurrency levels (default: 1,4,16)")
    ap.add_argument("--requests", type=int, default=150, help="most requests per level (default: 150)")
    ap.add_argument("--seconds", type=float, default=15.0, help="longest time per level (default: 15)")
    ap.add_argument("--ensemble-cap", type=int, default=8, help="most members of the all-candidates ensemble")
    ap.add_argument("--port", type=int, default=8011, help="HTTP port (loopback only; default: 8011)")
    ap.add_argument("--num-cpus", type=float, help="CPUs per model replica (default: an equal share that fits)")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica (default: 0)")
    ap.add_argument("--max-batch-size", type=int, default=16, help="dynamic batching: most images per forward")
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.01, help="dynamic batching: longest wait")
    ap.add_argument("--replica-threads", type=int, help="OMP_NUM_THREADS for every Ray worker (default: Ray's)")
    ap.add_argument(
        "--model-replicas",
        type=int,
        help="replicas of the soup's (and the single model's) deployment (default: min(K, CPU cores), so that "
        "the soup may use the whole machine, as the ensemble's K member replicas do)",
    )
    ap.add_argument("--images", type=int, default=32, help="distinct test images cycled as requests")
    ap.add_argument("--ceiling-seconds", type=float, default=10.0, help="time bound of the in-process ceiling")
    ap.add_argument("--time-budget", type=float, default=900.0, help="bound on the whole bench in seconds")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output JSON (default: {DEFAULT_OUT})")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    args = ap.parse_args(argv)

    tmp = None
    run_dir = args.run_dir
    if run_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="soup-ray-vitb32-"))
        run_dir = tmp / "run"
    try:
        if not RunDir(run_dir).soup_info.is_file():
            build_vit_run(Path(run_dir), args.members, config_from=args.config_from, log=_log)
        else:
            _log(f"reusing the synthetic run in {run_dir}")
        settings = BenchSettings(
            concurrency=parse_concurrency(args.concurrency),
            requests=args.requests,
            seconds=args.seconds,
            ensemble_cap=args.ensemble_cap,
            port=args.port,
            only=[t for t in args.only.split(",") if t],
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_timeout_s,
            replica_threads=args.replica_threads,
            model_replicas=args.model_replicas or max(1, min(args.members, os.cpu_count() or 1)),
            images=args.images,
            warmup_requests=8,
            request_timeout_s=60.0,
            deploy_timeout_s=300.0,
            ceiling_seconds=args.ceiling_seconds,
            time_budget_s=args.time_budget,
        )
        figures = run_bench(run_dir, settings, log=_log)
        if tmp is not None:  # a temporary folder, deleted below: the path would mean nothing later
            figures["run_dir"] = "(temporary synthetic run)"
        figures["title"] = "ViT-B-32 (random init, 224 px) on CPU"
        figures["case"] = {
            "model": "ViT-B-32, random init (pretrained=None), 224 px, digits class names",
            "synthetic_run": True,
            "members": args.members,
            "command": "python bench/serve_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        paths = write_bench(figures, args.out)
        print(format_table(figures), flush=True)
        _log("wrote " + ", ".join(str(p) for p in paths.values()))
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
