"""Scoring a classifier: logits over a split, accuracy, per-set results."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from .data import loader


@torch.no_grad()
def iter_logits(model: nn.Module, ds: Dataset, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(logits, labels)`` batch by batch, so a caller may stop early."""
    model.eval()
    for x, y in loader(ds, batch_size):
        yield model(x).float(), y


@torch.no_grad()
def predict_logits(model: nn.Module, ds: Dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits ``[N, C]`` and labels ``[N]`` of a split, in order."""
    parts = list(iter_logits(model, ds, batch_size))
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
