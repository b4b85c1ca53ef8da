"""Scoring a classifier: logits over a split, accuracy, per-set results."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from .data import loader
from .label_space import class_groups_of, project_logits


def model_device(model: nn.Module) -> torch.device:
    """The device a model's parameters live on."""
    return next(model.parameters()).device


def pick_device(gpus: float = 1.0) -> str:
    """``cuda`` when a GPU is visible and the work was given one (or a fraction), else ``cpu``."""
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def scoring_autocast(device: str | torch.device, precision: str = "fp32") -> torch.autocast:
    """The autocast every held-out score of a run is computed under: bf16 on a GPU when the run's
    ``model.precision`` is bf16, fp32 otherwise (a CPU always scores in fp32).

    A trial's own held-out count (``train``) and the soup keeper's soup scores
    (``ingredients.Kitchen``) both come through here, so the greedy soup never
    compares a bf16 soup score with an fp32 candidate score.
    """
    kind = torch.device(device).type
    return torch.autocast(
        "cuda" if kind == "cuda" else "cpu", dtype=torch.bfloat16, enabled=kind == "cuda" and precision == "bf16"
    )


@torch.no_grad()
def iter_logits(
    model: nn.Module, ds: Dataset, batch_size: int = 256, num_workers: int = 0, precision: str = "fp32"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(logits, labels)`` on the CPU batch by batch (the model may be on a GPU), so a caller may stop early.

    ``precision`` is the run's ``model.precision`` (see :func:`scoring_autocast`).

    A dataset with ``class_groups`` (a shift with its own label space) gets its logits
    projected onto those groups (:func:`soup_ray.label_space.project_logits`), so its
    logits are ``[B, k]`` and its labels 0..k-1.
    """
    model.eval()
    device = model_device(model)
    groups = class_groups_of(ds)
    for x, y in loader(ds, batch_size, num_workers=num_workers):
        with scoring_autocast(device, precision):
            logits = model(x.to(device, non_blocking=True)).float().cpu()
        yield (logits if groups is None else project_logits(logits, groups)), y


@torch.no_grad()
def predict_logits(
    model: nn.Module, ds: Dataset, batch_size: int = 256, num_workers: int = 0, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits ``[N, C]`` and labels ``[N]`` of a split, in order (on the CPU); ``C`` is the
    projected width for a shift with ``class_groups``; ``precision`` as in :func:`iter_logits`."""
    parts = list(iter_logits(model, ds, batch_size, num_workers, precision))
    if not parts:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction."""
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(dim=1) == labels).float().mean())


def correct_count(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Number of top-1 hits."""
    return int((logits.argmax(dim=1) == labels).sum())
