"""Streaming uniform weight average: one fp32 running sum, one ingredient loaded at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .base import SoupError, StateDict, key_set_difference


def is_averaged(t: Tensor) -> bool:
    """Whether a tensor is averaged (floating/complex) or must match exactly."""
    return t.is_floating_point() or t.is_complex()


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 accumulate in fp32; wider types keep their width."""
    return torch.promote_types(dtype, torch.float32)


class RunningAverage:
    """Streaming uniform average of state dicts.

    Only one fp32 running sum is kept, so callers can load one model at a time.
    Floating tensors are averaged in (at least) float32 and cast back to the
    dtype they had in the first ingredient.  Non-floating tensors (integer or
    boolean buffers) are not averaged: they must be identical everywhere.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._exact: dict[str, Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._shapes: dict[str, torch.Size] = {}
        self._order: list[str] = []
        self._count = 0

    @property
    def count(self) -> int:
        """Number of state dicts added so far."""
        return self._count

    def add(self, state_dict: StateDict) -> None:
        """Add one ingredient; raises :class:`SoupError` if it does not match."""
        if self._count == 0:
            self._start(state_dict)
        else:
            self._validate(state_dict)
            with torch.no_grad():
                for key, acc in self._sums.items():
                    acc.add_(state_dict[key].detach().to(acc.device, acc.dtype))
        self._count += 1

    def result(self) -> dict[str, Tensor]:
        """The average so far, with each key's original dtype restored."""
        if self._count == 0:
            raise SoupError("cannot average zero state dicts")
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for key in self._order:
                if key in self._sums:
                    mean = self._sums[key] / self._count
                    out[key] = mean.to(self._dtypes[key])
                else:
                    out[key] = self._exact[key].clone()
        return out

    def _start(self, state_dict: StateDict) -> None:
        if not state_dict:
            raise SoupError("state dict is empty")
        for key, value in state_dict.items():
            self._check_tensor(key, value)
            self._order.append(key)
            self._dtypes[key] = value.dtype
            self._shapes[key] = value.shape
            tensor = value.detach()
            if is_averaged(tensor):
                dtype = accumulator_dtype(tensor.dtype)
                self._sums[key] = tensor.to(dtype=dtype, copy=True)
            else:
                self._exact[key] = tensor.clone()

    def _validate(self, state_dict: StateDict) -> None:
        """Check keys, shapes and exact buffers before mutating the sum."""
        for key, value in state_dict.items():
            self._check_tensor(key, value)
        difference = key_set_difference(self._order, state_dict)
        if difference:
            raise SoupError(f"ingredient {self._count} has a different key set ({difference})")
        bad_shapes = [
            f"{key!r}: {tuple(self._shapes[key])} vs {tuple(state_dict[key].shape)}"
            for key in self._order
            if state_dict[key].shape != self._shapes[key]
        ]
        if bad_shapes:
            raise SoupError(f"ingredient {self._count} has mismatched shapes: " + "; ".join(bad_shapes))
        for key in self._order:
            value = state_dict[key]
            if is_averaged(value) != (key in self._sums):
                raise SoupError(f"key {key!r} changes kind: {self._dtypes[key]} vs {value.dtype}")
        for key, ref in self._exact.items():
            value = state_dict[key].detach()
            if value.dtype != ref.dtype or not torch.equal(value.to(ref.device), ref):
                raise SoupError(
                    f"non-floating buffer {key!r} differs in ingredient {self._count}; "
                    "integer/boolean tensors cannot be averaged and must be identical"
                )

    @staticmethod
    def _check_tensor(key: str, value: Any) -> None:
        if not isinstance(value, Tensor):
            raise SoupError(f"value for key {key!r} is not a tensor: {type(value).__name__}")


StateDictSource = StateDict | Callable[[], StateDict]


def average_state_dicts(items: Iterable[StateDictSource]) -> dict[str, Tensor]:
    """Uniformly average state dicts given as mappings or zero-arg loaders.

    Items are consumed one at a time, so with loaders only one model plus the
    running sum are held in memory.
    """
    avg = RunningAverage()
    for item in items:
        state = item if isinstance(item, Mapping) else item()
        if not isinstance(state, Mapping):
            raise SoupError(f"loader returned {type(state).__name__}, expected a mapping")
        avg.add(state)
        del state
    return avg.result()


# ---------------------------------------------------------------------------
