"""What a run folder shows right now, as one plain dict: the data of the live soup page.

``snapshot(run_dir)`` reads only files that their writers replace atomically
(``soup/soup.json``, ``soup_state/state.json``, ``results.jsonl``) plus the
last complete line of each trial's Tune ``result.json``, so it can be called
while a sweep runs, as often as a page polls. It never imports Ray or torch.

The dict holds:

- ``soup``: the published soup (``soup/soup.json``): version, ingredients with
  their own held-out accuracy, the soup's held-out accuracy; None before the first.
- ``keeper``: the soup actor's persisted state: version, candidates seen,
  rejected offers, evaluations, last update.
- ``curve``: the greedy pass in held-out order: each candidate's own held-out
  accuracy, whether it was kept, the soup's held-out accuracy after it.
- ``trials``: one row per trial (``results.jsonl`` once the sweep wrote it,
  Tune's trial folders before), with the trial's part in the soup.
- ``points``: test vs mean-shift accuracy of every individual model and of every
  soup, ensemble and recipe scored so far (``results.jsonl`` summary rows).
- ``digest``: changes whenever anything above changes (what a page polls for).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from .results import is_recipe_twin
from .run_dir import CHECKPOINT_METRICS, RunDir

TAIL_BYTES = 64 * 1024
"""How much of the end of a Tune ``result.json`` is read for its last line."""


def _read_json(path: Path) -> Any:
    """A JSON file, or None when it is missing or caught half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """JSON Lines rows; a line that does not parse (a writer caught mid-line) is skipped."""
    try:
        text = path.read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _last_line(path: Path) -> dict[str, Any] | None:
    """The last complete JSON line of an appended file (Tune's ``result.json``)."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            return row
    return None


def _frac(correct: Any, size: Any) -> float | None:
    if isinstance(correct, (int, float)) and isinstance(size, (int, float)) and size:
        return float(correct) / float(size)
    return None


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:  # NaN
        return None
    return float(v)


def _hyper(hp: dict[str, Any]) -> dict[str, Any]:
    keep = ("lr", "weight_decay", "epochs", "label_smoothing", "mixup_alpha")
    return {k: hp[k] for k in keep if k in hp}


def _tune_trials(tune_dir: Path, shifts: list[str]) -> list[dict[str, Any]]:
    """One row per Tune trial folder, from its last reported result (finished or still running)."""
    rows = []
    if not tune_dir.is_dir():
        return rows
    for folder in sorted(p for p in tune_dir.iterdir() if p.is_dir()):
        last = _last_line(folder / "result.json")
        final = None
        for ckpt in sorted(folder.glob("checkpoint_*")):
            final = _read_json(ckpt / CHECKPOINT_METRICS) or final
        metrics = {**(last or {}), **(final or {})}
        tid = metrics.get("trial_id") or (last or {}).get("trial_id")
        if not tid:
            continue
        status = str(metrics.get("status") or "running")
        done = status == "completed"
        row = {
            "trial_id": str(tid),
            "status": status,
            "epoch": metrics.get("epoch"),
            "heldout": _number(metrics.get("heldout_acc")),
            "test": _number(metrics.get("test_acc")) if done else None,
            "shift_mean": _number(metrics.get("shift_mean_acc")) if done else None,
            "hyperparameters": _hyper(metrics.get("hyperparameters") or metrics.get("config") or {}),
        }
        for s in shifts:
            row[s] = _number(metrics.get(f"shift_{s}_acc")) if done else None
        rows.append(row)
    return rows


def _result_trials(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r.get("summary") or r.get("kind", "individual") != "individual":
            continue
        tid = r.get("trial_id") or str(r.get("model_name", "")).removeprefix("trial_")
        out.append(
            {
                "trial_id": str(tid),
                "status": str(r.get("status") or "unknown"),
                "epoch": r.get("epochs_run"),
                "heldout": _number(r.get("heldout")),
                "test": _number(r.get("test")),
                "shift_mean": _number(r.get("shift_mean")),
                "hyperparameters": _hyper(r.get("hyperparameters") or {}),
            }
        )
    return out


def _points(trials: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Test vs mean-shift accuracy of the individual models and every scored soup, ensemble and recipe."""
    pts = [
        {"name": f"trial {t['trial_id']}", "kind": "individual", "test": t["test"], "shift_mean": t["shift_mean"]}
        for t in trials
        if t["test"] is not None and t["shift_mean"] is not None
    ]
    for r in rows:
        if not r.get("summary"):
            continue
        test, shift = _number(r.get("test")), _number(r.get("shift_mean"))
        name = str(r.get("model_name", ""))
        if test is None or shift is None or name == "best_individual":
            continue
        if is_recipe_twin(r, rows):  # the greedy and uniform recipes are the greedy and uniform soups' points
            continue
        kind = "recipe" if r.get("recipe") else str(r.get("kind") or "soup")
        pts.append(
            {
                "name": name,
                "kind": kind,
                "test": test,
                "shift_mean": shift,
                "n_ingredients": r.get("n_ingredients"),
                "forward_passes": r.get("forward_passes"),
            }
        )
    return pts


def _curve(state: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The greedy pass over the candidates, in held-out order, from the keeper's persisted soup."""
    if not state:
        return []
    soup = state.get("soup") or {}
    size = soup.get("heldout_size")
    own = {c.get("id"): c.get("heldout_correct") for c in soup.get("candidates") or [] if isinstance(c, dict)}
    out = []
    for step in soup.get("steps") or []:
        if not isinstance(step, dict):
            continue
        cid = step.get("candidate_id")
        out.append(
            {
                "position": step.get("position"),
                "trial_id": cid,
                "accepted": bool(step.get("accepted")),
                "heldout": _frac(own.get(cid), size),
                "soup_heldout": _frac(step.get("soup_correct"), size),
            }
        )
    return out


def snapshot(run_dir: Path | str) -> dict[str, Any]:
    """Everything the live soup page shows about ``run_dir`` now (a JSON-ready dict with a ``digest``)."""
    paths = RunDir(run_dir)
    config = _read_json(paths.config) or {}
    shifts = [str(s) for s in ((config.get("data") or {}).get("shifts") or [])]
    state = _read_json(paths.state_file)
    info = _read_json(paths.soup_info)
    rows = _read_rows(paths.results)

    trials = _result_trials(rows)
    known = {t["trial_id"] for t in trials}
    trials += [t for t in _tune_trials(paths.tune, shifts) if t["trial_id"] not in known]
    own = {t["trial_id"]: t["heldout"] for t in trials}
    curve = _curve(state)
    for c in curve:
        own.setdefault(c["trial_id"], c["heldout"])

    soup = None
    if isinstance(info, dict):
        ids = [str(i) for i in info.get("ingredients") or []]
        soup = {
            "version": info.get("version"),
            "method": info.get("method"),
            "tie": info.get("tie"),
            "heldout_accuracy": _number(info.get("heldout_accuracy")),
            "heldout_correct": info.get("heldout_correct"),
            "heldout_size": info.get("heldout_size"),
            "published_at": info.get("published_at"),
            "ingredients": [{"trial_id": i, "heldout": own.get(i)} for i in ids],
        }

    keeper = None
    rejected: dict[str, str] = {}
    offered: set[str] = set()
    if isinstance(state, dict):
        rejected = {str(k): str(v) for k, v in (state.get("rejected") or {}).items()}
        offered = {str(k) for k in (state.get("records") or {})}
        s = state.get("soup") or {}
        keeper = {
            "version": state.get("version"),
            "candidates_seen": len(offered) + len(rejected),
            "rejected": rejected,
            "evaluations": s.get("evaluations"),
            "heldout_images_evaluated": s.get("images_evaluated"),
            "heldout_size": s.get("heldout_size"),
            "tie": state.get("tie"),
            "restarts": state.get("restarts", 0),
            "updated_at": state.get("updated_at"),
        }

    in_soup = {i["trial_id"] for i in (soup or {}).get("ingredients", [])}
    for t in trials:
        tid = t["trial_id"]
        if tid in in_soup:
            t["soup"] = "in soup"
        elif tid in rejected:
            t["soup"] = "rejected: " + rejected[tid]
        elif tid in offered:
            t["soup"] = "not kept"
        else:
            t["soup"] = "running" if t["status"] == "running" else ""
    trials.sort(key=lambda t: (t["heldout"] is None, -(t["heldout"] or 0.0), t["trial_id"]))

    snap: dict[str, Any] = {
        "run": paths.path.name,
        "name": config.get("name"),
        "shifts": shifts,
        "soup": soup,
        "keeper": keeper,
        "curve": curve,
        "trials": trials,
        "points": _points(trials, rows),
        "report": paths.report_md.is_file(),
    }
    return with_digest(snap)


def with_digest(snap: dict[str, Any]) -> dict[str, Any]:
    """``snap`` with ``digest`` (a hash of its content) and ``generated_at`` set."""
    body = {k: v for k, v in snap.items() if k not in ("digest", "generated_at")}
    digest = hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {**body, "digest": digest, "generated_at": time.time()}
