"""The shared vocabulary of the soup mathematics: candidates, evaluation results, decisions, errors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

Tie = Literal[">=", ">"]
TIES: tuple[str, ...] = (">=", ">")
StateDict = Mapping[str, Tensor]


class SoupError(ValueError):
    """Raised when ingredients cannot be souped or an input is inconsistent."""


def fmt_names(names: Iterable[str], limit: int = 10) -> str:
    """Comma-separated names, truncated after ``limit`` entries."""
    items = sorted(names)
    shown = ", ".join(repr(n) for n in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


def key_set_difference(expected: Iterable[str], got: Iterable[str]) -> str | None:
    """``"missing keys: ...; unexpected keys: ..."`` between two key sets, or None when they are equal."""
    want, have = set(expected), set(got)
    parts = []
    if want - have:
        parts.append(f"missing keys: {fmt_names(want - have)}")
    if have - want:
        parts.append(f"unexpected keys: {fmt_names(have - want)}")
    return "; ".join(parts) or None


@dataclass(frozen=True)
class Candidate:
    """One fine-tuned model: its id and its own held-out correct count."""

    id: str
    heldout_correct: int
    load: Callable[[], StateDict] | None = field(default=None, compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class EvalResult:
    """Outcome of scoring a soup on the held-out set.

    ``evaluated`` is the number of images scored; ``complete`` is False when
    scoring stopped early because ``wrong`` exceeded the allowed maximum.
    """

    correct: int
    wrong: int
    evaluated: int
    complete: bool


Evaluate = Callable[[list[str], int | None], EvalResult]
"""``evaluate(ingredient_ids, max_wrong)``: score the soup of those ids.

Ids arrive in sort order.  With ``max_wrong`` set the evaluator may stop as
soon as more than ``max_wrong`` images are wrong (``complete=False``).
"""


def sort_key(c: Candidate) -> tuple[int, str]:
    return (-c.heldout_correct, c.id)


def sort_candidates(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Sort by held-out correct count descending, then id ascending."""
    return sorted(candidates, key=sort_key)


def check_tie(tie: str) -> None:
    """Raise :class:`SoupError` unless ``tie`` is a known rule."""
    if tie not in TIES:
        raise SoupError(f"tie must be one of {TIES}, got {tie!r}")


@dataclass(frozen=True)
class Step:
    """One greedy decision.

    ``correct`` is the candidate soup's held-out correct count (None when it
    was rejected early), ``evaluated`` the images scored for this decision and
    ``soup_correct`` the correct count of the soup after the decision.
    """

    candidate_id: str
    position: int
    correct: int | None
    accepted: bool
    evaluated: int
    soup_correct: int


@dataclass
class GreedyResult:
    """Chosen ingredient ids, their soup's held-out correct count and the decisions."""

    ingredients: list[str]
    correct: int
    history: list[Step] = field(default_factory=list)
    evaluations: int = 0
    images_evaluated: int = 0
