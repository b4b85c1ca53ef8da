"""The soup scheduler's rule: whether a trial at a rung epoch is still worth training for the soup.

Pure (no Ray, no torch, no I/O): the decision is a function of the numbers a
trial reports at its rung (``soup_view.rung_signals``) and of the gains other
trials reported at the same rung, so the live scheduler and the bench's replay
of a recorded sweep decide identically.

The rule is successive halving on the soup's signal instead of the trial's own
accuracy: with no soup yet every trial goes on. Once the live greedy soup has
ingredients, a trial's ``soup_gain`` (held-out images gained or lost when its
rung checkpoint joins the soup as one more uniform ingredient) is compared with
the gains recorded at that rung so far; it goes on only if it is at or above
their ``1 - 1/reduction_factor`` quantile (ASHA's cut-off), and, with a
``margin``, only if it costs the soup at most ``margin`` images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RungVerdict:
    """What the soup scheduler decided for one trial at one rung, and why (one sentence)."""

    stop: bool
    reason: str


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def rung_verdict(
    signals: Mapping[str, Any],
    margin: int | None = None,
    seen: Sequence[int] = (),
    reduction_factor: float | None = None,
) -> RungVerdict:
    """The decision for a rung result carrying ``soup_size`` and, with a soup, ``soup_gain`` (held-out images).

    ``seen``: the gains reported at this rung before (this one is added to them for the cut-off).
    ``reduction_factor``: None turns the cut-off off; ``margin``: None turns the absolute test off.
    """
    if margin is not None and margin < 0:
        raise ValueError(f"margin must be >= 0 held-out images, got {margin}")
    if reduction_factor is not None and reduction_factor <= 1:
        raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
    size = int(signals.get("soup_size") or 0)
    gain = signals.get("soup_gain")
    if size == 0 or gain is None:
        why = signals.get("soup_error")
        return RungVerdict(False, "no soup to compare with yet" + (f" ({why})" if why else ""))
    gain = int(gain)
    what = f"adding it to the {size}-ingredient soup changes held-out by {gain:+d} image(s)"
    if margin is not None and gain < -margin:
        return RungVerdict(True, f"{what}: it costs more than {margin}")
    if reduction_factor is not None:
        cut = percentile([*seen, gain], 100.0 * (1.0 - 1.0 / reduction_factor))
        if gain < cut:
            return RungVerdict(True, f"{what}, below this rung's cut-off {cut:+.1f} (top 1/{reduction_factor:g} go on)")
        return RungVerdict(False, f"{what}, at or above this rung's cut-off {cut:+.1f}")
    return RungVerdict(False, what)
