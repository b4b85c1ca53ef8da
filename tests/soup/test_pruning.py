"""The soup scheduler's rule, on the numbers a rung result carries."""

from __future__ import annotations

import pytest

from soup_ray.soup.pruning import rung_verdict


def test_no_soup_yet_never_stops() -> None:
    assert not rung_verdict({"soup_size": 0}).stop
    assert not rung_verdict({}).stop
    v = rung_verdict({"soup_size": 0, "soup_error": "OSError: gone"})
    assert not v.stop and "OSError: gone" in v.reason


@pytest.mark.parametrize(
    ("gain", "margin", "stop"),
    [(3, 0, False), (0, 0, False), (-1, 0, True), (-1, 1, False), (-2, 1, True), (-40, 39, True), (-39, 39, False)],
)
def test_stops_exactly_when_the_soup_would_lose_more_than_the_margin(gain: int, margin: int, stop: bool) -> None:
    v = rung_verdict({"soup_size": 3, "soup_gain": gain}, margin)
    assert v.stop is stop
    assert "3-ingredient soup" in v.reason
    assert (f"costs {-gain} held-out" in v.reason) is stop


def test_a_soup_without_a_gain_is_no_verdict_and_a_negative_margin_is_an_error() -> None:
    assert not rung_verdict({"soup_size": 2}).stop
    with pytest.raises(ValueError, match="margin must be >= 0"):
        rung_verdict({"soup_size": 2, "soup_gain": 0}, -1)
