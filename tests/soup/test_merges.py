"""Task-vector merges (WiSE-FT, task arithmetic, TIES, DARE, Model Stock): hand computations and properties."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soup_ray.soup import SoupError
from soup_ray.soup.merges import (
    dare_mask,
    dare_merge,
    dare_seed,
    model_stock,
    model_stock_ratio,
    task_arithmetic,
    task_vector,
    ties_merge,
    trim_by_magnitude,
    trim_count,
    wise_ft,
)

PROPS = settings(max_examples=40, deadline=None)
floats = st.floats(min_value=-100, max_value=100, allow_nan=False, width=32)


def sd(*values: float, step: int = 3) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32), "step": torch.tensor(step)}


def close(a: torch.Tensor, b: torch.Tensor | list[float]) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=1e-5, rtol=1e-5)


# every merge configured so that N copies of one model give that model back
IDENTITY_MERGES: dict[str, Callable] = {
    "wise_ft": lambda base, items: wise_ft(base, items[0], 1.0),
    "task_arithmetic": lambda base, items: task_arithmetic(base, items, 1.0 / max(1, len(items))),
    "ties": lambda base, items: ties_merge(base, items, density=1.0),
    "dare": lambda base, items: dare_merge(base, items, drop_rate=0.0),
    "model_stock": lambda base, items: model_stock(base, items)[0],
}


# ---------------------------------------------------------------------------
# WiSE-FT and task arithmetic
# ---------------------------------------------------------------------------


def test_wise_ft_endpoints_are_exact_and_the_middle_by_hand() -> None:
    base, target = sd(0.1, 2.0, -7.3), sd(4.0, -2.0, 1e-3)
    assert torch.equal(wise_ft(base, target, 0.0)["w"], base["w"])
    assert torch.equal(wise_ft(base, target, 1.0)["w"], target["w"])
    out = wise_ft(sd(0.0, 2.0), lambda: sd(4.0, -2.0), 0.25)  # target as a loader
    assert out["w"].tolist() == [1.0, 1.0]
    assert out["step"].item() == 3 and out["step"].dtype == torch.int64


def test_wise_ft_keeps_low_precision_dtypes_and_its_endpoints() -> None:
    base = {"w": torch.tensor([0.1, 3.3], dtype=torch.bfloat16)}
    target = {"w": torch.tensor([-2.7, 9.1], dtype=torch.bfloat16)}
    assert wise_ft(base, target, 0.5)["w"].dtype == torch.bfloat16
    assert torch.equal(wise_ft(base, target, 0.0)["w"], base["w"])
    assert torch.equal(wise_ft(base, target, 1.0)["w"], target["w"])


def test_task_arithmetic_by_hand() -> None:
    # deltas [1, 0] and [0, 3], sum [1, 3]; base [1, 2] + 0.5 * [1, 3] = [1.5, 3.5]
    base = sd(1.0, 2.0)
    items = [sd(2.0, 2.0), lambda: sd(1.0, 5.0)]
    assert task_arithmetic(base, items, 0.5)["w"].tolist() == [1.5, 3.5]
    assert task_arithmetic(base, iter(items), 1.0)["w"].tolist() == [2.0, 5.0]
    assert task_vector(base, sd(1.0, 5.0))["w"].tolist() == [0.0, 3.0]


# ---------------------------------------------------------------------------
# TIES
# ---------------------------------------------------------------------------


def test_trim_count_and_ties_at_the_threshold() -> None:
    assert trim_count(4, 0.5) == 2
    assert trim_count(10, 0.3) == 3  # not 4, despite 0.3 * 10 = 3.0000000000000004
    assert trim_count(3, 0.01) == 1
    assert trim_count(5, 1.0) == 5
    # k = ceil(1.5) = 2; |1| = |-1| = |1|: the earliest positions are kept
    assert trim_by_magnitude(torch.tensor([1.0, -1.0, 1.0]), 0.5).tolist() == [1.0, -1.0, 0.0]
    with pytest.raises(SoupError, match="density"):
        trim_by_magnitude(torch.tensor([1.0]), 0.0)


def test_ties_by_hand() -> None:
    # base 1 everywhere; task vectors (theta - base) and density 0.5, so k = ceil(0.5 * 4) = 2:
    #   tau1 raw [ 3,   -1,  2, -0.5 ] -> top-2 |.| are 3, 2     -> [ 3,    0,  2, 0]
    #   tau2 raw [-1.5, -4,  1,  0.25] -> top-2 |.| are 4, 1.5   -> [-1.5, -4,  0, 0]
    #   tau3 raw [ 2,  0.5, -3,  1   ] -> top-2 |.| are 3, 2     -> [ 2,    0, -3, 0]
    # sum of trimmed [3.5, -4, -1, 0] -> elected signs [+, -, -, 0]
    # disjoint means: e0 mean(3, 2) = 2.5; e1 mean(-4) = -4; e2 mean(-3) = -3 (tau1's +2 disagrees); e3 none -> 0
    # merged [2.5, -4, -3, 0]; base + merged = [3.5, -3, -2, 1]; base + 0.5 * merged = [2.25, -1, -0.5, 1]
    base = sd(1.0, 1.0, 1.0, 1.0)
    raws = [[3.0, -1.0, 2.0, -0.5], [-1.5, -4.0, 1.0, 0.25], [2.0, 0.5, -3.0, 1.0]]
    items = [sd(*(1.0 + v for v in raw)) for raw in raws]
    assert ties_merge(base, items, density=0.5)["w"].tolist() == [3.5, -3.0, -2.0, 1.0]
    assert ties_merge(base, items, density=0.5, scale=0.5)["w"].tolist() == [2.25, -1.0, -0.5, 1.0]
    # density 1: nothing trimmed; sums [3.5, -4.5, 0, 0.75] -> signs [+, -, 0, +]
    # e0 mean(3, 2) = 2.5; e1 mean(-1, -4) = -2.5; e2 sign 0 -> 0; e3 mean(0.25, 1) = 0.625
    assert ties_merge(base, items, density=1.0)["w"].tolist() == [3.5, -1.5, 1.0, 1.625]


def test_ties_loads_each_ingredient_twice_one_at_a_time() -> None:
    loads: list[int] = []
    base = sd(0.0, 0.0)

    def loader(i: int) -> Callable[[], dict[str, torch.Tensor]]:
        def load() -> dict[str, torch.Tensor]:
            loads.append(i)
            return sd(float(i + 1), -1.0)

        return load

    out = ties_merge(base, [loader(i) for i in range(3)], density=1.0)
    assert loads == [0, 1, 2, 0, 1, 2]
    assert out["w"].tolist() == [2.0, -1.0]


# ---------------------------------------------------------------------------
# DARE
# ---------------------------------------------------------------------------


def test_dare_keeps_and_doubles_or_drops_each_element() -> None:
    n = 2000
    base = {"w": torch.arange(n, dtype=torch.float32) % 7, "step": torch.tensor(1)}
    delta = (torch.arange(n, dtype=torch.float32) % 5) + 1.0  # small integers: every sum is exact
    model = {"w": base["w"] + delta, "step": torch.tensor(1)}
    out = dare_merge(base, [model], drop_rate=0.5, seed=7)
    change = out["w"] - base["w"]
    kept = change != 0
    assert torch.equal(change[kept], 2 * delta[kept])
    assert 0.4 < kept.float().mean().item() < 0.6
    assert torch.equal(kept, dare_mask(torch.Size([n]), 0.5, dare_seed(7, 0, "w")))
    assert torch.equal(dare_merge(base, [model], drop_rate=0.5, seed=7)["w"], out["w"])
    assert not torch.equal(dare_merge(base, [model], drop_rate=0.5, seed=8)["w"], out["w"])


def test_dare_averages_two_dropped_vectors_and_ignores_dict_order() -> None:
    base = {"a": torch.zeros(64), "b": torch.ones(8)}
    one = {"a": torch.full((64,), 2.0), "b": torch.full((8,), 3.0)}
    two = {"a": torch.full((64,), -4.0), "b": torch.full((8,), 5.0)}
    out = dare_merge(base, [one, two], drop_rate=0.25, seed=3)
    m = [dare_mask(torch.Size([64]), 0.25, dare_seed(3, i, "a")).float() for i in range(2)]
    expected = (m[0] * 2.0 + m[1] * -4.0) / 0.75 / 2
    assert close(out["a"], expected)
    flipped = [dict(reversed(list(d.items()))) for d in (one, two)]
    again = dare_merge(dict(reversed(list(base.items()))), flipped, drop_rate=0.25, seed=3)
    assert torch.equal(again["a"], out["a"]) and torch.equal(again["b"], out["b"])
    # the ingredient index is part of the seed: swapping the ingredients changes the masks
    assert dare_seed(3, 0, "a") != dare_seed(3, 1, "a")


def test_dare_without_drop_is_the_mean_task_vector() -> None:
    base, items = sd(1.0, 2.0), [sd(2.0, 2.0), sd(1.0, 5.0)]
    assert dare_merge(base, items, drop_rate=0.0, scale=2.0)["w"].tolist() == [2.0, 5.0]
    assert torch.equal(dare_merge(base, items, drop_rate=0.0)["w"], task_arithmetic(base, items, 0.5)["w"])
    with pytest.raises(SoupError, match="drop_rate"):
        dare_merge(base, items, drop_rate=1.0)


# ---------------------------------------------------------------------------
# Model Stock
# ---------------------------------------------------------------------------


def test_model_stock_ratio_by_hand() -> None:
    assert model_stock_ratio(0.0, 2) == 0.0
    assert model_stock_ratio(1.0, 2) == 1.0
    assert model_stock_ratio(0.5, 2) == pytest.approx(2 / 3)
    assert model_stock_ratio(0.5, 3) == pytest.approx(1.5 / 2.0)
    assert model_stock_ratio(-0.4, 3) == 0.0  # opposed fine-tunes: the base
    assert model_stock_ratio(math.nan, 2) == 0.0
    assert model_stock_ratio(0.2, 1) == 1.0  # one ingredient: itself


def test_model_stock_two_vectors_at_known_angles() -> None:
    base = sd(1.0, 1.0)
    # orthogonal: cos 0 -> t 0 -> exactly the base
    out, t = model_stock(base, [sd(2.0, 1.0), sd(1.0, 3.0)])
    assert t == {"w": 0.0} and torch.equal(out["w"], base["w"])
    # same direction: cos 1 -> t 1 -> the mean
    out, t = model_stock(base, [sd(2.0, 2.0), sd(3.0, 3.0)])
    assert t["w"] == pytest.approx(1.0) and close(out["w"], [2.5, 2.5])
    # 60 degrees: deltas [1, 0] and [1/2, sqrt(3)/2], cos 1/2 -> t = 2/3
    # mean [1.75, 1 + sqrt(3)/4]; 2/3 * mean + 1/3 * base = [1.5, 1 + sqrt(3)/6]
    r3 = math.sqrt(3.0)
    out, t = model_stock(base, [sd(2.0, 1.0), sd(1.5, 1.0 + r3 / 2)])
    assert t["w"] == pytest.approx(2 / 3, abs=1e-6)
    assert close(out["w"], [1.5, 1.0 + r3 / 6])
    assert out["step"].item() == 3


def test_model_stock_three_vectors() -> None:
    base = {"w": torch.zeros(3)}
    # deltas e1, e2, (e1 + e2): cosines 0, 1/sqrt(2), 1/sqrt(2) -> mean sqrt(2)/3
    items = [{"w": torch.tensor(v)} for v in ([1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0])]
    cos = math.sqrt(2) / 3
    expected_t = 3 * cos / (1 + 2 * cos)
    out, t = model_stock(base, items)
    assert t["w"] == pytest.approx(expected_t, abs=1e-6)
    assert close(out["w"], [expected_t * 2 / 3, expected_t * 2 / 3, 0.0])
    # three at 120 degrees in a plane: every cosine -1/2 -> clamped to 0 -> the base
    plane = [{"w": torch.tensor([math.cos(a), math.sin(a), 0.0])} for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    out, t = model_stock(base, plane)
    assert t["w"] == 0.0 and torch.equal(out["w"], base["w"])
    # three of one direction, different lengths: cos 1 -> t 1 -> the mean
    out, t = model_stock(base, [{"w": torch.tensor([k, 0.0, 0.0])} for k in (1.0, 2.0, 3.0)])
    assert t["w"] == pytest.approx(1.0) and close(out["w"], [2.0, 0.0, 0.0])


def test_model_stock_zero_task_vectors_count_as_orthogonal() -> None:
    base = sd(1.0, 1.0)
    # one delta is zero: its cosine with the other is undefined and counted as 0 -> t 0 -> the base
    out, t = model_stock(base, [sd(1.0, 1.0), sd(3.0, 1.0)])
    assert t["w"] == 0.0 and torch.equal(out["w"], base["w"])
    # a single ingredient is returned whatever its direction
    out, t = model_stock(base, [sd(5.0, -2.0)])
    assert t["w"] == 1.0 and out["w"].tolist() == [5.0, -2.0]


def test_streaming_merges_load_each_ingredient_once_and_release_it() -> None:
    live: list[int] = [0]
    loads: list[int] = []

    def loader(i: int) -> Callable[[], dict[str, torch.Tensor]]:
        def load() -> dict[str, torch.Tensor]:
            assert live[0] == 0, "a previous ingredient is still held"
            loads.append(i)
            state = sd(float(i), 2.0 * i)
            for v in state.values():
                live[0] += 1
                weakref.finalize(v.untyped_storage(), lambda: live.__setitem__(0, live[0] - 1))
            return state

        return load

    base = sd(0.5, 0.5)
    for merge in (
        lambda items: task_arithmetic(base, items, 1.0),
        lambda items: dare_merge(base, items, 0.3),
        lambda items: model_stock(base, items),
    ):
        loads.clear()
        merge([loader(i) for i in range(4)])
        assert loads == [0, 1, 2, 3]
        assert live[0] == 0


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@PROPS
@given(st.lists(st.tuples(floats, floats), min_size=1, max_size=6), st.integers(1, 4))
def test_every_merge_of_identical_copies_is_the_model(pairs: list[tuple[float, float]], n: int) -> None:
    base = sd(*(b for b, _ in pairs))
    model = sd(*(m for _, m in pairs))
    for name, merge in IDENTITY_MERGES.items():
        out = merge(base, [lambda: sd(*(m for _, m in pairs)) for _ in range(n)])
        assert torch.allclose(out["w"], model["w"], atol=1e-4, rtol=1e-5), name
        assert torch.equal(out["step"], model["step"]), name


@PROPS
@given(
    st.integers(1, 5).flatmap(
        lambda size: st.tuples(
            st.lists(floats, min_size=size, max_size=size),
            st.lists(st.sampled_from([-1.0, 1.0]), min_size=size, max_size=size),
            st.lists(st.lists(st.floats(0.125, 10.0, width=32), min_size=size, max_size=size), min_size=1, max_size=4),
        )
    )
)
def test_ties_without_trim_and_one_sign_is_the_mean(case: tuple[list[float], list[float], list[list[float]]]) -> None:
    base_values, signs, magnitudes = case
    base = sd(*base_values)
    items = [sd(*(b + s * m for b, s, m in zip(base_values, signs, mags, strict=True))) for mags in magnitudes]
    ties = ties_merge(base, items, density=1.0)["w"]
    mean = task_arithmetic(base, items, 1.0 / len(items))["w"]
    assert torch.allclose(ties, mean, atol=1e-4, rtol=1e-5)


@PROPS
@given(st.integers(-1000, 1000), st.integers(1, 3))
def test_integer_buffers_are_copied_and_must_match(step: int, n: int) -> None:
    base = sd(1.0, 2.0, step=step)
    items = [sd(1.5 + i, 0.0, step=step) for i in range(n)]
    for name, merge in IDENTITY_MERGES.items():
        out = merge(base, items)
        assert out["step"].item() == step and out["step"].dtype == torch.int64, name
        bad = items + [sd(1.0, 1.0, step=step + 1)]
        with pytest.raises(SoupError, match="non-floating buffer 'step' differs"):
            merge(base, bad[::-1])


@pytest.mark.parametrize("name", sorted(IDENTITY_MERGES))
def test_mismatched_keys_shapes_and_kinds_raise(name: str) -> None:
    merge = IDENTITY_MERGES[name]
    base = sd(1.0, 2.0)
    with pytest.raises(SoupError, match="missing keys: 'step'"):
        merge(base, [{"w": torch.tensor([1.0, 2.0])}])
    with pytest.raises(SoupError, match="unexpected keys: 'extra'"):
        merge(base, [{**sd(1.0, 2.0), "extra": torch.zeros(1)}])
    with pytest.raises(SoupError, match=r"mismatched shapes: 'w': \(2,\) vs \(3,\)"):
        merge(base, [sd(1.0, 2.0, 3.0)])
    with pytest.raises(SoupError, match="changes kind"):
        merge(base, [{"w": torch.tensor([1, 2]), "step": torch.tensor(3)}])
    with pytest.raises(SoupError, match="not a tensor"):
        merge(base, [{"w": [1.0, 2.0], "step": torch.tensor(3)}])
    with pytest.raises(SoupError, match="loader returned list"):
        merge(base, [lambda: [1.0]])
    if name != "wise_ft":
        with pytest.raises(SoupError, match="at least one ingredient"):
            merge(base, [])
