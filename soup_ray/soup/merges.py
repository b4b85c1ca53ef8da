"""Task-vector merges relative to a shared base: WiSE-FT, task arithmetic, TIES, DARE and Model Stock.

A task vector is ``theta_i - base`` per floating tensor. Every merge works in
(at least) fp32 and casts each tensor back to the base's dtype; non-floating
tensors (integer or boolean buffers) must be identical in every input and are
copied from the base. Ingredients are mappings or zero-argument loaders, read
one at a time: memory holds the base, a few model-sized running buffers and
one loaded ingredient, never all N models.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .average import StateDictSource, accumulator_dtype, is_averaged
from .base import SoupError, StateDict, key_set_difference

# ---------------------------------------------------------------------------
# Loading and checking inputs
# ---------------------------------------------------------------------------


def load_state(item: StateDictSource, what: str) -> StateDict:
    """The mapping itself, or what its loader returns (which must be a mapping)."""
    state = item if isinstance(item, Mapping) else item()
    if not isinstance(state, Mapping):
        raise SoupError(f"{what}: loader returned {type(state).__name__}, expected a mapping")
    return state


@dataclass
class Layout:
    """What every input must share with a reference: keys, shapes, kinds and the non-floating buffers' values."""

    order: list[str]
    shapes: dict[str, torch.Size]
    dtypes: dict[str, torch.dtype]
    exact: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, state: StateDict, what: str) -> Layout:
        """The layout of ``state`` (non-floating buffers are cloned, floating tensors are not kept)."""
        if not state:
            raise SoupError(f"{what} is an empty state dict")
        for key, value in state.items():
            check_tensor(key, value, what)
        return cls(
            order=list(state),
            shapes={k: v.shape for k, v in state.items()},
            dtypes={k: v.dtype for k, v in state.items()},
            exact={k: v.detach().clone() for k, v in state.items() if not is_averaged(v)},
        )

    @property
    def floating(self) -> list[str]:
        """The merged (floating) keys, in the reference's order."""
        return [k for k in self.order if k not in self.exact]

    def check(self, state: StateDict, what: str) -> None:
        """Raise :class:`SoupError` naming what differs between ``state`` and this layout."""
        for key, value in state.items():
            check_tensor(key, value, what)
        difference = key_set_difference(self.order, state)
        if difference:
            raise SoupError(f"{what} has a different key set ({difference})")
        bad = [
            f"{k!r}: {tuple(self.shapes[k])} vs {tuple(state[k].shape)}"
            for k in self.order
            if state[k].shape != self.shapes[k]
        ]
        if bad:
            raise SoupError(f"{what} has mismatched shapes: " + "; ".join(bad))
        for key in self.order:
            if is_averaged(state[key]) == (key in self.exact):
                raise SoupError(f"{what}: key {key!r} changes kind ({self.dtypes[key]} vs {state[key].dtype})")
        for key, ref in self.exact.items():
            value = state[key].detach()
            if value.dtype != ref.dtype or not torch.equal(value.to(ref.device), ref):
                raise SoupError(
                    f"{what}: non-floating buffer {key!r} differs; integer/boolean tensors "
                    "cannot be merged and must be identical in every input"
                )

    def copies(self) -> dict[str, Tensor]:
        """Fresh copies of the non-floating buffers."""
        return {k: v.clone() for k, v in self.exact.items()}


def check_tensor(key: str, value: Any, what: str) -> None:
    """Raise :class:`SoupError` unless ``value`` is a tensor."""
    if not isinstance(value, Tensor):
        raise SoupError(f"{what}: value for key {key!r} is not a tensor: {type(value).__name__}")


def ingredient_list(ingredients: Iterable[StateDictSource], method: str) -> list[StateDictSource]:
    """The ingredients as a list (loaders are cheap to hold); at least one is required."""
    items = list(ingredients)
    if not items:
        raise SoupError(f"{method} needs at least one ingredient")
    return items


def real_floating(key: str, value: Tensor, method: str) -> None:
    """Raise :class:`SoupError` for complex tensors, which have no sign or cosine here."""
    if value.is_complex():
        raise SoupError(f"{method} cannot merge complex tensor {key!r}")


def as_acc(value: Tensor, like: Tensor) -> Tensor:
    """``value`` on ``like``'s device in the accumulator dtype of ``like`` (may alias ``value``: never mutate it)."""
    return value.detach().to(like.device, accumulator_dtype(like.dtype))


def finish(base: StateDict, layout: Layout, merged: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The merged floating tensors cast to the base's dtypes, the buffers copied, in the base's key order."""
    exact = layout.copies()
    return {k: exact[k] if k in exact else merged[k].to(base[k].dtype) for k in layout.order}


def prepare(base: StateDictSource, method: str) -> tuple[StateDict, Layout]:
    """The loaded base and its layout."""
    state = load_state(base, f"{method}: the base")
    return state, Layout.of(state, f"{method}: the base")


def task_vector(base: StateDict, state: StateDict) -> dict[str, Tensor]:
    """``state - base`` per floating tensor, in fp32 or wider (non-floating keys are left out)."""
    layout = Layout.of(base, "task_vector: the base")
    layout.check(state, "task_vector: the model")
    with torch.no_grad():
        return {k: as_acc(state[k], base[k]) - as_acc(base[k], base[k]) for k in layout.floating}


# ---------------------------------------------------------------------------
# WiSE-FT and task arithmetic
# ---------------------------------------------------------------------------


def wise_ft(base: StateDictSource, target: StateDictSource, alpha: float) -> dict[str, Tensor]:
    """WiSE-FT: ``(1 - alpha) * base + alpha * target``; alpha 0 gives the base and 1 the target, exactly."""
    if not math.isfinite(alpha):
        raise SoupError(f"wise_ft: alpha must be finite, got {alpha!r}")
    base, layout = prepare(base, "wise_ft")
    state = load_state(target, "wise_ft: the target")
    layout.check(state, "wise_ft: the target")
    merged = {}
    with torch.no_grad():
        for key in layout.floating:
            b = base[key]
            merged[key] = as_acc(b, b) * (1.0 - alpha) + as_acc(state[key], b) * alpha
    return finish(base, layout, merged)


def task_arithmetic(base: StateDictSource, ingredients: Iterable[StateDictSource], scale: float) -> dict[str, Tensor]:
    """Task arithmetic: ``base + scale * sum_i (theta_i - base)``, streaming one ingredient at a time."""
    base, layout = prepare(base, "task_arithmetic")
    sums, _ = sum_task_vectors(base, layout, ingredients, "task_arithmetic")
    with torch.no_grad():
        merged = {k: as_acc(base[k], base[k]) + scale * acc for k, acc in sums.items()}
    return finish(base, layout, merged)


def sum_task_vectors(
    base: StateDict,
    layout: Layout,
    ingredients: Iterable[StateDictSource],
    method: str,
    transform: Callable[[int, str, Tensor], Tensor] | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Sum of the ingredients' task vectors per floating key (``transform(index, key, delta)`` applied first),
    loading one ingredient at a time; returns the sums and the number of ingredients (at least one)."""
    sums = {
        k: torch.zeros(base[k].shape, dtype=accumulator_dtype(base[k].dtype), device=base[k].device)
        for k in layout.floating
    }
    count = 0
    with torch.no_grad():
        for i, item in enumerate(ingredients):
            state = load_state(item, f"{method}: ingredient {i}")
            layout.check(state, f"{method}: ingredient {i}")
            for key, acc in sums.items():
                delta = as_acc(state[key], base[key]) - as_acc(base[key], base[key])
                acc.add_(delta if transform is None else transform(i, key, delta))
            del state
            count += 1
    if count == 0:
        raise SoupError(f"{method} needs at least one ingredient")
    return sums, count


# ---------------------------------------------------------------------------
# TIES
# ---------------------------------------------------------------------------


def trim_count(numel: int, density: float) -> int:
    """``k = ceil(density * numel)`` (the product rounded to 6 decimals first, so 0.3 * 10 keeps 3), in [1, numel]."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(round(density * numel, 6))))


def trim_by_magnitude(vector: Tensor, density: float) -> Tensor:
    """Keep the ``trim_count(numel, density)`` largest ``|values|`` of ``vector``, zero the rest.

    Ties at the threshold are broken by position: the earlier flat index is kept.
    """
    if not 0.0 < density <= 1.0:
        raise SoupError(f"density must be in (0, 1], got {density!r}")
    flat = vector.reshape(-1)
    k = trim_count(flat.numel(), density)
    if k == flat.numel():
        return vector.clone()
    keep = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(vector.shape)


def ties_merge(
    base: StateDictSource, ingredients: Iterable[StateDictSource], density: float, scale: float = 1.0
) -> dict[str, Tensor]:
    """TIES merging (Yadav et al. 2023), element by element of each floating tensor:

    1. trim: ``tau_i = trim_by_magnitude(theta_i - base, density)`` keeps the
       ``k = ceil(density * numel)`` largest magnitudes of that tensor, zeroing the others;
    2. elect: ``s = sign(sum_i tau_i)`` (0 where the sum is 0);
    3. disjoint mean: the mean of ``tau_i`` over the ingredients with ``tau_i != 0`` and
       ``sign(tau_i) == s``, or 0 where there is none;
    4. result: ``base + scale * merged``.

    Streams in two passes over the ingredients (each loaded twice, one at a
    time): the first sums the trimmed vectors to elect the signs, the second
    re-trims and accumulates the agreeing values and their count. Ingredients
    are held as a list, so pass loaders (not a generator of loaded models)
    to keep memory at the base, three model-sized buffers and one model.
    """
    if not 0.0 < density <= 1.0:
        raise SoupError(f"ties_merge: density must be in (0, 1], got {density!r}")
    base, layout = prepare(base, "ties_merge")
    items = ingredient_list(ingredients, "ties_merge")
    keys = layout.floating
    for key in keys:
        real_floating(key, base[key], "ties_merge")
    with torch.no_grad():
        votes = {
            k: torch.zeros(base[k].shape, dtype=accumulator_dtype(base[k].dtype), device=base[k].device) for k in keys
        }
        for i, item in enumerate(items):
            tau = trimmed_vector(base, layout, item, density, f"ties_merge: ingredient {i}")
            for key in keys:
                votes[key].add_(tau[key])
            del tau
        elected = {k: torch.sign(v).to(torch.int8) for k, v in votes.items()}
        del votes
        totals = {k: torch.zeros_like(base[k], dtype=accumulator_dtype(base[k].dtype)) for k in keys}
        counts = {k: torch.zeros(base[k].shape, dtype=torch.int32, device=base[k].device) for k in keys}
        for i, item in enumerate(items):
            tau = trimmed_vector(base, layout, item, density, f"ties_merge: ingredient {i}")
            for key in keys:
                agree = (tau[key] != 0) & (torch.sign(tau[key]).to(torch.int8) == elected[key])
                totals[key].add_(torch.where(agree, tau[key], torch.zeros_like(tau[key])))
                counts[key].add_(agree.to(torch.int32))
            del tau
        merged = {}
        for key in keys:
            mean = totals[key] / counts[key].clamp(min=1).to(totals[key].dtype)
            merged[key] = as_acc(base[key], base[key]) + scale * mean
    return finish(base, layout, merged)


def trimmed_vector(
    base: StateDict, layout: Layout, item: StateDictSource, density: float, what: str
) -> dict[str, Tensor]:
    """Load one ingredient and return its trimmed task vector per floating key (the loaded model is released)."""
    state = load_state(item, what)
    layout.check(state, what)
    return {
        k: trim_by_magnitude(as_acc(state[k], base[k]) - as_acc(base[k], base[k]), density) for k in layout.floating
    }


# ---------------------------------------------------------------------------
# DARE
# ---------------------------------------------------------------------------


def dare_seed(seed: int, index: int, key: str) -> int:
    """The drop seed of ingredient ``index``'s tensor ``key``: a 63-bit BLAKE2b digest of the three, so dict order does not matter."""
    digest = hashlib.blake2b(f"{seed}\0{index}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def dare_mask(shape: torch.Size, drop_rate: float, seed: int) -> Tensor:
    """A boolean keep-mask: each element kept with probability ``1 - drop_rate`` (a CPU generator seeded with ``seed``)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen) >= drop_rate


def dare_merge(
    base: StateDictSource, ingredients: Iterable[StateDictSource], drop_rate: float, scale: float = 1.0, seed: int = 0
) -> dict[str, Tensor]:
    """DARE (Yu et al. 2023): ``base + scale * mean_i(mask_i * (theta_i - base) / (1 - drop_rate))``.

    Each task-vector element is dropped with probability ``drop_rate``; the mask
    of ingredient ``i``'s tensor ``key`` comes from ``dare_seed(seed, i, key)``,
    so the same seed and ingredient order give the same output whatever the
    dict order. drop_rate 0 keeps everything (the mean of the task vectors).
    """
    if not 0.0 <= drop_rate < 1.0:
        raise SoupError(f"dare_merge: drop_rate must be in [0, 1), got {drop_rate!r}")
    base, layout = prepare(base, "dare_merge")
    keep_scale = 1.0 / (1.0 - drop_rate)

    def drop_and_rescale(i: int, key: str, delta: Tensor) -> Tensor:
        mask = dare_mask(delta.shape, drop_rate, dare_seed(seed, i, key)).to(delta.device)
        return torch.where(mask, delta * keep_scale, torch.zeros_like(delta))

    sums, count = sum_task_vectors(
        base, layout, ingredients, "dare_merge", drop_and_rescale if drop_rate > 0.0 else None
    )
    with torch.no_grad():
        merged = {k: as_acc(base[k], base[k]) + (scale / count) * acc for k, acc in sums.items()}
    return finish(base, layout, merged)


# ---------------------------------------------------------------------------
# Model Stock
# ---------------------------------------------------------------------------


def model_stock_ratio(cos: float, n: int) -> float:
    """``t = n * cos / (1 + (n - 1) * cos)`` with cos clamped to [0, 1] (NaN counts as 0); 1 for one model."""
    if n < 1:
        raise SoupError(f"model_stock_ratio needs n >= 1, got {n}")
    if n == 1:
        return 1.0
    c = 0.0 if math.isnan(cos) else min(1.0, max(0.0, cos))
    return n * c / (1.0 + (n - 1) * c)


def model_stock(
    base: StateDictSource, ingredients: Iterable[StateDictSource]
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Model Stock (Jang et al. 2024) per floating tensor: ``t * mean_i(theta_i) + (1 - t) * base``.

    The paper's two-model ratio is ``t = 2 cos / (1 + cos)`` and its N-model
    one ``t = N cos / (1 + (N - 1) cos)``, with cos the (assumed common) cosine
    of the angle between task vectors. Here cos is the mean of the pairwise
    cosines over all ``i < j`` pairs of task vectors ``theta_i - base``,
    computed in one pass from the sum of unit task vectors ``U``:
    ``sum_{i<j} cos_ij = (|U|^2 - nonzero) / 2``. A zero task vector has no
    direction: its cosines count as 0 (orthogonal). The mean is clamped to
    [0, 1] (negative means opposed fine-tunes, so t = 0, the base). One
    ingredient gives t = 1 (the ingredient itself).

    Returns the merged state and ``t`` per floating key.
    """
    base, layout = prepare(base, "model_stock")
    keys = layout.floating
    for key in keys:
        real_floating(key, base[key], "model_stock")
    sums = {k: torch.zeros(base[k].shape, dtype=accumulator_dtype(base[k].dtype), device=base[k].device) for k in keys}
    units = {k: torch.zeros_like(v) for k, v in sums.items()}
    nonzero = dict.fromkeys(keys, 0)
    count = 0
    with torch.no_grad():
        for i, item in enumerate(ingredients):
            state = load_state(item, f"model_stock: ingredient {i}")
            layout.check(state, f"model_stock: ingredient {i}")
            for key in keys:
                nonzero[key] += stock_add(sums[key], units[key], state[key], base[key])
            del state
            count += 1
        if count == 0:
            raise SoupError("model_stock needs at least one ingredient")
        merged, ratios = {}, {}
        for key in keys:
            t = model_stock_ratio(mean_pairwise_cosine(units[key], nonzero[key], count), count)
            ratios[key] = t
            merged[key] = (sums[key] / count) * t + as_acc(base[key], base[key]) * (1.0 - t)
    return finish(base, layout, merged), ratios


def stock_add(total: Tensor, unit_sum: Tensor, theta: Tensor, base: Tensor) -> int:
    """Add ``theta`` to ``total`` and its unit task vector to ``unit_sum``; 1 if the task vector is nonzero, else 0."""
    value = as_acc(theta, base)
    total.add_(value)
    delta = value - as_acc(base, base)
    norm = float(delta.to(torch.float64).norm())
    if norm > 0.0 and math.isfinite(norm):
        unit_sum.add_(delta / norm)
        return 1
    return 0


def mean_pairwise_cosine(unit_sum: Tensor, nonzero: int, n: int) -> float:
    """The mean cosine over the ``n (n - 1) / 2`` pairs, from the sum of the ``nonzero`` unit vectors (NaN if n < 2)."""
    if n < 2:
        return math.nan
    squared = float(unit_sum.to(torch.float64).pow(2).sum())
    return (squared - nonzero) / (n * (n - 1))
