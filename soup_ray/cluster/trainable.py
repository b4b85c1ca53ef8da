"""The function Ray Tune runs in each trial: fine-tune the shared base with one hyperparameter draw."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ..train import TrialContext, fine_tune, finished_result
from ..trial_state import has_training_state


def tune_trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """Entry point Ray Tune calls in each trial (wrap with ``tune.with_parameters``).

    A trial Tune restarts (a lost node, ``max_failures``, a resumed sweep) gets its
    last per-epoch checkpoint from ``tune.get_checkpoint()`` and continues there.
    One restarted after its final checkpoint reports that result and checkpoint
    again without training, so Tune records it as completed (retraining from
    epoch 1 would waste it, and Tune could then delete the final checkpoint the
    soup actor points at).
    """

    # on a cluster: which node trained each epoch (asked only inside a Ray worker: never starts a Ray)
    where = {"node_id": ray.get_runtime_context().get_node_id()} if ray.is_initialized() else {}

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report({**metrics, **where}, checkpoint=ckpt)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    keep = None
    if ctx.epochs_dir:  # tune.keep_epoch_candidates: every epoch's candidate, for replaying schedulers
        keep = Path(ctx.epochs_dir) / tune.get_context().get_trial_id()
    last = tune.get_checkpoint()
    if last is None:
        fine_tune(config, ctx, report, epoch_candidates=keep)
        return
    with last.as_directory() as folder:
        if has_training_state(folder):
            fine_tune(config, ctx, report, resume_from=folder, epoch_candidates=keep)
            return
        final = finished_result(folder, config)
        if final is not None:  # it had finished: report that again, nothing to train
            report(final, folder)
            return
    fine_tune(config, ctx, report, epoch_candidates=keep)  # nothing this trial can continue from: train afresh
