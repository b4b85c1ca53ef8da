"""Interpolation, barrier height and distance from the base: hand computations and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soup_ray.soup import SoupError
from soup_ray.soup.geometry import barrier_height, lerp_state_dicts, relative_distance

floats = st.floats(min_value=-100, max_value=100, allow_nan=False, width=32)


def sd(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32), "step": torch.tensor(3)}


def test_lerp_by_hand() -> None:
    out = lerp_state_dicts(sd(0.0, 2.0), sd(4.0, -2.0), 0.25)
    assert out["w"].tolist() == [1.0, 1.0]
    assert out["step"].item() == 3
    with pytest.raises(SoupError, match="differs"):
        lerp_state_dicts(sd(1.0), {"w": torch.tensor([1.0]), "step": torch.tensor(4)}, 0.5)
    with pytest.raises(SoupError, match="different keys"):
        lerp_state_dicts(sd(1.0), {"w": torch.tensor([1.0])}, 0.5)


@settings(max_examples=100, deadline=None)
@given(st.lists(floats, min_size=1, max_size=6), st.lists(floats, min_size=1, max_size=6))
def test_lerp_endpoints_are_the_models_exactly(a: list[float], b: list[float]) -> None:
    n = min(len(a), len(b))
    sa, sb = sd(*a[:n]), sd(*b[:n])
    assert torch.equal(lerp_state_dicts(sa, sb, 0.0)["w"], sa["w"])
    assert torch.equal(lerp_state_dicts(sa, sb, 1.0)["w"], sb["w"])
    mid = lerp_state_dicts(sa, sb, 0.5)["w"]
    assert torch.allclose(mid, (sa["w"] + sb["w"]) / 2, atol=1e-4)


def test_barrier_by_hand() -> None:
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert barrier_height(alphas, [90, 80, 60, 70, 80]) == pytest.approx(25.0)  # (90 + 80) / 2 - 60
    assert barrier_height(alphas, [90, 92, 93, 91, 88]) == 0.0  # the midpoint is above the ends: no barrier
    with pytest.raises(SoupError, match="alpha = 0, 0.5 and 1"):
        barrier_height([0.0, 1.0], [1.0, 1.0])


@given(st.floats(min_value=0, max_value=1), st.floats(min_value=0, max_value=1))
def test_barrier_is_never_negative_and_zero_on_a_flat_line(acc: float, other: float) -> None:
    assert barrier_height([0.0, 0.5, 1.0], [acc, acc, acc]) == 0.0
    assert barrier_height([0.0, 0.5, 1.0], [acc, other, acc]) >= 0.0


def test_relative_distance_by_hand() -> None:
    base = sd(3.0, 4.0)  # norm 5
    assert relative_distance(sd(3.0, 4.0), base) == 0.0
    assert relative_distance(sd(6.0, 8.0), base) == pytest.approx(1.0)
    assert relative_distance(sd(3.0, 9.0), base) == pytest.approx(1.0)
    with pytest.raises(SoupError, match="no floating weights"):
        relative_distance(sd(0.0), sd(0.0))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(min_value=0.5, max_value=50, width=32), min_size=1, max_size=6),
    st.floats(min_value=0.0, max_value=3.0),
)
def test_relative_distance_of_a_scaled_model_is_the_scale_change(values: list[float], scale: float) -> None:
    base = sd(*values)
    scaled = {"w": base["w"] * scale, "step": base["step"]}
    assert math.isclose(relative_distance(scaled, base), abs(scale - 1.0), rel_tol=1e-4, abs_tol=1e-5)
