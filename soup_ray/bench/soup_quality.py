"""Soup quality over several sweep seeds: every summary method's held-out / test / shift mean, and the targets.

``summarise(runs)`` reads finished run folders (their ``results.jsonl``
summary rows, ``base/zero_shot.json`` and the stand-in's build record) and
returns the per-run figures, their mean, minimum and maximum over runs and the
acceptance checks of the local default: greedy soup test >= best individual +
0.5 points and shift mean >= + 1.5 points (means over runs), at least 3 greedy
ingredients in at least 8 runs of 10, in no run the greedy soup more than 0.3
points below the best model on test, and in every run the greedy soup at least
1 point above the uniform soup on test. ``readme_table`` renders the README's
table of the local default from the same summary.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import SweepConfig
from ..results import read_jsonl
from ..run_dir import RunDir

METHODS = ("best_individual", "uniform_soup", "greedy_soup", "ensemble", "greedy_ensemble")
METRICS = ("heldout", "test", "shift_mean")


def _standin_seconds(cfg: SweepConfig) -> float | None:
    if cfg.model.pretrained != "standin":
        return None
    from ..standin import standin_dir

    try:
        meta = json.loads(
            (standin_dir(cfg.model.name, cfg.model.standin_steps, cfg.model.standin_seed) / "standin.json").read_text()
        )
    except (OSError, ValueError):
        return None
    return meta.get("seconds")


def run_figures(run: Path) -> dict[str, Any]:
    """One finished run: per method accuracies and ingredient counts, the base's accuracy, stand-in seconds."""
    paths = RunDir(run)
    rows = read_jsonl(paths.results)
    by_name = {r["model_name"]: r for r in rows if r.get("status") == "summary" or r.get("summary")}
    missing = [m for m in METHODS if m not in by_name]
    if missing:
        raise ValueError(f"{run}: no summary rows for {missing}; run `soup-ray soup {run} --report` first")
    cfg = SweepConfig.model_validate_json(paths.config.read_text())
    zs = json.loads(paths.zero_shot.read_text()) if paths.zero_shot.is_file() else {}
    trials = [r for r in rows if r.get("kind", "individual") == "individual" and r.get("trial_id") is not None]
    recipes = {
        r["model_name"]: {
            **{k: r.get(k) for k in METRICS},
            "ingredients": r.get("n_ingredients"),
            "seconds": r.get("seconds"),
            "params": r.get("params"),
        }
        for r in rows
        if r.get("recipe")
    }
    return {
        "recipes": recipes,
        "methods": {
            m: {**{k: by_name[m].get(k) for k in METRICS}, "ingredients": len(by_name[m].get("ingredients") or [])}
            for m in METHODS
        },
        "base_heldout": zs.get("heldout"),
        "head_init": zs.get("head_init", "zeroshot"),
        "standin_build_s": _standin_seconds(cfg),
        "standin_seed": cfg.model.standin_seed if cfg.model.pretrained == "standin" else None,
        "data_kind": cfg.data.kind,
        "data": cfg.data.model_dump(mode="json"),
        "search_space": cfg.model_dump(mode="json")["search_space"],
        "trials": len(trials),
        "completed": sum(r.get("status") == "completed" for r in trials),
        "seed": cfg.tune.seed,
    }


def gains(per_run: Sequence[Mapping[str, Any]], metric: str, over: str = "best_individual") -> list[float]:
    """Greedy soup minus ``over`` on ``metric``, in points, run by run."""
    return [100 * (r["methods"]["greedy_soup"][metric] - r["methods"][over][metric]) for r in per_run]


def checks(per_run: Sequence[Mapping[str, Any]], mean: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The local default's targets, each with the measured figure (points) and whether it holds."""
    g, b = mean["greedy_soup"], mean["best_individual"]
    test_gain = 100 * (g["test"] - b["test"])
    shift_gain = 100 * (g["shift_mean"] - b["shift_mean"])
    over_uniform = gains(per_run, "test", "uniform_soup")
    worst = min(gains(per_run, "test"), default=0.0)
    with_three = sum(r["methods"]["greedy_soup"]["ingredients"] >= 3 for r in per_run)
    need = math.ceil(0.8 * len(per_run))
    return {
        "greedy_test_minus_best_points": {"value": round(test_gain, 2), "target": ">= 0.5", "ok": test_gain >= 0.5},
        "greedy_shift_minus_best_points": {"value": round(shift_gain, 2), "target": ">= 1.5", "ok": shift_gain >= 1.5},
        "runs_with_3_or_more_greedy_ingredients": {
            "value": with_three,
            "target": f">= {need} of {len(per_run)} (8 of 10)",
            "ok": with_three >= need,
        },
        "worst_greedy_test_minus_best_points": {"value": round(worst, 2), "target": ">= -0.3", "ok": worst >= -0.3},
        "greedy_test_minus_uniform_points_per_run": {
            "value": [round(v, 2) for v in over_uniform],
            "target": ">= 1 in every run",
            "ok": all(v >= 1.0 for v in over_uniform),
        },
    }


def summarise(runs: Sequence[Path], walls: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Per-run figures, their mean over runs and the checks; ``walls`` adds each run's measured wall seconds."""
    per_run = []
    for run in runs:
        fig = run_figures(Path(run))
        fig["run_dir"] = str(run)
        fig["wall_s"] = (walls or {}).get(str(run))
        per_run.append(fig)
    mean = {
        m: {k: statistics.fmean(r["methods"][m][k] for r in per_run) for k in (*METRICS, "ingredients")}
        for m in METHODS
    }
    spread = {
        m: {k: [min(r["methods"][m][k] for r in per_run), max(r["methods"][m][k] for r in per_run)] for k in mean[m]}
        for m in METHODS
    }
    gain = {k: [round(v, 2) for v in gains(per_run, k)] for k in ("test", "shift_mean")}
    builds = sorted({(r["standin_seed"], r["standin_build_s"]) for r in per_run if r["standin_build_s"] is not None})
    bases = [r["base_heldout"] for r in per_run if r["base_heldout"] is not None]
    labels = [k for k in per_run[0]["recipes"] if all(k in r["recipes"] for r in per_run)] if per_run else []
    recipes_mean = {
        k: {m: statistics.fmean(r["recipes"][k][m] for r in per_run) for m in (*METRICS, "ingredients")} for k in labels
    }
    seconds = [sum(v.get("seconds") or 0 for v in r["recipes"].values()) for r in per_run]
    return {
        "runs": per_run,
        "mean": mean,
        "spread": spread,
        "greedy_minus_best_points": gain,
        "standin_builds": [{"standin_seed": sd, "build_s": t} for sd, t in builds],
        "n_runs": len(per_run),
        "recipes_mean": recipes_mean,
        "recipe_seconds_per_run": seconds,
        "base_heldout_mean": statistics.fmean(bases) if bases else None,
        "checks": checks(per_run, mean),
    }


def format_table(summary: Mapping[str, Any]) -> str:
    """Mean over runs per method, then one line per run and the checks."""
    lines = [
        f"{'method':16s} {'held-out':>8s} {'test':>6s} {'shifts':>7s} {'models':>7s}   "
        f"(mean of {summary['n_runs']} run(s))"
    ]
    for m, v in summary["mean"].items():
        lines.append(
            f"{m:16s} {100 * v['heldout']:8.1f} {100 * v['test']:6.1f} {100 * v['shift_mean']:7.1f} "
            f"{v['ingredients']:7.1f}"
        )
    if summary.get("spread"):
        lines.append("")
        lines.append(f"{'min..max':16s} {'held-out':>11s} {'test':>11s} {'shifts':>11s} {'models':>7s}")
        for m, v in summary["spread"].items():
            cells = [f"{100 * v[k][0]:.1f}..{100 * v[k][1]:.1f}" for k in METRICS]
            lines.append(
                f"{m:16s} {cells[0]:>11s} {cells[1]:>11s} {cells[2]:>11s} "
                f"{v['ingredients'][0]:>3.0f}..{v['ingredients'][1]:<3.0f}"
            )
        for k, vals in summary.get("greedy_minus_best_points", {}).items():
            lines.append(
                f"greedy minus best, {k}: mean {statistics.fmean(vals):+.2f}, min {min(vals):+.2f}, "
                f"max {max(vals):+.2f} points"
            )
    lines.append("")
    for r in summary["runs"]:
        g, b, u = (r["methods"][k] for k in ("greedy_soup", "best_individual", "uniform_soup"))
        wall = f", {r['wall_s']:.0f}s wall" if r.get("wall_s") else ""
        standin = f"stand-in {r['standin_seed']}, " if r.get("standin_seed") is not None else ""
        lines.append(
            f"{standin}seed {r['seed']}: best {100 * b['test']:.1f}/{100 * b['shift_mean']:.1f}, uniform "
            f"{100 * u['test']:.1f}/{100 * u['shift_mean']:.1f}, greedy {100 * g['test']:.1f}/"
            f"{100 * g['shift_mean']:.1f} ({g['ingredients']} models) test/shifts; base held-out "
            f"{100 * (r['base_heldout'] or 0):.1f}{wall}"
        )
    if summary.get("recipes_mean"):
        lines.append("")
        lines.append(f"{'recipe':20s} {'held-out':>8s} {'test':>6s} {'shifts':>7s} {'models':>7s}")
        for k, v in summary["recipes_mean"].items():
            lines.append(
                f"{k:20s} {100 * v['heldout']:8.1f} {100 * v['test']:6.1f} {100 * v['shift_mean']:7.1f} "
                f"{v['ingredients']:7.1f}"
            )
        lines.append("recipe seconds per run: " + ", ".join(f"{s:.0f}" for s in summary["recipe_seconds_per_run"]))
    lines.append("")
    for name, c in summary["checks"].items():
        lines.append(f"{'ok  ' if c['ok'] else 'MISS'} {name}: {c['value']} (target {c['target']})")
    return "\n".join(lines)


README_START = "<!-- soup-quality table: generated by `python bench/soup_quality.py --readme`; do not edit -->"
README_END = "<!-- end of soup-quality table -->"
_LABELS = {
    "best_individual": "best single model",
    "uniform_soup": "uniform soup",
    "greedy_soup": "**greedy soup**",
    "ensemble": "ensemble ({n} forward passes)",
    "greedy_ensemble": "greedy ensemble",
}


def _signed(v: float) -> str:
    """``v`` to one decimal with its sign, and no "-0.0" for a tiny negative."""
    return f"{round(v, 1) + 0.0:+.1f}"


def readme_table(summary: Mapping[str, Any]) -> str:
    """The README's table of the local default: per method the mean over runs and the range (min..max) of
    held-out / test / shift mean in %, and of the models it uses, then the greedy soup's gain over the best model."""

    def cell(m: str, k: str, pct: bool = True) -> str:
        f = 100 if pct else 1
        lo, hi = (f * v for v in summary["spread"][m][k])
        mean = f * summary["mean"][m][k]
        text = f"{mean:.1f} ({lo:.1f}-{hi:.1f})" if pct else f"{mean:.1f} ({lo:.0f}-{hi:.0f})"
        return f"**{text}**" if m == "greedy_soup" else text

    n_models = round(summary["mean"]["ensemble"]["ingredients"])
    lines = [
        README_START,
        f"| method (mean of {summary['n_runs']} runs, range) | held-out | test | shift mean | models |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in METHODS:
        label = _LABELS[m].format(n=n_models)
        lines.append(
            f"| {label} | {cell(m, 'heldout')} | {cell(m, 'test')} | {cell(m, 'shift_mean')} | "
            f"{cell(m, 'ingredients', pct=False)} |"
        )
    lines.append("")
    for k, what in (("test", "test"), ("shift_mean", "shift mean")):
        vals = summary["greedy_minus_best_points"][k]
        lines.append(
            f"Greedy soup minus best single model, {what}: mean {_signed(statistics.fmean(vals))} points, "
            f"from {_signed(min(vals))} to {_signed(max(vals))}."
        )
        lines.append("")
    with_three = summary["checks"]["runs_with_3_or_more_greedy_ingredients"]["value"]
    lines.append(f"Greedy kept 3 or more models in {with_three} of {summary['n_runs']} runs.")
    lines.append(README_END)
    return "\n".join(lines)


def replace_readme_table(text: str, table: str) -> str:
    """``text`` (a README) with the block between the table's markers replaced by ``table``."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError("the README has no soup-quality table markers; add the two marker lines first")
    return text[:start] + table + text[end + len(README_END) :]
