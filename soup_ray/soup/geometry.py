"""Where fine-tuned models sit relative to each other and to their base: interpolation, barriers, distances.

Two fine-tuned models can be averaged when the straight line between them
stays in one basin of low loss (held-out accuracy does not dip in between).
The barrier is how far the midpoint falls below the mean of the two ends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .average import accumulator_dtype, is_averaged
from .base import SoupError

StateDict = Mapping[str, Tensor]


def lerp_state_dicts(a: StateDict, b: StateDict, alpha: float) -> dict[str, Tensor]:
    """``(1 - alpha) * a + alpha * b`` for floating tensors (in fp32, cast back); other tensors must be equal."""
    if set(a) != set(b):
        raise SoupError("cannot interpolate state dicts with different keys")
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, va in a.items():
            vb = b[key]
            if va.shape != vb.shape:
                raise SoupError(f"cannot interpolate {key!r}: shapes {tuple(va.shape)} and {tuple(vb.shape)}")
            if not is_averaged(va):
                if not torch.equal(va, vb.to(va.device)):
                    raise SoupError(f"non-floating buffer {key!r} differs between the two models")
                out[key] = va.clone()
                continue
            dt = accumulator_dtype(va.dtype)
            mixed = va.to(dt) * (1.0 - alpha) + vb.to(va.device, dt) * alpha
            out[key] = mixed.to(va.dtype)
    return out


def barrier_height(alphas: Sequence[float], accuracies: Sequence[float]) -> float:
    """How far accuracy at the midpoint (alpha = 0.5) falls below the mean of the two ends (0 if it does not).

    ``alphas`` must include 0, 0.5 and 1; accuracies in any unit (fractions or points).
    """
    points = dict(zip(alphas, accuracies, strict=True))
    try:
        ends, mid = (points[0.0] + points[1.0]) / 2, points[0.5]
    except KeyError:
        raise SoupError("barrier_height needs accuracies at alpha = 0, 0.5 and 1") from None
    return max(0.0, ends - mid)


def relative_distance(state: StateDict, base: StateDict) -> float:
    """``||state - base|| / ||base||`` over the floating tensors both share (the relative L2 of the change)."""
    num = den = 0.0
    with torch.no_grad():
        for key, v0 in base.items():
            if key not in state or not is_averaged(v0):
                continue
            d0 = v0.detach().to(torch.float64)
            num += float((state[key].detach().to(torch.float64) - d0).pow(2).sum())
            den += float(d0.pow(2).sum())
    if den == 0.0:
        raise SoupError("the base has no floating weights to measure a distance against")
    return math.sqrt(num) / math.sqrt(den)
