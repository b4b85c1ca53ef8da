"""The function Ray Tune runs in each trial: fine-tune the shared base with one hyperparameter draw."""

from __future__ import annotations

import os
from typing import Any

from ray import tune

from ..train import TrialContext, fine_tune


def tune_trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """Entry point Ray Tune calls in each trial (wrap with ``tune.with_parameters``)."""
    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fine_tune(config, ctx, report)
