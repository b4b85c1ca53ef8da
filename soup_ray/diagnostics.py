"""Why a greedy soup kept what it kept: interpolation barriers, distances from the base, and a verdict.

For the best candidate and the next few it could have been mixed with (the
rejected ones first), held-out accuracy is measured along the straight line
between the two weight sets (alpha = 0, 0.25, 0.5, 0.75, 1). The barrier is
how far the midpoint falls below the mean of the ends: a few points or more
means the two runs sit in different basins and their average is worse than
either. Each candidate's distance from the shared base (relative L2 of the
change) is listed next to its learning rate, since runs whose learning rate
is too high travel far from the start and out of its basin. The verdict is
built from these figures, so it says what this run measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .ingredients import Kitchen
from .model import load_base
from .run_dir import RunDir
from .soup import Candidate
from .soup.geometry import barrier_height, lerp_state_dicts, relative_distance

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
BARRIER_POINTS = 2.0
"""A midpoint drop of at least this many points of held-out accuracy counts as a barrier."""


@dataclass
class PairCurve:
    """Held-out accuracy (fractions) along the line from the best candidate to ``partner``."""

    best: str
    partner: str
    partner_in_soup: bool
    alphas: list[float]
    heldout: list[float]
    barrier_points: float


@dataclass
class Diagnostics:
    """Everything the report says about the soup's geometry, and the verdict."""

    kept: int
    candidates: int
    heldout_size: int
    best_errors: int
    curves: list[PairCurve] = field(default_factory=list)
    distances: list[dict[str, Any]] = field(default_factory=list)
    lr_split: dict[str, Any] | None = None
    verdict: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _lr(row: Mapping[str, Any] | None) -> float | None:
    hp = (row or {}).get("hyperparameters") or {}
    v = hp.get("lr")
    return float(v) if isinstance(v, (int, float)) else None


def interpolation_curve(
    kitchen: Kitchen, a: str, b: str, alphas: Sequence[float] = ALPHAS, ends: tuple[int, int] | None = None
) -> list[float]:
    """Held-out accuracy of ``(1 - alpha) * a + alpha * b`` for each alpha (ends reuse known counts when given)."""
    wa, wb = kitchen.weights(a), kitchen.weights(b)
    h = kitchen.heldout_size
    out = []
    for alpha in alphas:
        if ends is not None and alpha == 0.0:
            out.append(ends[0] / h)
        elif ends is not None and alpha == 1.0:
            out.append(ends[1] / h)
        else:
            out.append(kitchen.evaluate_weights(lerp_state_dicts(wa, wb, alpha)).correct / h)
    return out


def lr_split(distances: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The learning rate that best separates runs that moved far from the base from the rest, and the ratio.

    Runs are sorted by learning rate; for every cut that leaves at least a quarter of the runs (one at least)
    on each side, the ratio of the mean distance above the cut to the mean below it is computed; the largest
    ratio wins.
    """
    rows = sorted((d for d in distances if d.get("lr") is not None), key=lambda d: d["lr"])
    side = max(1, len(rows) // 4)
    best: dict[str, Any] | None = None
    for i in range(side, len(rows) - side + 1):
        low, high = rows[:i], rows[i:]
        lo = statistics.fmean(d["distance"] for d in low)
        hi = statistics.fmean(d["distance"] for d in high)
        if lo <= 0:
            continue
        ratio = hi / lo
        if best is None or ratio > best["ratio"]:
            best = {
                "lr_above": rows[i - 1]["lr"],
                "ratio": ratio,
                "runs_above": len(high),
                "runs_below": len(low),
                "mean_distance_above": hi,
                "mean_distance_below": lo,
            }
    return best


def verdict_for(d: Diagnostics, uniform_drop_points: float | None = None) -> str:
    """A plain-language verdict computed from the measured figures."""
    parts = [f"greedy kept {d.kept} of {d.candidates}"]
    rejected = [c for c in d.curves if not c.partner_in_soup]
    walls = [c for c in rejected if c.barrier_points >= BARRIER_POINTS]
    if walls:
        worst = max(walls, key=lambda c: c.barrier_points)
        parts.append(
            f"the best run and {len(walls)} of the next {len(rejected)} rejected runs are separated by a "
            f"barrier (up to {worst.barrier_points:.1f} points at the midpoint, best vs {worst.partner})"
        )
    elif rejected:
        top = max(c.barrier_points for c in rejected)
        parts.append(
            f"the rejected runs sit in the best run's basin (midpoint barrier at most {top:.1f} points) but "
            f"do not raise held-out accuracy: the best run makes {d.best_errors} error(s) on "
            f"{d.heldout_size} held-out images, so a bigger held-out split would tell them apart"
        )
    if d.lr_split is not None and d.lr_split["ratio"] >= 1.5:
        s = d.lr_split
        parts.append(
            f"runs with lr above {s['lr_above']:.2g} moved {s['ratio']:.1f}x further from the base than the rest"
        )
    if uniform_drop_points is not None and uniform_drop_points >= 1.0:
        parts.append(
            f"the uniform soup is {uniform_drop_points:.1f} points below the best run on held-out: some "
            "runs left the basin, which the greedy rule leaves out"
        )
    advice = []
    if walls and d.kept <= 2:
        advice.append(
            "try a lower learning-rate range"
            + (" (below the lr named above)" if d.lr_split else "")
            + " or an LP head (model.head_init: linear_probe)"
        )
    text = "; ".join(parts)
    if advice:
        text += "; " + "; ".join(advice)
    return text + "."


def soup_diagnostics(
    kitchen: Kitchen,
    candidates: Sequence[Candidate],
    rows: Mapping[str, Mapping[str, Any]],
    greedy: Sequence[str],
    pairs: int = 3,
    uniform_drop_points: float | None = None,
) -> Diagnostics:
    """Barriers between the best candidate and the next ``pairs`` candidates, distances from the base, verdict."""
    h = kitchen.heldout_size
    ordered = list(candidates)
    in_soup = set(greedy)
    best = ordered[0]
    d = Diagnostics(kept=len(greedy), candidates=len(ordered), heldout_size=h, best_errors=h - best.heldout_correct)
    others = ordered[1:]
    partners = [c for c in others if c.id not in in_soup][:pairs]
    partners += [c for c in others if c.id in in_soup][: max(0, pairs - len(partners))]
    for c in partners:
        accs = interpolation_curve(kitchen, best.id, c.id, ALPHAS, ends=(best.heldout_correct, c.heldout_correct))
        barrier = 100 * barrier_height(ALPHAS, accs)
        d.curves.append(PairCurve(best.id, c.id, c.id in in_soup, list(ALPHAS), accs, round(barrier, 2)))
    base_model, _ = load_base(RunDir(kitchen.run_dir).base)
    base_state = base_model.state_dict()
    for c in ordered:
        d.distances.append(
            {
                "trial_id": c.id,
                "lr": _lr(rows.get(c.id)),
                "heldout": c.heldout_correct / h,
                "distance": round(relative_distance(kitchen.weights(c.id), base_state), 5),
                "in_soup": c.id in in_soup,
            }
        )
    d.lr_split = lr_split(d.distances)
    d.verdict = verdict_for(d, uniform_drop_points)
    return d
