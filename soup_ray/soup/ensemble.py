"""Logit ensembles from cached per-model logits: the uniform ensemble and the greedy ensemble."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .average import accumulator_dtype
from .base import GreedyResult, SoupError, Step, Tie, check_tie, fmt_names
from .greedy import accept


def _check_logits(logits: Tensor, shape: torch.Size | None, name: str) -> None:
    if logits.dim() != 2:
        raise SoupError(f"logits {name} must be [n_images, n_classes], got {tuple(logits.shape)}")
    if shape is not None and logits.shape != shape:
        raise SoupError(f"logits {name} have shape {tuple(logits.shape)}, expected {tuple(shape)}")


def logit_ensemble(logits_list: Sequence[Tensor]) -> Tensor:
    """Mean of per-model logits ``[n_images, n_classes]`` (computed in at least fp32)."""
    if not logits_list:
        raise SoupError("logit ensemble needs at least one model")
    first = logits_list[0]
    _check_logits(first, None, "0")
    total = first.detach().to(dtype=accumulator_dtype(first.dtype), copy=True)
    for i, logits in enumerate(logits_list[1:], start=1):
        _check_logits(logits, first.shape, str(i))
        total.add_(logits.detach().to(total.device, total.dtype))
    return total / len(logits_list)


def _count_correct(logit_sum: Tensor, n_models: int, labels: Tensor) -> int:
    preds = (logit_sum / n_models).argmax(dim=-1)
    return int((preds == labels.to(preds.device)).sum())


def greedy_ensemble(
    candidate_ids_sorted: Sequence[str],
    heldout_logits: Mapping[str, Tensor],
    heldout_labels: Tensor,
    tie: Tie = ">=",
) -> GreedyResult:
    """Greedy ensemble: like greedy soup, but on averaged held-out logits.

    Candidates are taken in the given order; the first always starts the
    ensemble.  Returns the chosen ids and their held-out correct count.
    """
    check_tie(tie)
    ids = list(candidate_ids_sorted)
    if not ids:
        raise SoupError("greedy ensemble needs at least one candidate")
    if len(set(ids)) != len(ids):
        raise SoupError("duplicate candidate ids")
    missing = [i for i in ids if i not in heldout_logits]
    if missing:
        raise SoupError(f"no held-out logits for {fmt_names(missing)}")
    n_images = heldout_labels.shape[0]
    first = heldout_logits[ids[0]]
    _check_logits(first, None, repr(ids[0]))
    if heldout_labels.dim() != 1 or first.shape[0] != n_images:
        raise SoupError(f"labels {tuple(heldout_labels.shape)} do not match logits {tuple(first.shape)}")
    total = first.detach().to(dtype=accumulator_dtype(first.dtype), copy=True)
    chosen = [ids[0]]
    correct = _count_correct(total, 1, heldout_labels)
    history = [Step(ids[0], 0, correct, True, 0, correct)]
    for position, cid in enumerate(ids[1:], start=1):
        logits = heldout_logits[cid]
        _check_logits(logits, first.shape, repr(cid))
        trial = total + logits.detach().to(total.device, total.dtype)
        trial_correct = _count_correct(trial, len(chosen) + 1, heldout_labels)
        ok = accept(trial_correct, correct, tie)
        if ok:
            total, correct = trial, trial_correct
            chosen.append(cid)
        history.append(Step(cid, position, trial_correct, ok, n_images, correct))
    n_evals = len(ids) - 1
    return GreedyResult(chosen, correct, history, n_evals, n_evals * n_images)


# ---------------------------------------------------------------------------
# Registry of soup methods
