"""What a trial's checkpoint at a rung epoch would do to the live soup: the soup scheduler's signal.

At a rung (``tune.scheduler: soup``) the trial scores, on the held-out split,
the greedy soup the soup actor last published and that soup with the trial's
current weights added as one more ingredient (``(n * soup + trial) / (n + 1)``,
exactly the uniform soup greedy would test). The difference in held-out images
(``soup_gain``) travels with the trial's result, so the scheduler decides in the
driver without waiting on anyone. ``bench/soup_aware.py`` replays schedulers
through the same :func:`gain_against` with recorded checkpoints.

No Ray: the trainable calls :func:`rung_signals`, the bench calls :func:`gain_against`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .evaluate import correct_count, predict_logits
from .run_dir import SOUP_INFO
from .soup.geometry import lerp_state_dicts

StateDict = dict[str, torch.Tensor]


def published_soup(run_dir: Path) -> tuple[StateDict, dict[str, Any]] | None:
    """The weights (as the trials' classifier state dict) and ``soup.json`` of the soup the actor published last,
    read from its immutable version folder; None before the first soup."""
    from .export import load_soup
    from .run_dir import RunDir

    paths = RunDir(run_dir)
    try:
        info = json.loads((paths.soup / SOUP_INFO).read_text())
    except (OSError, ValueError):
        return None
    version = info.get("version")
    folder = paths.version(int(version)) if isinstance(version, int) else paths.soup
    if not folder.is_dir():
        folder = paths.soup
    model, info = load_soup(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, info


def heldout_correct(model: nn.Module, state: StateDict, heldout: Dataset, batch_size: int, precision: str) -> int:
    """Held-out images ``model`` gets right with the weights ``state`` (loaded into it; the caller restores)."""
    model.load_state_dict(state)
    logits, labels = predict_logits(model, heldout, batch_size, precision=precision)
    return correct_count(logits, labels)


def gain_against(
    model: nn.Module,
    candidate: StateDict,
    soup: StateDict,
    soup_size: int,
    heldout: Dataset,
    batch_size: int = 256,
    precision: str = "fp32",
    soup_correct: int | None = None,
) -> dict[str, int]:
    """Held-out correct counts of the soup and of the soup with ``candidate`` as one more uniform ingredient.

    ``model`` is a classifier of the same architecture used as scratch space; its weights are restored.
    ``soup_correct``: the soup's own count when the caller has it from this function already.
    Returns ``soup_heldout_correct``, ``soup_with_trial_correct`` and their difference ``soup_gain``.
    """
    keep = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            if soup_correct is None:
                soup_correct = heldout_correct(model, soup, heldout, batch_size, precision)
            mixed = lerp_state_dicts(soup, candidate, 1.0 / (soup_size + 1))
            with_correct = heldout_correct(model, mixed, heldout, batch_size, precision)
    finally:
        model.load_state_dict(keep)
    return {
        "soup_heldout_correct": soup_correct,
        "soup_with_trial_correct": with_correct,
        "soup_gain": with_correct - soup_correct,
    }


def rung_signals(
    model: nn.Module, run_dir: Path, heldout: Dataset, batch_size: int = 256, precision: str = "fp32"
) -> dict[str, Any]:
    """The soup signals of ``model``'s current weights against the published soup (``soup_size`` 0 before one).

    A soup that cannot be read (being replaced, a lost mount) gives ``soup_size`` 0 and ``soup_error``:
    the scheduler then lets the trial go on, which never loses a candidate.
    """
    try:
        found = published_soup(run_dir)
    except Exception as err:  # noqa: BLE001 - no verdict is better than a failed trial
        return {"soup_size": 0, "soup_error": f"{type(err).__name__}: {err}"[:300]}
    if found is None:
        return {"soup_size": 0}
    soup, info = found
    n = len(info.get("ingredients") or [])
    if n == 0:
        return {"soup_size": 0}
    candidate = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, Any] = {"soup_size": n, "soup_version": info.get("version")}
    out.update(gain_against(model, candidate, soup, n, heldout, batch_size, precision))
    return out
