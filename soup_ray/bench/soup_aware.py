"""Replay Tune schedulers against a recorded FIFO sweep, exactly: the soup-aware sweep's benchmark.

A recording is a finished run made with ``tune.keep_epoch_candidates`` (and
``tune.scheduler: fifo``): every trial ran all its epochs and kept every
epoch's weights and held-out count under ``RUN/epochs/TRIAL/eNNN/``. A
scheduler that only stops trials gives, for a trial stopped at epoch ``e``,
exactly that trial's epoch-``e`` weights (same seed, same schedule so far), so
its sweep can be replayed offline:

- trials start in order on ``slots`` workers, each epoch lasting what it lasted
  in the recording (the simulated wall time);
- each epoch's result goes to the real scheduler object (Tune's ``ASHAScheduler``,
  the project's ``SoupScheduler``); a rung result for ``soup`` carries the
  signals of :func:`soup_ray.soup_view.gain_against` against the greedy soup of
  the candidates finished so far (what the live soup actor would hold);
- the final greedy soup over every candidate left (finished trials' last
  epochs, stopped trials' rung epochs) is scored on held-out, test and shifts.

Held-out scores use the keeper's early rejection and are memoised by
ingredient set across schedulers.
"""

from __future__ import annotations

import heapq
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..evaluate import accuracy, predict_logits
from ..ingredients import Kitchen, TrialRecord
from ..results import read_jsonl
from ..run_dir import CHECKPOINT_METRICS, RunDir
from ..soup import Candidate, EvalResult, IncrementalGreedySoup, greedy_soup
from ..soup_view import gain_against

CONTINUE, STOP = "CONTINUE", "STOP"


@dataclass
class Tape:
    """One recorded trial: its epochs' seconds, held-out counts and kept folders."""

    trial_id: str
    epochs: int  # epochs it was drawn (what FIFO trains)
    seconds: list[float]  # wall time of each epoch it ran
    heldout_correct: list[int]
    heldout_acc: list[float]
    folders: list[Path]
    diverged: bool = False  # its last run epoch diverged: no candidate there

    @property
    def ran(self) -> int:
        return len(self.seconds)


@dataclass
class Recording:
    run_dir: Path
    tapes: list[Tape]
    slots: int
    rows: list[dict[str, Any]] = field(default_factory=list)


class NotARecording(ValueError):
    """A run folder without every epoch's candidate (not made with tune.keep_epoch_candidates)."""


def load_recording(run_dir: Path, slots: int | None = None) -> Recording:
    """The tapes of a run made with ``tune.keep_epoch_candidates`` (trials in Tune's order)."""
    run_dir = Path(run_dir)
    paths = RunDir(run_dir)
    if not paths.epochs.is_dir():
        raise NotARecording(
            f"{run_dir} has no {paths.epochs.name}/ folder: record a sweep with "
            "--set tune.keep_epoch_candidates=true (bench/soup_aware.py --record does)"
        )
    rows = sorted(
        (r for r in read_jsonl(paths.results) if r.get("kind", "individual") == "individual" and r.get("trial_id")),
        key=lambda r: r["trial_id"],
    )
    cfg = json.loads(paths.config.read_text())
    if slots is None:
        slots = max(1, int(2 // float(cfg["trial_resources"]["cpu"])))
        if cfg["tune"].get("max_concurrent_trials"):
            slots = min(slots, int(cfg["tune"]["max_concurrent_trials"]))
    tapes = []
    for r in rows:
        tid = r["trial_id"]
        folders = sorted((paths.epochs / tid).glob("e[0-9][0-9][0-9]"))
        metas = [json.loads((f / CHECKPOINT_METRICS).read_text()) for f in folders]
        cum = [float(m["seconds"]) for m in metas]
        seconds = [b - a for a, b in zip([0.0, *cum[:-1]], cum, strict=True)]
        diverged = r.get("status") == "diverged"
        if diverged:  # the diverging epoch ran (its time from the row) but left nothing
            seconds.append(max(0.0, float(r.get("seconds") or (cum[-1] if cum else 0.0)) - (cum[-1] if cum else 0.0)))
        tapes.append(
            Tape(
                tid,
                int(r["hyperparameters"]["epochs"]),
                seconds,
                [int(m["heldout_correct"]) for m in metas],
                [float(m["heldout_acc"]) for m in metas],
                folders,
                diverged,
            )
        )
    return Recording(run_dir, tapes, slots, rows)


def cid(trial_id: str, epoch: int) -> str:
    """A candidate's id in a replay: the trial and the epoch its weights come from."""
    return f"{trial_id}@{epoch}"


class Lab:
    """The recording's kitchen (held-out split, weights) with memoised held-out scores."""

    def __init__(self, rec: Recording, threads: int | None = None):
        self.rec = rec
        self.kitchen = Kitchen(rec.run_dir, threads=threads)
        self.cfg = self.kitchen.config
        self.heldout_size = self.kitchen.heldout_size
        self._results: dict[frozenset[str], EvalResult] = {}
        self._soup_counts: dict[frozenset[str], int] = {}  # the soup's own count as a rung trial scores it
        self._admitted: dict[str, Candidate] = {}
        self.evaluations = 0

    def candidate(self, tape: Tape, epoch: int) -> Candidate:
        key = cid(tape.trial_id, epoch)
        if key not in self._admitted:
            folder = tape.folders[epoch - 1]
            self._admitted[key] = self.kitchen.admit(TrialRecord(key, str(folder), tape.heldout_correct[epoch - 1]))
        return self._admitted[key]

    def evaluate(self, ids: Sequence[str], max_wrong: int | None = None) -> EvalResult:
        """The held-out score of the soup of ``ids``, with the keeper's early rejection, memoised by ingredient set:
        a whole score answers every query, a stopped one any query that allows fewer mistakes than it made."""
        key = frozenset(ids)
        old = self._results.get(key)
        if old is not None and (old.complete or (max_wrong is not None and old.wrong > max_wrong)):
            return old
        res = self.kitchen.evaluate(list(ids), max_wrong)
        self.evaluations += 1
        if old is None or res.complete or res.evaluated > old.evaluated:
            self._results[key] = res
        return res

    def gain(self, tape: Tape, epoch: int, soup_ids: Sequence[str]) -> dict[str, Any]:
        """The rung signals the live trial would report against a soup of ``soup_ids`` (soup_view's function)."""
        if not soup_ids:
            return {"soup_size": 0}
        self.evaluations += 1
        key = frozenset(soup_ids)
        soup = self.kitchen.soup_weights(list(soup_ids))
        cand = self.kitchen.weights(self.candidate(tape, epoch).id)
        out = gain_against(
            self.kitchen.model,
            cand,
            soup,
            len(soup_ids),
            self.kitchen.heldout,
            self.cfg.eval_batch_size,
            self.cfg.model.precision,
            soup_correct=self._soup_counts.get(key),
        )
        self._soup_counts[key] = out["soup_heldout_correct"]
        return {"soup_size": len(soup_ids), **out}

    def final_scores(self, ids: Sequence[str]) -> dict[str, float]:
        """Held-out, test, each shift and the shift mean of the soup of ``ids``, as fractions."""
        model = self.kitchen.classifier(list(ids))
        out: dict[str, float] = {}
        for name, ds in self.kitchen.bundle.eval_sets().items():
            logits, labels = predict_logits(model, ds, self.cfg.eval_batch_size, precision=self.cfg.model.precision)
            out[name] = accuracy(logits, labels)
        shifts = [k for k in out if k not in ("heldout", "test")]
        out["shift_mean"] = sum(out[k] for k in shifts) / len(shifts) if shifts else math.nan
        return out


def make_replay_scheduler(
    kind: str, *, max_t: int, grace: int = 1, rf: float = 4.0, margin: int | None = None, cut: bool = False
) -> Any:
    """The real scheduler object a replay feeds (None for fifo)."""
    if kind == "fifo":
        return None
    if kind == "soup":
        from ..cluster.scheduler import SoupScheduler

        return SoupScheduler(margin, rf if cut else None)
    from ray.tune.schedulers import ASHAScheduler

    s = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=grace, reduction_factor=rf)
    s.set_search_properties("heldout_acc", "max")
    return s


def rung_epochs(max_t: int, grace: int, rf: float) -> list[int]:
    """ASHA's rungs below ``max_t`` (what ``TuneSettings.rungs`` gives)."""
    out, k = [], 0
    while (r := int(round(grace * rf**k))) < max_t:
        out.append(r)
        k += 1
    return out


def replay(
    lab: Lab,
    kind: str,
    *,
    grace: int = 1,
    rf: float = 4.0,
    margin: int | None = None,
    cut: bool = False,
    label: str | None = None,
    score: bool = True,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """One scheduler over the recording: compute spent, decisions, and the final greedy soup's scores.

    ``score=False`` (not for ``soup``, whose decisions need the soup) only counts the compute.
    """
    rec = lab.rec
    max_t = max(t.epochs for t in rec.tapes)
    rungs = set(rung_epochs(max_t, grace, rf)) if kind != "fifo" else set()
    sched = make_replay_scheduler(kind, max_t=max_t, grace=grace, rf=rf, margin=margin, cut=cut)
    track = score or kind == "soup"
    live = IncrementalGreedySoup(lab.evaluate, heldout_size=lab.heldout_size)
    pending = list(rec.tapes)
    events: list[tuple[float, int, str, int]] = []
    order = 0
    tapes = {t.trial_id: t for t in rec.tapes}
    trial_epochs = judged = 0
    candidates: dict[str, int] = {}  # trial -> epoch of its candidate
    decisions: list[dict[str, Any]] = []
    clock = 0.0

    def start(now: float) -> None:
        nonlocal order
        if not pending:
            return
        t = pending.pop(0)
        if sched is not None:
            sched.on_trial_add(None, SimpleNamespace(trial_id=t.trial_id))
        heapq.heappush(events, (now + t.seconds[0], order, t.trial_id, 1))
        order += 1

    for _ in range(rec.slots):
        start(0.0)
    while events:
        now, _, tid, epoch = heapq.heappop(events)
        clock = now
        t = tapes[tid]
        trial = SimpleNamespace(trial_id=tid)
        trial_epochs += 1
        if t.diverged and epoch == t.ran:  # this epoch diverged: the trial ends without a candidate
            if sched is not None:
                sched.on_trial_complete(None, trial, {"epoch": epoch, "heldout_acc": 0.0})
            start(now)
            continue
        last = epoch == t.epochs
        result: dict[str, Any] = {
            "epoch": epoch,
            "heldout_acc": t.heldout_acc[epoch - 1],
            "heldout_correct": t.heldout_correct[epoch - 1],
        }
        if not last and epoch in rungs:
            result["rung"] = epoch
            if kind == "soup":
                result.update(lab.gain(t, epoch, live.ingredients))
                judged += int("soup_gain" in result)
        decision = CONTINUE if sched is None else sched.on_trial_result(None, trial, result)
        if "rung" in result:
            decisions.append(
                {
                    "trial_id": tid,
                    "epoch": epoch,
                    "decision": decision,
                    **{k: result[k] for k in ("soup_size", "soup_gain") if k in result},
                }
            )
        if last or decision == STOP:
            if sched is not None:
                sched.on_trial_complete(None, trial, result)
            candidates[tid] = epoch
            if track:
                live.offer([lab.candidate(t, epoch)])
            start(now)
        else:
            heapq.heappush(events, (now + t.seconds[epoch], order, tid, epoch + 1))
            order += 1
    stopped = sum(1 for tid, e in candidates.items() if e < tapes[tid].epochs)
    if not score:
        return {"scheduler": label or kind, "trial_epochs": trial_epochs, "stopped": stopped}
    cands = [lab.candidate(tapes[tid], e) for tid, e in sorted(candidates.items())]
    soup = greedy_soup(cands, lab.evaluate, heldout_size=lab.heldout_size)
    scores = lab.final_scores(soup.ingredients)
    assert soup.ingredients == live.ingredients, "the incremental soup must end as the batch greedy soup"
    out = {
        "scheduler": label or kind,
        "kind": kind,
        "grace_period": grace if kind != "fifo" else None,
        "reduction_factor": rf if kind != "fifo" else None,
        "margin": margin if kind == "soup" else None,
        "cut": cut if kind == "soup" else None,
        "trial_epochs": trial_epochs,
        "soup_judgements": judged,
        "stopped": stopped,
        "simulated_wall_s": round(clock, 1),
        "ingredients": len(soup.ingredients),
        "soup": soup.ingredients,
        "heldout": scores["heldout"],
        "test": scores["test"],
        "shift_mean": scores["shift_mean"],
        "decisions": decisions,
    }
    log(
        f"  {out['scheduler']:<22} {trial_epochs:>4} trial-epochs, {out['stopped']:>2} stopped, "
        f"soup of {out['ingredients']}: test {100 * out['test']:.1f} shift {100 * out['shift_mean']:.1f}"
    )
    return out


def fifo_trial_epochs(rec: Recording) -> int:
    return sum(t.ran for t in rec.tapes)


def summarise(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per scheduler label: mean and standard error over seeds of compute and soup, relative to FIFO."""
    labels = list(dict.fromkeys(r["scheduler"] for s in per_seed for r in s["replays"]))
    out: dict[str, Any] = {}
    for label in labels:
        rows, fifo = [], []
        for s in per_seed:
            mine = [r for r in s["replays"] if r["scheduler"] == label]
            base = [r for r in s["replays"] if r["kind"] == "fifo"]
            if mine and base:
                rows.append(mine[0])
                fifo.append(base[0])
        if not rows:
            continue

        def stat(values: list[float]) -> dict[str, float]:
            m = statistics.fmean(values)
            se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
            return {"mean": m, "se": se}

        out[label] = {
            "seeds": len(rows),
            "trial_epochs": stat([float(r["trial_epochs"]) for r in rows]),
            "compute_vs_fifo": stat([r["trial_epochs"] / f["trial_epochs"] for r, f in zip(rows, fifo, strict=True)]),
            "test": stat([100 * r["test"] for r in rows]),
            "shift_mean": stat([100 * r["shift_mean"] for r in rows]),
            "ingredients": stat([float(r["ingredients"]) for r in rows]),
            "test_minus_fifo": stat([100 * (r["test"] - f["test"]) for r, f in zip(rows, fifo, strict=True)]),
            "shift_minus_fifo": stat(
                [100 * (r["shift_mean"] - f["shift_mean"]) for r, f in zip(rows, fifo, strict=True)]
            ),
            "soup_judgements": stat([float(r["soup_judgements"]) for r in rows]),
            "simulated_wall_s": stat([float(r["simulated_wall_s"]) for r in rows]),
        }
    return out


def paired(per_seed: Sequence[Mapping[str, Any]], a: str, b: str, metric: str) -> dict[str, float]:
    """Mean and standard error over seeds of ``a - b`` on ``metric`` (points)."""
    diffs = []
    for s in per_seed:
        ra = [r for r in s["replays"] if r["scheduler"] == a]
        rb = [r for r in s["replays"] if r["scheduler"] == b]
        if ra and rb:
            diffs.append(100 * (ra[0][metric] - rb[0][metric]))
    m = statistics.fmean(diffs) if diffs else math.nan
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return {"mean": m, "se": se, "n": len(diffs)}


def torch_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
