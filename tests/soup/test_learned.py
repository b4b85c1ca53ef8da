"""The learned soup with streamed gradients, against autograd through a fully materialised soup."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping

import pytest
import torch
import torch.nn.functional as F

from soup_ray.soup import SoupError
from soup_ray.soup.learned import (
    coefficient_gradients,
    fit_learned_soup,
    learned_soup_gradient,
    mix,
    softmax_backward,
    soup_keys,
)

PARAMS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
State = dict[str, torch.Tensor]


def start_model(seed: int = 0) -> State:
    """A 3 -> 5 -> 2 MLP, a floating buffer no loss depends on and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(5, 3, generator=g) * 0.5,
        "fc1.bias": torch.zeros(5),
        "fc2.weight": torch.randn(2, 5, generator=g) * 0.5,
        "fc2.bias": torch.zeros(2),
        "unused": torch.ones(2),
        "num_batches": torch.tensor(7),
    }


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 3, generator=g)
    return x, (x[:, 0] - x[:, 1] > 0).long()


X, Y = data()


def forward(theta: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ theta["fc1.weight"].T + theta["fc1.bias"])
    return h @ theta["fc2.weight"].T + theta["fc2.bias"]


def loss_at(theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(forward(theta, X), Y)


def loss_and_grad(theta: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """The caller's side: forward/backward on held-out data, gradients per parameter (none for buffers)."""
    params = {k: theta[k].detach().clone().requires_grad_(True) for k in PARAMS}
    loss = loss_at(params)
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.item(), dict(zip(PARAMS, grads, strict=True))


def ingredients(n: int, noise: float = 0.3, seed: int = 2) -> list[State]:
    g = torch.Generator().manual_seed(seed)
    start = start_model()
    out = []
    for _ in range(n):
        model = {
            k: v + noise * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in start.items()
        }
        out.append(model)
    return out


@functools.cache
def trained(steps: int = 150, lr: float = 0.5) -> State:
    """The start model after plain gradient descent on the held-out data: a clearly better ingredient."""
    theta = start_model()
    for _ in range(steps):
        _, grads = loss_and_grad(theta)
        theta = {k: v - lr * grads[k] if k in grads else v for k, v in theta.items()}
    return theta


def autograd_beta_grad(models: list[State], beta: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Reference: the whole soup materialised from beta, differentiated by autograd back to beta."""
    beta = beta.detach().clone().requires_grad_(True)
    alpha = torch.softmax(beta, dim=0)
    keys = soup_keys(models[0])
    theta = {}
    for j, key in enumerate(keys):
        weights = alpha[:, j] if beta.ndim == 2 else alpha
        theta[key] = sum(w * m[key].double() for w, m in zip(weights, models, strict=True))
    loss = F.cross_entropy(forward(theta, X.double()), Y)
    loss.backward()
    return loss.item(), beta.grad


def loaders(models: list[State]) -> list[Callable[[], State]]:
    return [lambda m=m: {k: v.clone() for k, v in m.items()} for m in models]


@pytest.mark.parametrize("by_layer", [False, True])
def test_streamed_gradient_equals_autograd_through_the_soup(by_layer: bool) -> None:
    models = ingredients(4)
    k = len(soup_keys(models[0]))
    assert k == 5  # four parameters and the floating buffer
    g = torch.Generator().manual_seed(5)
    beta = torch.randn((4, k) if by_layer else (4,), generator=g, dtype=torch.float64)
    loss, dbeta = learned_soup_gradient(loaders(models), beta, loss_and_grad)
    ref_loss, ref = autograd_beta_grad(models, beta)
    assert dbeta.shape == beta.shape
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    assert torch.allclose(dbeta, ref, atol=1e-5, rtol=0), (dbeta - ref).abs().max()
    assert ref.abs().max() > 1e-3  # not trivially zero
    if by_layer:
        assert torch.all(dbeta[:, soup_keys(models[0]).index("unused")] == 0)


def test_the_pieces_by_hand() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}
    b = {"w": torch.tensor([3.0, -2.0]), "n": torch.tensor(1)}
    out = mix([a, b], torch.tensor([0.25, 0.75]))
    assert out["w"].tolist() == [2.5, -1.0] and out["n"].item() == 1
    grads = {"w": torch.tensor([1.0, 1.0])}
    assert coefficient_gradients([a, b], grads, by_layer=False).tolist() == [3.0, 1.0]
    assert coefficient_gradients([a, b], grads, by_layer=True).tolist() == [[3.0], [1.0]]
    alpha, dalpha = torch.tensor([0.25, 0.75], dtype=torch.float64), torch.tensor([3.0, 1.0], dtype=torch.float64)
    # sum_j alpha_j dalpha_j = 1.5; dbeta = alpha * (dalpha - 1.5) = [0.375, -0.375]
    assert softmax_backward(alpha, dalpha).tolist() == [0.375, -0.375]
    with pytest.raises(SoupError, match="non-floating buffer 'n' differs"):
        mix([a, {"w": torch.zeros(2), "n": torch.tensor(2)}], torch.tensor([0.5, 0.5]))
    with pytest.raises(SoupError, match=r"shape \[2\] or \[2, K\]"):
        mix([a, b], torch.tensor([1.0]))
    with pytest.raises(SoupError, match="2 coefficient columns for 1 floating tensors"):
        mix([a, b], torch.ones(2, 2))
    with pytest.raises(SoupError, match="not floating tensors"):
        coefficient_gradients([a, b], {"n": torch.zeros(())}, by_layer=False)
    with pytest.raises(SoupError, match="wrong shape"):
        coefficient_gradients([a, b], {"w": torch.zeros(3)}, by_layer=False)


@pytest.mark.parametrize("by_layer", [False, True])
def test_fitting_lowers_the_loss_and_favours_the_good_ingredient(by_layer: bool) -> None:
    models = [dict(trained())] + ingredients(3, noise=0.5)
    seen: list[tuple[int, float]] = []
    result = fit_learned_soup(
        loaders(models), loss_and_grad, by_layer=by_layer, epochs=40, lr=0.1, log=lambda e, loss: seen.append((e, loss))
    )
    assert len(result.losses) == 40 and [e for e, _ in seen] == list(range(40))
    uniform = loss_at({k: sum(m[k] for m in models) / len(models) for k in PARAMS})
    assert result.losses[0] == pytest.approx(uniform.item(), abs=1e-6)  # beta = 0 is the uniform soup
    final = loss_at(result.weights).item()
    assert final < result.losses[0] - 0.05
    assert result.losses[-1] < result.losses[0]
    columns = result.alpha.values() if by_layer else [result.alpha]
    for alpha in columns:
        assert sum(alpha) == pytest.approx(1.0, abs=1e-9) and min(alpha) >= 0
    first = result.alpha["fc2.weight"] if by_layer else result.alpha
    assert first[0] == max(first)
    assert result.weights["num_batches"].item() == 7


@pytest.mark.parametrize("by_layer", [False, True])
def test_copies_of_one_model_give_that_model(by_layer: bool) -> None:
    model = ingredients(1)[0]
    result = fit_learned_soup(loaders([model] * 3), loss_and_grad, by_layer=by_layer, epochs=5, lr=0.1)
    for key, value in model.items():
        assert torch.allclose(result.weights[key], value, atol=1e-6), key
        assert result.weights[key].dtype == value.dtype


class Tracker:
    """Loaders returning fresh tensors, counting loads and the ingredients whose storage is still alive."""

    def __init__(self, models: list[State]) -> None:
        self.models = models
        self.loads: list[int] = []
        self.live: dict[int, int] = {}

    def release(self, i: int) -> None:
        self.live[i] -= 1

    def loader(self, i: int) -> Callable[[], State]:
        def load() -> State:
            held = sum(1 for n in self.live.values() if n > 0)
            assert held == 0, f"loading ingredient {i} while {held} loaded ingredient(s) are still alive"
            self.loads.append(i)
            state = {k: v.clone() for k, v in self.models[i].items()}
            self.live[i] = self.live.get(i, 0) + len(state)
            for v in state.values():
                weakref.finalize(v.untyped_storage(), self.release, i)
            return state

        return load


@pytest.mark.parametrize("by_layer", [False, True])
def test_each_step_loads_each_ingredient_twice_and_one_at_a_time(by_layer: bool) -> None:
    n, epochs = 4, 3
    tracker = Tracker(ingredients(n))
    kept: list[dict[str, torch.Tensor]] = []

    def keeping_loss(theta: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        kept.append(theta)  # the caller may keep the soup: it must not pin any ingredient
        return loss_and_grad(theta)

    fit_learned_soup([tracker.loader(i) for i in range(n)], keeping_loss, by_layer=by_layer, epochs=epochs)
    per_step = list(range(n)) * 2
    peek = [0] if by_layer else []
    assert tracker.loads == peek + per_step * epochs + list(range(n))
    assert all(count == 0 for count in tracker.live.values())


def test_bad_callbacks_and_arguments_raise() -> None:
    models = loaders(ingredients(2))
    with pytest.raises(SoupError, match="must return"):
        fit_learned_soup(models, lambda theta: 1.0, epochs=1)
    with pytest.raises(SoupError, match="epochs"):
        fit_learned_soup(models, loss_and_grad, epochs=-1)
    with pytest.raises(SoupError, match="at least one ingredient"):
        fit_learned_soup([], loss_and_grad)
