#!/usr/bin/env python3
"""Soup quality of the local default over sweep seeds: runs `soup-ray run` per seed, or reads finished runs.

    python bench/soup_quality.py                          # seeds 0 1 2 of tune_configs/local.yaml
    python bench/soup_quality.py --seeds 0 --config tune_configs/local.yaml --set tune.num_samples=8
    python bench/soup_quality.py --runs runs/a runs/b     # summarise finished run folders
    python bench/soup_quality.py --seeds 0 1 2 3 4 --standin-seeds 0 1 --readme
                                    # 5 sweep seeds x 2 stand-in builds, and the README's table from them
    python bench/soup_quality.py --readme-only           # rewrite the README's table from the committed JSON

Writes bench/results/soup_quality.json (per run, mean over runs, the targets
and whether they hold) and prints the table. Each run is the quick-start main
job (`soup-ray run CONFIG --no-serve --seed S`), timed as a whole; runs are
sequential, since two at once would share the CPUs. A stand-in built with
another `model.standin_seed` (`--standin-seeds`) is the closest thing on one
machine to another machine's build; one not cached yet is built by the run
that first needs it, and its build time is recorded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from soup_ray.bench.soup_quality import format_table, readme_table, replace_readme_table, summarise

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"


def write_readme(summary: dict) -> None:
    README.write_text(replace_readme_table(README.read_text(), readme_table(summary)))
    print(f"wrote the table in {README}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tune_configs/local.yaml", help="sweep file (default: the local default)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="tune.seed values (default: 0 1 2)")
    ap.add_argument(
        "--standin-seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="model.standin_seed values: every sweep seed runs on each stand-in build (default: the config's)",
    )
    ap.add_argument("--readme", action="store_true", help="also rewrite the README's table from the result")
    ap.add_argument("--readme-only", action="store_true", help="only rewrite the README's table from the JSON at --out")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to soup-ray run")
    ap.add_argument("--runs", type=Path, nargs="+", help="summarise these finished run folders instead")
    ap.add_argument("--out-dir", type=Path, default=Path("runs"), help="where the new runs go (default: runs/)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "soup_quality.json", help="JSON to write")
    ap.add_argument(
        "--recipes-out",
        type=Path,
        default=HERE / "results" / "recipes_local.json",
        help="JSON of the per-recipe means (written when the runs computed recipes)",
    )
    args = ap.parse_args(argv)
    if args.readme_only:
        write_readme(json.loads(args.out.read_text()))
        return 0
    walls: dict[str, float] = {}
    runs = list(args.runs or [])
    if not runs:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        builds: list[int | None] = list(args.standin_seeds or [None])
        for standin, seed in ((b, s) for b in builds for s in args.seeds):
            tag = f"seed{seed}" if standin is None else f"standin{standin}-seed{seed}"
            run = args.out_dir / f"quality-{stamp}-{tag}"
            extra = [] if standin is None else ["--set", f"model.standin_seed={standin}"]
            cmd = (
                [
                    sys.executable,
                    "-m",
                    "soup_ray.cli",
                    "run",
                    args.config,
                    "--no-serve",
                    "--seed",
                    str(seed),
                    "--out",
                    str(run),
                ]
                + [a for s in args.set for a in ("--set", s)]
                + extra
            )
            print(f"[soup_quality] {' '.join(cmd[2:])}", flush=True)
            t0 = time.perf_counter()
            done = subprocess.run(cmd)
            walls[str(run)] = round(time.perf_counter() - t0, 1)
            if done.returncode != 0:
                print(f"[soup_quality] {tag} failed (exit {done.returncode})", file=sys.stderr)
                return done.returncode
            runs.append(run)
    summary = summarise(runs, walls)
    summary["command"] = "python bench/soup_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(format_table(summary))
    print(f"wrote {args.out}")
    if args.readme:
        write_readme(summary)
    if summary["recipes_mean"]:
        args.recipes_out.write_text(
            json.dumps(
                {
                    "n_runs": summary["n_runs"],
                    "mean": summary["recipes_mean"],
                    "recipe_seconds_per_run": summary["recipe_seconds_per_run"],
                    "runs": [r["run_dir"] for r in summary["runs"]],
                    "command": summary["command"],
                },
                indent=2,
            )
        )
        print(f"wrote {args.recipes_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
