#!/usr/bin/env python3
"""Averaging N ViT-B-32-sized safetensors checkpoints: streamed (tensor by tensor from memory maps) vs a plain read.

    python bench/averaging.py                       # N = 2, 8, 32 checkpoints of ~350 MB (about 11 GB of disk)
    python bench/averaging.py --ns 2 4 --tiny       # a quick check with small files

For every N, in a fresh process each: a plain sequential read of the N files
(the baseline: disk speed), the same read plus one soup-sized file written
(the least I/O a file-to-file average can do), the streamed average written to a safetensors file
(``soup_ray.checkpoint_average``, tensor by tensor), the same kept in memory,
``safe_open`` memory maps file by file, and the previous way (``load_file`` one
model at a time into ``soup.average_state_dicts``). The page cache is
equalised: every file is read once before the measurements of its case, and
the modes alternate. The random files are deleted at the end. Targets: the
streamed peak RSS flat in N (within 10 %), streamed seconds / read seconds <= 1.5.
Writes ``bench/results/averaging.json``. Logic: ``soup_ray.bench.averaging``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from soup_ray.bench.averaging import MODES, run_case, summarise, tiny_shapes, vit_shapes, write_checkpoints
from soup_ray.bench.host import write_bench_json

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 8, 32], help="checkpoint counts (default 2 8 32)")
    ap.add_argument("--repeats", type=int, default=2, help="measurements of each mode per N (median reported)")
    ap.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=list(MODES),
        help="what to measure (default: all; read is the baseline)",
    )
    ap.add_argument("--tiny", action="store_true", help="tiny checkpoints instead of ViT-B-32-sized ones")
    ap.add_argument("--dir", type=Path, default=None, help="where the temporary checkpoints go (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "averaging.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    shapes = tiny_shapes() if args.tiny else vit_shapes()
    tmp = Path(tempfile.mkdtemp(prefix="soup-ray-avg-", dir=args.dir))
    try:
        paths = write_checkpoints(tmp, max(args.ns), shapes)
        cases = [
            run_case(paths[:n], tmp / "soup.safetensors", repeats=args.repeats, modes=tuple(args.modes))
            for n in args.ns
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "what": "uniform average of N fp32 checkpoints with the state-dict shapes of soup-ray's ViT-B-32 classifier "
        "(open_clip ViT-B-32 image tower, pretrained=None, + 10-class head), random values",
        "baseline": "read: a plain sequential read of the same N files (64 KiB readinto), in the same run; "
        "read_write: the same read plus one file of the soup's size written (the baseline for a "
        "soup written to a file)",
        "modes": {
            "read_write": "read, then one soup-sized file written from a resident 64 KiB buffer",
            "stream": "soup_ray.checkpoint_average.average_checkpoint_files: every file memory-mapped, tensor "
            "by tensor each file's tensor added from the map into one reused fp32 accumulator and its "
            "pages dropped from the process (madvise DONTNEED), each mean written to the output "
            "safetensors file at once",
            "stream_into_model": "soup_ray.checkpoint_average.average_checkpoints(into=...): the same, each mean "
            "copied into a resident state dict allocated before the clock starts (what "
            "the soup keeper does with its model's weights), not written",
            "stream_in_memory": "soup_ray.checkpoint_average.average_checkpoints: the same, the soup copied into "
            "a new state dict, not written",
            "mmap": "safe_open memory maps, one file at a time, every tensor added into fp32 sums held whole, "
            "written with save_file",
            "loaded": "previous way: load_file one whole model at a time into soup.average_state_dicts, "
            "result written with save_file",
        },
        "page_cache": "equalised: every file of a case read once before its measurements, then the modes alternate "
        f"({args.repeats} runs each, median seconds and the best run's, max peak RSS); files fit in RAM, so all modes "
        "read from the page cache",
        "peak_rss": "ru_maxrss of a fresh interpreter per measurement (includes torch's import, see rss_before_mb)",
        "cases": cases,
        "summary": summarise(cases),
        "targets": {
            "stream_peak_rss_spread": "<= 0.10",
            "stream_over_read": "<= 1.5",
            "stream_over_read_write": "<= 1.5",
            "stream_into_model_over_read": "<= 1.5",
        },
    }
    report = write_bench_json(
        args.out,
        report,
        script="bench/averaging.py",
        argv=argv,
        started=t0,
        note="shared machine: other work may have run alongside",
    )
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
