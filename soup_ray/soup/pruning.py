"""The soup scheduler's rule: whether a trial at a rung epoch is still worth training for the soup.

Pure (no Ray, no torch, no I/O): the decision is a function of the numbers a
trial reports at its rung (``soup_view.rung_signals``), so the live scheduler
and the bench's replay of a recorded sweep decide identically.

The rule: with no soup yet, every trial goes on (nothing to compare with). Once
the live greedy soup has ingredients, a trial goes on while adding its rung
checkpoint to that soup as one more uniform ingredient costs at most ``margin``
held-out images (``soup_gain >= -margin``), and stops otherwise; its rung
checkpoint stays a soup candidate either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RungVerdict:
    """What the soup scheduler decided for one trial at one rung, and why (one sentence)."""

    stop: bool
    reason: str


def rung_verdict(signals: Mapping[str, Any], margin: int = 0) -> RungVerdict:
    """The decision for a rung result carrying ``soup_size`` and, with a soup, ``soup_gain`` (held-out images)."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0 held-out images, got {margin}")
    size = int(signals.get("soup_size") or 0)
    gain = signals.get("soup_gain")
    if size == 0 or gain is None:
        why = signals.get("soup_error")
        return RungVerdict(False, "no soup to compare with yet" + (f" ({why})" if why else ""))
    gain = int(gain)
    if gain >= -margin:
        return RungVerdict(
            False, f"adding it to the {size}-ingredient soup changes held-out by {gain:+d} image(s) (>= -{margin})"
        )
    return RungVerdict(
        True, f"adding it to the {size}-ingredient soup costs {-gain} held-out image(s) (more than {margin})"
    )
