"""The learned soup (Wortsman et al. 2022) with streamed gradients: memory does not grow with the ingredients.

The soup is ``theta(alpha) = sum_i alpha_i * theta_i`` with ``alpha`` the
softmax over ingredients of logits ``beta``: one per ingredient
(``by_layer=False``) or one per ingredient and floating tensor
(``by_layer=True``, columns in :func:`soup_keys` order). ``beta = 0`` is the
uniform soup. Since ``dL/dalpha_i = <dL/dtheta, theta_i>`` (per key), a step
never needs the ingredients together:

1. stream the ingredients into the running weighted sum ``theta(alpha)``;
2. ``loss_and_grad(theta)`` returns the held-out loss and ``dL/dtheta``;
3. stream the ingredients again for the inner products ``<g_key, theta_i,key>``;
4. chain through the softmax: ``dL/dbeta_i = alpha_i (dL/dalpha_i - sum_j alpha_j dL/dalpha_j)``;
5. an Adam step on ``beta``.

Each step loads every ingredient twice, one at a time; memory holds the fp32
running sum, the gradient and one loaded model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .average import StateDictSource, accumulator_dtype, is_averaged
from .base import SoupError, StateDict, fmt_names
from .merges import Layout, ingredient_list, load_state

LossAndGrad = Callable[[dict[str, Tensor]], tuple[float | Tensor, Mapping[str, Tensor]]]
"""``loss_and_grad(theta) -> (loss, grads)``: the held-out loss at ``theta`` and ``dL/dtheta`` per floating key.

A key missing from ``grads`` has zero gradient (e.g. a floating buffer).
"""


def soup_keys(state: StateDict) -> list[str]:
    """The floating keys of ``state``, sorted: the columns of per-tensor (``by_layer``) coefficients."""
    return sorted(k for k, v in state.items() if isinstance(v, Tensor) and is_averaged(v))


def check_coeffs(coeffs: Tensor, n: int, what: str) -> Tensor:
    """``coeffs`` as a float64 CPU tensor of shape [N] or [N, K]."""
    if not isinstance(coeffs, Tensor) or coeffs.ndim not in (1, 2) or coeffs.shape[0] != n:
        shape = tuple(coeffs.shape) if isinstance(coeffs, Tensor) else type(coeffs).__name__
        raise SoupError(f"{what}: coefficients must have shape [{n}] or [{n}, K], got {shape}")
    return coeffs.detach().to("cpu", torch.float64)


def check_columns(coeffs: Tensor, keys: Sequence[str], what: str) -> None:
    """Per-tensor coefficients need one column per floating key."""
    if coeffs.ndim == 2 and coeffs.shape[1] != len(keys):
        raise SoupError(f"{what}: {coeffs.shape[1]} coefficient columns for {len(keys)} floating tensors")


def mix(ingredients: Iterable[StateDictSource], coeffs: Tensor) -> dict[str, Tensor]:
    """``sum_i coeffs[i] * theta_i`` (or ``coeffs[i, j]`` for the j-th of :func:`soup_keys`), streamed.

    Sums in fp32 or wider and casts back to the first ingredient's dtypes;
    non-floating tensors are copied from it and must match everywhere.
    """
    items = ingredient_list(ingredients, "mix")
    coeffs = check_coeffs(coeffs, len(items), "mix")
    layout: Layout | None = None
    sums: dict[str, Tensor] = {}
    keys: list[str] = []
    with torch.no_grad():
        for i, item in enumerate(items):
            what = f"mix: ingredient {i}"
            state = load_state(item, what)
            if layout is None:
                layout, keys = Layout.of(state, what), soup_keys(state)
                check_columns(coeffs, keys, "mix")
                sums = {
                    k: torch.zeros(state[k].shape, dtype=accumulator_dtype(state[k].dtype), device=state[k].device)
                    for k in keys
                }
            else:
                layout.check(state, what)
            for j, key in enumerate(keys):
                acc = sums[key]
                c = float(coeffs[i, j] if coeffs.ndim == 2 else coeffs[i])
                acc.add_(state[key].detach().to(acc.device, acc.dtype), alpha=c)
            del state
    assert layout is not None
    exact = layout.copies()
    return {k: exact[k] if k in exact else sums[k].to(layout.dtypes[k]) for k in layout.order}


def check_grads(grads: Mapping[str, Tensor], layout: Layout, keys: Sequence[str]) -> None:
    """Gradients only for floating keys, each with its tensor's shape."""
    unknown = set(grads) - set(keys)
    if unknown:
        raise SoupError(f"gradients for keys that are not floating tensors of the soup: {fmt_names(unknown)}")
    bad = [
        f"{k!r}: {tuple(g.shape)} vs {tuple(layout.shapes[k])}"
        for k, g in grads.items()
        if not isinstance(g, Tensor) or g.shape != layout.shapes[k]
    ]
    if bad:
        raise SoupError("gradients with the wrong shape: " + "; ".join(bad))


def coefficient_gradients(
    ingredients: Iterable[StateDictSource], grads: Mapping[str, Tensor], by_layer: bool
) -> Tensor:
    """``dL/dalpha``: ``<g_key, theta_i,key>`` in float64, shape [N, K] by layer, else summed over keys to [N]."""
    items = ingredient_list(ingredients, "coefficient_gradients")
    layout: Layout | None = None
    keys: list[str] = []
    out = torch.zeros(0, dtype=torch.float64)
    with torch.no_grad():
        for i, item in enumerate(items):
            what = f"coefficient_gradients: ingredient {i}"
            state = load_state(item, what)
            if layout is None:
                layout, keys = Layout.of(state, what), soup_keys(state)
                check_grads(grads, layout, keys)
                out = torch.zeros(len(items), len(keys), dtype=torch.float64)
            else:
                layout.check(state, what)
            for j, key in enumerate(keys):
                if key in grads:
                    out[i, j] = inner_product(grads[key], state[key])
            del state
    return out if by_layer else out.sum(dim=1)


def inner_product(grad: Tensor, theta: Tensor) -> float:
    """``<grad, theta>`` summed in float64 on ``theta``'s device."""
    return float(torch.sum(grad.detach().to(theta.device, torch.float64) * theta.detach().to(torch.float64)))


def softmax_backward(alpha: Tensor, dalpha: Tensor) -> Tensor:
    """``dL/dbeta`` for ``alpha = softmax(beta, dim=0)``: ``alpha * (dalpha - sum_j alpha_j dalpha_j)``."""
    if alpha.shape != dalpha.shape:
        raise SoupError(f"softmax_backward: alpha {tuple(alpha.shape)} and dalpha {tuple(dalpha.shape)} differ")
    return alpha * (dalpha - (alpha * dalpha).sum(dim=0, keepdim=True))


def call_loss(loss_and_grad: LossAndGrad, theta: dict[str, Tensor]) -> tuple[float, Mapping[str, Tensor]]:
    """Run the callback and check it returned ``(loss, grads)``."""
    result = loss_and_grad(theta)
    if not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[1], Mapping):
        raise SoupError("loss_and_grad must return (loss, grads) with grads a mapping of key to tensor")
    return float(result[0]), result[1]


def learned_soup_gradient(
    ingredients: Sequence[StateDictSource], beta: Tensor, loss_and_grad: LossAndGrad
) -> tuple[float, Tensor]:
    """The loss at ``softmax(beta)`` and ``dL/dbeta`` (float64, beta's shape), loading each ingredient twice."""
    items = ingredient_list(ingredients, "learned_soup_gradient")
    beta = check_coeffs(beta, len(items), "learned_soup_gradient")
    alpha = torch.softmax(beta, dim=0)
    loss, grads = call_loss(loss_and_grad, mix(items, alpha))
    dalpha = coefficient_gradients(items, grads, by_layer=beta.ndim == 2)
    return loss, softmax_backward(alpha, dalpha)


@dataclass
class LearnedResult:
    """The fitted soup, its mixing coefficients (a list, or a list per key by layer) and the loss before each step."""

    weights: dict[str, Tensor]
    alpha: list[float] | dict[str, list[float]]
    losses: list[float] = field(default_factory=list)
    beta: Tensor | None = None


def fit_learned_soup(
    ingredients: Iterable[StateDictSource],
    loss_and_grad: LossAndGrad,
    *,
    by_layer: bool = False,
    epochs: int = 20,
    lr: float = 0.05,
    log: Callable[[int, float], None] | None = None,
) -> LearnedResult:
    """Fit the learned soup by Adam on ``beta`` from the uniform soup; an epoch is one full-batch step.

    ``losses[e]`` is the loss before step ``e``; ``weights`` is the soup after
    the last step. Loads: each ingredient twice per step, once for the final
    soup, and (by layer) the first once more to count the floating tensors.
    """
    items = ingredient_list(ingredients, "fit_learned_soup")
    if epochs < 0 or not lr > 0:
        raise SoupError(f"fit_learned_soup: need epochs >= 0 and lr > 0, got epochs={epochs}, lr={lr}")
    if by_layer:
        first = load_state(items[0], "fit_learned_soup: ingredient 0")
        keys = soup_keys(first)
        del first
        beta = torch.zeros(len(items), len(keys), dtype=torch.float64, requires_grad=True)
    else:
        keys = []
        beta = torch.zeros(len(items), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([beta], lr=lr)
    losses: list[float] = []
    for epoch in range(epochs):
        loss, dbeta = learned_soup_gradient(items, beta, loss_and_grad)
        losses.append(loss)
        if log is not None:
            log(epoch, loss)
        beta.grad = dbeta
        opt.step()
        opt.zero_grad(set_to_none=True)
    final = beta.detach().clone()
    alpha = torch.softmax(final, dim=0)
    weights = mix(items, alpha)
    coeffs = {k: alpha[:, j].tolist() for j, k in enumerate(keys)} if by_layer else alpha.tolist()
    return LearnedResult(weights=weights, alpha=coeffs, losses=losses, beta=final)
