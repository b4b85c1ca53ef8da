#!/usr/bin/env python3
"""Soup-aware sweep: FIFO, Tune's ASHA and the soup scheduler on recorded sweeps of the local default.

    python bench/soup_aware.py --record --seeds 0 1 2 3 4     # record 5 FIFO sweeps, then replay
    python bench/soup_aware.py --recordings runs/aware-rec-seed0 ...   # replay finished recordings
    python bench/soup_aware.py --recordings ... --live 0      # also run `soup` live on seed 0 and compare

A recording is `soup-ray sweep CONFIG --seed S --set tune.keep_epoch_candidates=true`: every trial runs all
its epochs and keeps every epoch's weights. A scheduler that only stops trials gets, for a trial stopped at
epoch e, exactly that epoch's weights, so each scheduler is replayed offline through the real scheduler
object (soup_ray/bench/soup_aware.py). Per seed and scheduler: trial-epochs (the compute), the soup
evaluations the soup scheduler asked for, the simulated wall time, and the final greedy soup's held-out,
test and shift-mean accuracy and ingredients.

Schedulers: fifo; asha at Tune's usual settings (grace 1, reduction factor 4); asha at the soup scheduler's
budget (the reduction factor whose mean trial-epochs come closest); soup (tune.scheduler: soup, its default
soup_margin 20); soup with soup_cut (ASHA's cut on the soup gain, at ASHA's usual rungs and budget). Writes bench/results/soup_aware.json and soup_aware.png (soup accuracy against trial-epochs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from soup_ray.bench.soup_aware import (
    Lab,
    fifo_trial_epochs,
    load_recording,
    paired,
    replay,
    summarise,
    torch_threads,
)

HERE = Path(__file__).resolve().parent
SOUP = "soup"
ASHA_USUAL = "asha (rf 4)"
ASHA_BUDGET = "asha at soup's budget"


def record(config: str, seed: int, out: Path, extra: list[str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        "soup_ray.cli",
        "sweep",
        config,
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--no-dashboard",
        *extra,
    ]
    print(f"[soup_aware] {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise SystemExit(f"[soup_aware] the sweep for seed {seed} failed (exit {done.returncode})")
    return round(time.perf_counter() - t0, 1)


def trials_wall_s(run: Path) -> float | None:
    """The wall time of a run's trials, from Tune's own result lines: the first trial's start to the last result."""
    starts, ends = [], []
    for f in (Path(run) / "tune").glob("*/result.json"):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                ends.append(float(r["timestamp"]))
                starts.append(float(r["timestamp"]) - float(r.get("time_total_s", 0.0)))
    return round(max(ends) - min(starts), 1) if ends else None


def asha_budget_rf(labs: list[Lab], target: float, rfs: list[float]) -> float:
    """The ASHA reduction factor whose mean trial-epochs over the recordings come closest to ``target``."""
    best, best_gap = rfs[0], float("inf")
    for rf in rfs:
        mean = statistics.fmean(replay(lab, "asha", rf=rf, score=False)["trial_epochs"] for lab in labs)
        print(f"[soup_aware]   asha rf {rf:g}: {mean:.1f} trial-epochs (soup: {target:.1f})", flush=True)
        if abs(mean - target) < best_gap:
            best, best_gap = rf, abs(mean - target)
    return best


def plot(summary: dict, per_seed: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"fifo": "#444444", ASHA_USUAL: "#1f77b4", ASHA_BUDGET: "#17becf"}
    for ax, metric, title in ((axes[0], "test", "test"), (axes[1], "shift_mean", "shift mean")):
        for label in summary:
            c = colours.get(label, "#ff7f0e" if label.endswith("+ cut") else "#d62728")
            if (
                label.startswith(SOUP)
                and not label.endswith("+ cut")
                and label != next((x for x in summary if x.startswith(SOUP)), label)
            ):
                c = "#e377c2"  # the other margins
            xs = [r["trial_epochs"] for s in per_seed for r in s["replays"] if r["scheduler"] == label]
            ys = [100 * r[metric] for s in per_seed for r in s["replays"] if r["scheduler"] == label]
            ax.scatter(xs, ys, s=14, alpha=0.35, color=c)
            m = summary[label]
            ax.errorbar(
                m["trial_epochs"]["mean"],
                m[metric]["mean"],
                yerr=m[metric]["se"],
                fmt="o",
                ms=8,
                color=c,
                label=f"{label} (mean of {m['seeds']})",
                capsize=3,
            )
        ax.set_xlabel("trial-epochs (compute)")
        ax.set_ylabel(f"greedy soup {title} accuracy (%)")
        ax.set_title(f"Greedy soup on {title} against compute")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def live_check(
    config: str, seed: int, rec_lab: Lab, margin: int, out_dir: Path, extra: list[str], run: Path | None = None
) -> dict:
    """Run the soup scheduler live on ``seed`` (or read ``run``, such a run already made) and compare its
    decisions and soup with the replay's."""
    from soup_ray.results import read_jsonl
    from soup_ray.run_dir import RunDir

    wall = None
    if run is None:
        run = out_dir / f"aware-live-soup-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        wall = record(
            config,
            seed,
            run,
            [*extra, "--set", "tune.scheduler=soup", "--set", f"tune.soup_margin={margin}", "--set", "soup.methods=[]"],
        )
    log = [json.loads(x) for x in RunDir(run).scheduler_log.read_text().splitlines() if x.strip()]
    rows = [
        r for r in read_jsonl(RunDir(run).results) if r.get("kind", "individual") == "individual" and r.get("trial_id")
    ]
    soup = json.loads(RunDir(run).soup_info.read_text())

    # the two sweeps' trial ids differ in Tune's experiment prefix; the same seed draws the same trials in order
    def idx(tid: str) -> str:
        return tid.rsplit("_", 1)[-1]

    live_decisions = sorted((idx(d["trial_id"]), d["epoch"], d["decision"], d.get("soup_gain")) for d in log)
    rep = replay(rec_lab, SOUP, margin=margin, label=f"{SOUP} (margin {margin})")
    rep_decisions = sorted(
        (idx(d["trial_id"]), d["epoch"], d["decision"], d.get("soup_gain")) for d in rep["decisions"]
    )
    same_decisions = [a for a in live_decisions if a in rep_decisions]
    epochs_live = sum(int(r.get("epochs_run") or 0) for r in rows)
    ran = {r["trial_id"]: r["epochs_run"] for r in rows}
    live_soup = sorted(f"{idx(i)}@{ran[i]}" for i in soup["ingredients"])
    rep["soup"] = sorted(f"{idx(c.split('@')[0])}@{c.split('@')[1]}" for c in rep["soup"])
    # exactness: a trial stopped live at epoch e holds the weights the recording kept for that trial's epoch e
    import torch
    from safetensors.torch import load_file

    rec_ids = {idx(t.trial_id): t for t in rec_lab.rec.tapes}
    same_weights = []
    for r in rows:
        if r.get("stopped_early") and r.get("checkpoint"):
            live_w = load_file(str(run / r["checkpoint"] / "model.safetensors"))
            rec_w = load_file(str(rec_ids[idx(r["trial_id"])].folders[int(r["epochs_run"]) - 1] / "model.safetensors"))
            same_weights.append(all(torch.equal(live_w[k], rec_w[k]) for k in rec_w))
    return {
        "run_dir": str(run),
        "command_wall_s": wall,
        "trials_wall_s": trials_wall_s(run),
        "recording_trials_wall_s": trials_wall_s(rec_lab.rec.run_dir),
        "soup_judgements": sum(1 for d in log if d.get("soup_gain") is not None),
        "stopped_weights_identical_to_recording": f"{sum(same_weights)} of {len(same_weights)}",
        "trial_epochs": epochs_live,
        "replay_trial_epochs": rep["trial_epochs"],
        "decisions_live": len(live_decisions),
        "decisions_replay": len(rep_decisions),
        "decisions_identical": len(same_decisions),
        "stopped_live": sum(bool(r.get("stopped_early")) for r in rows),
        "stopped_replay": rep["stopped"],
        "soup_live": live_soup,
        "soup_replay": sorted(rep["soup"]),
        "soup_identical": live_soup == sorted(rep["soup"]),
        "differences": sorted(set(live_decisions) ^ set(rep_decisions)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tune_configs/local.yaml", help="sweep file (default: the local default)")
    ap.add_argument("--record", action="store_true", help="record a FIFO sweep per --seeds first")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="tune.seed values to record")
    ap.add_argument("--recordings", type=Path, nargs="+", default=[], help="recorded run folders to replay")
    ap.add_argument(
        "--margins",
        type=int,
        nargs="+",
        default=[20, 10],
        help="tune.soup_margin values of the soup scheduler; the first is the one compared (default: 20 10)",
    )
    ap.add_argument(
        "--asha-rfs",
        type=float,
        nargs="+",
        default=[2, 3, 4, 6, 8, 12, 24],
        help="ASHA reduction factors to match budget",
    )
    ap.add_argument("--live", type=int, metavar="SEED", help="also run the soup scheduler live on this seed")
    ap.add_argument("--live-run", type=Path, metavar="DIR", help="with --live: compare this finished live run instead")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to the sweeps")
    ap.add_argument("--out-dir", type=Path, default=Path("runs"), help="where new runs go (default: runs/)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "soup_aware.json", help="JSON to write")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the replay (default: 2)")
    args = ap.parse_args(argv)
    extra = [a for s in args.set for a in ("--set", s)]
    recordings = list(args.recordings)
    walls: dict[str, float] = {}
    if args.record:
        for seed in args.seeds:
            run = args.out_dir / f"aware-rec-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
            walls[str(run)] = record(
                args.config, seed, run, [*extra, "--set", "tune.keep_epoch_candidates=true", "--set", "soup.methods=[]"]
            )
            recordings.append(run)
    if not recordings:
        ap.error("nothing to replay: give --record or --recordings")
    torch_threads(args.threads)
    soup_main = f"{SOUP} (margin {args.margins[0]})"
    soup_cut = f"{soup_main} + cut"
    t0 = time.perf_counter()
    labs = [Lab(load_recording(r)) for r in recordings]
    per_seed = []
    for lab in labs:
        print(f"[soup_aware] {lab.rec.run_dir} ({len(lab.rec.tapes)} trials, {lab.rec.slots} at a time)", flush=True)
        reps = [
            replay(lab, "fifo", log=print),
            replay(lab, "asha", rf=4.0, label=ASHA_USUAL, log=print),
            *(replay(lab, SOUP, margin=m, label=f"{SOUP} (margin {m})", log=print) for m in args.margins),
            replay(lab, SOUP, margin=args.margins[0], cut=True, rf=4.0, label=soup_cut, log=print),
        ]
        per_seed.append(
            {
                "run_dir": str(lab.rec.run_dir),
                "seed": json.loads((lab.rec.run_dir / "config.json").read_text())["tune"]["seed"],
                "fifo_trial_epochs": fifo_trial_epochs(lab.rec),
                "recording_wall_s": walls.get(str(lab.rec.run_dir)),
                "recording_trials_wall_s": trials_wall_s(lab.rec.run_dir),
                "replays": reps,
            }
        )
    target = statistics.fmean(r["trial_epochs"] for s in per_seed for r in s["replays"] if r["scheduler"] == soup_main)
    rf = asha_budget_rf(labs, target, args.asha_rfs)
    for lab, s in zip(labs, per_seed, strict=True):
        s["replays"].append(replay(lab, "asha", rf=rf, label=ASHA_BUDGET, log=print))
    summary = summarise(per_seed)
    result = {
        "schedulers": summary,
        "asha_budget_reduction_factor": rf,
        "soup_vs_asha_budget": {
            m: paired(per_seed, soup_main, ASHA_BUDGET, m) for m in ("test", "shift_mean", "heldout")
        },
        "soup_cut_vs_asha_usual": {
            m: paired(per_seed, soup_cut, ASHA_USUAL, m) for m in ("test", "shift_mean", "heldout")
        },
        "replay_evaluations": sum(lab.evaluations for lab in labs),
        "replay_s": round(time.perf_counter() - t0, 1),
        "per_seed": per_seed,
        "command": "python bench/soup_aware.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    s = summary[soup_main]
    vs = result["soup_vs_asha_budget"]
    cut = result["soup_cut_vs_asha_usual"]
    result["targets"] = {
        "soup_within_0.15_of_fifo_test": s["test_minus_fifo"]["mean"] >= -0.15,
        "soup_within_0.15_of_fifo_shift": s["shift_minus_fifo"]["mean"] >= -0.15,
        "soup_at_most_30pct_of_fifo_compute": s["compute_vs_fifo"]["mean"] <= 0.30,
        "soup_beats_asha_at_its_budget_by_0.2_and_2se": any(
            vs[m]["mean"] >= 0.2 and vs[m]["mean"] > 2 * vs[m]["se"] for m in ("test", "shift_mean")
        ),
        "soup_cut_beats_asha_at_asha_budget_by_0.2_and_2se": any(
            cut[m]["mean"] >= 0.2 and cut[m]["mean"] > 2 * cut[m]["se"] for m in ("test", "shift_mean")
        ),
    }
    if args.live is not None:
        lab = next(lab for lab, ps in zip(labs, per_seed, strict=True) if ps["seed"] == args.live)
        result["live"] = live_check(
            args.config, args.live, lab, args.margins[0], args.out_dir, extra, run=args.live_run
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(summary, per_seed, args.out.with_suffix(".png"))
    print(format_table(summary))
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def format_table(summary: dict) -> str:
    lines = [
        "| scheduler | trial-epochs | of FIFO | test | shift mean | ingredients | test - FIFO | shift - FIFO |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in summary.items():
        lines.append(
            f"| {label} | {m['trial_epochs']['mean']:.1f} | {100 * m['compute_vs_fifo']['mean']:.0f}% | "
            f"{m['test']['mean']:.2f} | {m['shift_mean']['mean']:.2f} | {m['ingredients']['mean']:.1f} | "
            f"{m['test_minus_fifo']['mean']:+.2f} ± {m['test_minus_fifo']['se']:.2f} | "
            f"{m['shift_minus_fifo']['mean']:+.2f} ± {m['shift_minus_fifo']['se']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
