"""The soup scheduler's rule, on the numbers a rung result carries."""

from __future__ import annotations

import numpy as np
import pytest

from soup_ray.soup.pruning import percentile, rung_verdict


def test_no_soup_yet_never_stops() -> None:
    for margin, rf in ((0, None), (0, 4.0), (None, 2.0)):
        assert not rung_verdict({"soup_size": 0}, margin, [5, 9], rf).stop
        assert not rung_verdict({}, margin, [], rf).stop
    v = rung_verdict({"soup_size": 0, "soup_error": "OSError: gone"}, 0)
    assert not v.stop and "OSError: gone" in v.reason
    assert not rung_verdict({"soup_size": 2}, 0).stop  # a soup but no gain: no verdict


@pytest.mark.parametrize(
    ("gain", "margin", "stop"),
    [(3, 0, False), (0, 0, False), (-1, 0, True), (-1, 1, False), (-2, 1, True), (-40, 39, True), (-39, 39, False)],
)
def test_the_margin_stops_exactly_a_trial_that_costs_the_soup_more(gain: int, margin: int, stop: bool) -> None:
    v = rung_verdict({"soup_size": 3, "soup_gain": gain}, margin)
    assert v.stop is stop
    assert "3-ingredient soup" in v.reason and f"{gain:+d} image" in v.reason
    assert (f"costs more than {margin}" in v.reason) is stop
    assert not rung_verdict({"soup_size": 3, "soup_gain": gain}, None).stop  # no margin, no cut: never stops


@pytest.mark.parametrize("rf", [2.0, 3.0, 4.0])
def test_the_cut_is_asha_quantile_of_the_gains_seen_at_the_rung(rf: float) -> None:
    seen = [-12, -3, -40, 0, -7, -5]
    for gain in range(-45, 5):
        cut = np.percentile([*seen, gain], 100 * (1 - 1 / rf))  # numpy's percentile: what Tune's ASHA uses
        v = rung_verdict({"soup_size": 2, "soup_gain": gain}, None, seen, rf)
        assert v.stop is bool(gain < cut), (gain, cut, v)
        # the margin stops on its own too
        both = rung_verdict({"soup_size": 2, "soup_gain": gain}, 20, seen, rf)
        assert both.stop is bool(gain < cut or gain < -20)
    assert percentile([3.0], 75) == 3.0 and percentile([1, 2, 3, 4], 50) == pytest.approx(
        np.percentile([1, 2, 3, 4], 50)
    )


def test_bad_parameters_are_errors() -> None:
    with pytest.raises(ValueError, match="margin must be >= 0"):
        rung_verdict({"soup_size": 2, "soup_gain": 0}, -1)
    with pytest.raises(ValueError, match="reduction_factor must be > 1"):
        rung_verdict({"soup_size": 2, "soup_gain": 0}, None, [], 1.0)
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
