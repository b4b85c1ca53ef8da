"""Average the soup table over several finished runs (e.g. the same config with different sweep seeds).

    python bench/seed_summary.py RUN_DIR [RUN_DIR ...] [--out bench/results/seeds.json]

Reads each run's ``results.jsonl`` summary rows (best individual, uniform soup,
greedy soup, ensemble, greedy ensemble) and writes the per-run values and their
mean for held-out, test and the mean of the shifts.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METHODS = ("best_individual", "uniform_soup", "greedy_soup", "ensemble", "greedy_ensemble")
METRICS = ("heldout", "test", "shift_mean")


def summarise(run_dirs: list[Path]) -> dict:
    """Per-run and mean accuracies (fractions) of every summary method."""
    per_run: dict[str, dict] = {}
    for run in run_dirs:
        rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]
        by_name = {r["model_name"]: r for r in rows if r.get("status") == "summary" or r.get("summary")}
        missing = [m for m in METHODS if m not in by_name]
        if missing:
            raise SystemExit(f"{run}: no summary rows for {missing}; run `soup-ray soup {run} --report` first")
        per_run[str(run)] = {m: {k: by_name[m][k] for k in METRICS} | {"models": len(by_name[m].get("ingredients") or [1])}
                             for m in METHODS}
    mean = {m: {k: statistics.fmean(r[m][k] for r in per_run.values()) for k in METRICS} for m in METHODS}
    return {"runs": per_run, "mean": mean, "n_runs": len(run_dirs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "seeds.json")
    args = ap.parse_args()
    out = summarise(args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"{'method':16s} {'held-out':>8s} {'test':>6s} {'shifts':>7s}   (mean of {out['n_runs']} runs)")
    for m, v in out["mean"].items():
        print(f"{m:16s} {100 * v['heldout']:8.1f} {100 * v['test']:6.1f} {100 * v['shift_mean']:7.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
