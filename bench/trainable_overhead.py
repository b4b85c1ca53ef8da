#!/usr/bin/env python3
"""Steady-state images/s of soup-ray's trial code (``train.fine_tune``) against a bare PyTorch loop, on CPU.

    python bench/trainable_overhead.py                    # ViT-B-32 (random init), 224 px, batch 16, 2 threads
    python bench/trainable_overhead.py --batch-size 8

Same model, batch, data (a small digits image folder through the project's
loader) and augmentation (RandAugment 2/9 and mixup) on both sides; the steady
state is the second epoch (training, per-epoch held-out scoring and report for
the trial). Target: overhead <= 5 %. Also: RandAugment's share of a step.
Writes ``bench/results/trainable_overhead.json``. Logic: ``soup_ray.bench.trainable_overhead``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-per-class", type=int, default=7, help="train images per digit (held-out: 15 %% of them)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "trainable_overhead.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from soup_ray.bench.host import machine_info
    from soup_ray.bench.trainable_overhead import measure

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="soup-ray-trainable-"))
    try:
        figures = measure(tmp, batch_size=args.batch_size, train_per_class=args.train_per_class,
                          threads=args.threads, model_name=args.model)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "what": "steady-state training images/s of soup_ray.train.fine_tune (report callback, per-epoch held-out "
                "scoring) against a bare PyTorch loop of the same model, batch, data and augmentation",
        "steady_state": "second epoch of each (first: warm-up; trial's last: checkpoint and final scoring)",
        "figures": figures,
        "target": "overhead <= 0.05",
        "meets_target": figures["overhead"] <= 0.05,
        "machine": machine_info(),
        "note": "shared machine: other work may have run alongside; one run of each",
        "command": "python bench/trainable_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
