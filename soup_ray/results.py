"""Result rows in the reference model-soups shape (JSON Lines, accuracies as fractions)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .atomic import replacing


def stopped_early(metrics: dict[str, Any]) -> bool:
    """Whether a trial's last result is a rung candidate a scheduler stopped it at (``status: candidate``, ``done``).

    Such a trial ended with a soup candidate like a finished one: it is offered to the soup and counted as
    completed, with ``stopped_early`` in its row. A rung result without ``done`` (a sweep stopped by Ctrl-C
    after a rung) is not: the trial is unfinished and resumes.
    """
    return metrics.get("status") == "candidate" and bool(metrics.get("done"))


def is_soup_candidate(metrics: dict[str, Any]) -> bool:
    """Whether a trial's last result comes with a soup candidate: it finished, or a scheduler stopped it at a rung."""
    return metrics.get("status") == "completed" or stopped_early(metrics)


def trial_row(
    trial_id: str,
    metrics: dict[str, Any],
    config: dict[str, Any],
    checkpoint: str | None,
    shifts: Iterable[str],
    error: str | None = None,
) -> dict[str, Any]:
    """One JSON object per model: model_name, heldout, test, one key per shift, hyperparameters, status."""
    status = "error" if error else metrics.get("status", "unknown")
    if error:
        pass
    elif stopped_early(metrics):
        status = "completed"  # a scheduler stopped it at a rung: its rung checkpoint is its soup candidate
    elif status == "running" and metrics.get("done"):
        status = "stopped"  # stopped by a scheduler on an epoch without a candidate
    done = status == "completed"

    def acc(key: str) -> float | None:
        v = metrics.get(key)
        return float(v) if done and v is not None and not (isinstance(v, float) and math.isnan(v)) else None

    row: dict[str, Any] = {
        "model_name": f"trial_{trial_id}",
        "kind": "individual",
        "status": status,
        "heldout": acc("heldout_acc"),
        "test": acc("test_acc"),
    }
    for s in shifts:
        row[s] = acc(f"shift_{s}_acc")
    row["shift_mean"] = acc("shift_mean_acc")
    row["heldout_correct"] = metrics.get("heldout_correct") if done else None
    row["epochs_run"] = metrics.get("epoch")
    row["hyperparameters"] = {k: config[k] for k in sorted(config)}
    row["checkpoint"] = checkpoint
    row["trial_id"] = trial_id
    if stopped_early(metrics) and not error:
        row["stopped_early"] = True  # by the scheduler, at the rung epoch epochs_run
    if error:
        row["error"] = error
    return row


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON Lines (atomically: a reader never sees half a file)."""
    with replacing(path) as tmp, tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=False) + "\n")


def upsert_summary_row(path: Path, row: dict[str, Any]) -> None:
    """Put one summary row into ``results.jsonl``, replacing an earlier row of the same name."""
    rows = [r for r in read_jsonl(path) if not (r.get("summary") and r.get("model_name") == row["model_name"])]
    write_jsonl(path, rows + [row])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read JSON Lines rows."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:5.1f}"
    return str(v)


def format_table(rows: list[dict[str, Any]], shifts: list[str]) -> str:
    """A fixed-width table of models: status, key hyperparameters, accuracies in percent."""
    cols = ["model", "status", "lr", "wd", "ep", "heldout", "test", *shifts, "shift mean"]
    lines = []
    body = []
    for r in rows:
        hp = r.get("hyperparameters") or {}
        body.append(
            [
                r["model_name"],
                r.get("status", ""),
                f"{hp['lr']:.1e}" if "lr" in hp else "",
                f"{hp['weight_decay']:.1e}" if "weight_decay" in hp else "",
                str(hp.get("epochs", "")),
                _fmt(r.get("heldout")),
                _fmt(r.get("test")),
                *[_fmt(r.get(s)) for s in shifts],
                _fmt(r.get("shift_mean")),
            ]
        )
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(x.rjust(w) for x, w in zip(b, widths, strict=True)))
    return "\n".join(lines)


def print_table(
    rows: list[dict[str, Any]],
    shifts: list[str],
    zero_shot: dict[str, float] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Print the individual models, best held-out first, with the zero-shot base for reference."""
    ordered = sorted(rows, key=lambda r: (r.get("heldout") is None, -(r.get("heldout") or 0.0)))
    extra = []
    if zero_shot:
        label = "linear-probe base" if zero_shot.get("head_init") == "linear_probe" else "zero-shot base"
        extra.append(
            {"model_name": label, "status": "base", "heldout": zero_shot.get("heldout"), "test": zero_shot.get("test")}
        )
    log(format_table(ordered + extra, shifts))
    done = [r for r in rows if r.get("status") == "completed"]
    div = [r for r in rows if r.get("status") == "diverged"]
    err = [r for r in rows if r.get("status") == "error"]
    log(f"{len(done)} completed, {len(div)} diverged, {len(err)} failed")


RECIPE_TWINS = {"greedy": "greedy_soup", "uniform": "uniform_soup"}
"""Recipes that recompute a soup the report already has a row for: the same ingredients averaged the same way."""


def is_recipe_twin(row: dict[str, Any], rows: Iterable[dict[str, Any]]) -> bool:
    """Whether ``row`` is the ``greedy`` or ``uniform`` recipe's row and ``rows`` hold its soup's row with the
    same ingredients (so the two are one soup, shown once); a recipe that chose other ingredients is not."""
    twin = RECIPE_TWINS.get(str(row.get("model_name", "")))
    if not row.get("recipe") or twin is None:
        return False
    mine = sorted(row.get("ingredients") or [])
    return any(r.get("model_name") == twin and sorted(r.get("ingredients") or []) == mine for r in rows)
