"""The Tune schedulers of ``tune.scheduler``: fifo, Tune's ASHA, and the soup scheduler.

``SoupScheduler`` is a Tune ``FIFOScheduler`` that stops a trial at a rung
epoch when the pure rule :func:`soup_ray.soup.pruning.rung_verdict` says its
checkpoint there would lower the live greedy soup. The trial itself scores its
rung checkpoint against the soup the actor last published
(:mod:`soup_ray.soup_view`) and reports the signal with that epoch's result, so
``on_trial_result``, which runs in the driver's loop, decides at once and never
waits on the actor. A stopped trial's rung checkpoint is a full soup candidate:
``SoupCallback`` offers it like a finished trial.

Both ``asha`` and ``soup`` log every rung decision to ``RUN/scheduler.jsonl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from ..config import SweepConfig
from ..soup.pruning import rung_verdict


def _log(path: str | None, row: dict[str, Any]) -> None:
    if path is None:
        return
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError:  # the decision stands; only its log line is lost
        pass


def _rung_row(scheduler: str, trial: Any, result: dict[str, Any], decision: str, reason: str) -> dict[str, Any]:
    keys = ("soup_size", "soup_version", "soup_heldout_correct", "soup_with_trial_correct", "soup_gain")
    return {
        "time": time.time(),
        "scheduler": scheduler,
        "trial_id": trial.trial_id,
        "epoch": result.get("epoch"),
        "heldout_correct": result.get("heldout_correct"),
        "decision": decision,
        "reason": reason,
        **{k: result[k] for k in keys if k in result},
    }


class SoupScheduler(FIFOScheduler):
    """Stop a trial at a rung when its checkpoint there would cost the live greedy soup more than ``margin``
    held-out images or, with ``reduction_factor``, when its soup gain is below the rung's successive-halving
    cut-off; let every other trial run to its last epoch."""

    def __init__(
        self, margin: int | None = 20, reduction_factor: float | None = None, log_path: str | Path | None = None
    ):
        super().__init__()
        self.margin = None if margin is None else int(margin)
        self.reduction_factor = reduction_factor
        self.log_path = None if log_path is None else str(log_path)
        self.decisions: list[dict[str, Any]] = []
        self.gains: dict[int, list[int]] = {}  # rung -> the soup gains reported there so far
        self.judged = 0  # rung results that carried a soup score (one held-out evaluation pair each)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        rung = result.get("rung")
        if rung is None:
            return TrialScheduler.CONTINUE
        seen = self.gains.setdefault(int(rung), [])
        verdict = rung_verdict(result, self.margin, seen, self.reduction_factor)
        if result.get("soup_gain") is not None and result.get("soup_size"):
            seen.append(int(result["soup_gain"]))
            self.judged += 1
        decision = TrialScheduler.STOP if verdict.stop else TrialScheduler.CONTINUE
        row = _rung_row("soup", trial, result, decision, verdict.reason)
        self.decisions.append(row)
        _log(self.log_path, row)
        return decision

    def debug_string(self) -> str:
        stopped = sum(d["decision"] == TrialScheduler.STOP for d in self.decisions)
        return f"Using SoupScheduler: {stopped} of {len(self.decisions)} rung decisions stopped a trial"


class LoggingASHA(ASHAScheduler):
    """Tune's ``ASHAScheduler``, unchanged, with each decision at a rung result logged like the soup scheduler's."""

    def __init__(self, *args: Any, log_path: str | Path | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.log_path = None if log_path is None else str(log_path)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if result.get("rung") is not None:
            why = "below the rung's cut-off" if decision == TrialScheduler.STOP else "at or above the rung's cut-off"
            _log(self.log_path, _rung_row("asha", trial, result, decision, f"held-out accuracy {why}"))
        return decision


def make_scheduler(cfg: SweepConfig, log_path: Path | None = None) -> TrialScheduler | None:
    """The Tune scheduler ``cfg.tune.scheduler`` names (None for fifo: Tune's default)."""
    t = cfg.tune
    if t.scheduler == "fifo":
        return None
    if t.scheduler == "soup":
        return SoupScheduler(t.soup_margin, t.reduction_factor if t.soup_cut else None, log_path)
    return LoggingASHA(
        time_attr="epoch",
        max_t=cfg.search_space.max_epochs(),
        grace_period=t.grace_period,
        reduction_factor=t.reduction_factor,
        log_path=log_path,
    )
