#!/usr/bin/env python3
"""Held-out scoring of the soup keeper against a plain evaluation loop of the same model and images.

    python bench/soup_eval.py                 # a synthetic ViT-B-32 run (random init, 224 px, digits held-out)
    python bench/soup_eval.py RUN_DIR         # any finished run folder

Baseline: a bare batched loop under ``torch.inference_mode`` over the decoded
held-out tensor, the same batch size, in the same process. Target:
keeper images/s / plain-loop images/s >= 0.9. Writes
``bench/results/soup_eval.json``. Logic: ``soup_ray.bench.soup_eval``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", type=Path, default=None, help="a run folder (default: synthetic ViT-B-32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of each way (median reported)")
    ap.add_argument("--members", type=int, default=2, help="fake trials of the synthetic run (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "soup_eval.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from soup_ray.bench.host import write_bench_json
    from soup_ray.bench.soup_eval import measure
    from soup_ray.bench.synthetic_run import build_vit_run

    t0 = time.perf_counter()
    tmp = None
    run_dir = args.run_dir
    try:
        if run_dir is None:
            tmp = Path(tempfile.mkdtemp(prefix="soup-ray-eval-"))
            run_dir = build_vit_run(tmp / "run", members=args.members)
        figures = measure(run_dir, repeats=args.repeats, threads=args.threads)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "what": "held-out scoring of one model's weights by the soup keeper (Kitchen.evaluate_weights) against a "
        "plain batched inference_mode loop over the same decoded images, same batch size, same process",
        "run": "synthetic ViT-B-32 run (open_clip ViT-B-32, pretrained=None, 224 px, digits held-out split)"
        if args.run_dir is None
        else str(args.run_dir),
        "figures": figures,
        "target": "kitchen_over_plain_speed >= 0.9",
        "meets_target": figures["kitchen_over_plain_speed"] >= 0.9,
    }
    report = write_bench_json(
        args.out,
        report,
        script="bench/soup_eval.py",
        argv=argv,
        started=t0,
        note="shared machine: other work may have run alongside; medians of alternated passes",
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
