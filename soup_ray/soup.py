"""Model-soup mathematics: weight averaging, greedy/uniform soups, ensembles.

Everything here is pure: no Ray, no I/O.  The soup algorithms work on
candidate *ids* and an evaluator callback; only :class:`RunningAverage`,
:func:`average_state_dicts` and the ensemble helpers touch tensors.

Greedy soup follows Wortsman et al. (ICML 2022): sort the fine-tuned models by
held-out accuracy, start from the best one, and add each next model when the
averaged weights do not lose held-out accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, TypeVar, Union

import torch
from torch import Tensor

__all__ = [
    "SoupError",
    "Tie",
    "Candidate",
    "EvalResult",
    "Evaluate",
    "Step",
    "GreedyResult",
    "Update",
    "RunningAverage",
    "average_state_dicts",
    "sort_candidates",
    "accept",
    "max_wrong_for",
    "early_rejection_evaluate",
    "greedy_soup",
    "batch_greedy_cost",
    "uniform_soup",
    "best_candidate",
    "IncrementalGreedySoup",
    "logit_ensemble",
    "greedy_ensemble",
    "SoupMethod",
    "SOUP_METHODS",
    "register_soup_method",
    "get_soup_method",
]

Tie = Literal[">=", ">"]
_TIES: tuple[str, ...] = (">=", ">")
StateDict = Mapping[str, Tensor]


class SoupError(ValueError):
    """Raised when ingredients cannot be souped or an input is inconsistent."""


def _fmt_names(names: Iterable[str], limit: int = 10) -> str:
    """Comma-separated names, truncated after ``limit`` entries."""
    items = sorted(names)
    shown = ", ".join(repr(n) for n in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


# ---------------------------------------------------------------------------
# Streaming weight average
# ---------------------------------------------------------------------------


def _is_averaged(t: Tensor) -> bool:
    """Whether a tensor is averaged (floating/complex) or must match exactly."""
    return t.is_floating_point() or t.is_complex()


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 accumulate in fp32; wider types keep their width."""
    return torch.promote_types(dtype, torch.float32)


class RunningAverage:
    """Streaming uniform average of state dicts.

    Only one fp32 running sum is kept, so callers can load one model at a time.
    Floating tensors are averaged in (at least) float32 and cast back to the
    dtype they had in the first ingredient.  Non-floating tensors (integer or
    boolean buffers) are not averaged: they must be identical everywhere.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._exact: dict[str, Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._shapes: dict[str, torch.Size] = {}
        self._order: list[str] = []
        self._count = 0

    @property
    def count(self) -> int:
        """Number of state dicts added so far."""
        return self._count

    def add(self, state_dict: StateDict) -> None:
        """Add one ingredient; raises :class:`SoupError` if it does not match."""
        if self._count == 0:
            self._start(state_dict)
        else:
            self._validate(state_dict)
            with torch.no_grad():
                for key, acc in self._sums.items():
                    acc.add_(state_dict[key].detach().to(acc.device, acc.dtype))
        self._count += 1

    def result(self) -> dict[str, Tensor]:
        """The average so far, with each key's original dtype restored."""
        if self._count == 0:
            raise SoupError("cannot average zero state dicts")
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for key in self._order:
                if key in self._sums:
                    mean = self._sums[key] / self._count
                    out[key] = mean.to(self._dtypes[key])
                else:
                    out[key] = self._exact[key].clone()
        return out

    def _start(self, state_dict: StateDict) -> None:
        if not state_dict:
            raise SoupError("state dict is empty")
        for key, value in state_dict.items():
            self._check_tensor(key, value)
            self._order.append(key)
            self._dtypes[key] = value.dtype
            self._shapes[key] = value.shape
            tensor = value.detach()
            if _is_averaged(tensor):
                dtype = _accumulator_dtype(tensor.dtype)
                self._sums[key] = tensor.to(dtype=dtype, copy=True)
            else:
                self._exact[key] = tensor.clone()

    def _validate(self, state_dict: StateDict) -> None:
        """Check keys, shapes and exact buffers before mutating the sum."""
        for key, value in state_dict.items():
            self._check_tensor(key, value)
        expected, got = set(self._order), set(state_dict)
        if expected != got:
            parts = []
            if expected - got:
                parts.append(f"missing keys: {_fmt_names(expected - got)}")
            if got - expected:
                parts.append(f"unexpected keys: {_fmt_names(got - expected)}")
            raise SoupError(
                f"ingredient {self._count} has a different key set ({'; '.join(parts)})"
            )
        bad_shapes = [
            f"{key!r}: {tuple(self._shapes[key])} vs {tuple(state_dict[key].shape)}"
            for key in self._order
            if state_dict[key].shape != self._shapes[key]
        ]
        if bad_shapes:
            raise SoupError(
                f"ingredient {self._count} has mismatched shapes: " + "; ".join(bad_shapes)
            )
        for key in self._order:
            value = state_dict[key]
            if _is_averaged(value) != (key in self._sums):
                raise SoupError(
                    f"key {key!r} changes kind: {self._dtypes[key]} vs {value.dtype}"
                )
        for key, ref in self._exact.items():
            value = state_dict[key].detach()
            if value.dtype != ref.dtype or not torch.equal(value.to(ref.device), ref):
                raise SoupError(
                    f"non-floating buffer {key!r} differs in ingredient {self._count}; "
                    "integer/boolean tensors cannot be averaged and must be identical"
                )

    @staticmethod
    def _check_tensor(key: str, value: Any) -> None:
        if not isinstance(value, Tensor):
            raise SoupError(f"value for key {key!r} is not a tensor: {type(value).__name__}")


StateDictSource = Union[StateDict, Callable[[], StateDict]]


def average_state_dicts(items: Iterable[StateDictSource]) -> dict[str, Tensor]:
    """Uniformly average state dicts given as mappings or zero-arg loaders.

    Items are consumed one at a time, so with loaders only one model plus the
    running sum are held in memory.
    """
    avg = RunningAverage()
    for item in items:
        state = item if isinstance(item, Mapping) else item()
        if not isinstance(state, Mapping):
            raise SoupError(f"loader returned {type(state).__name__}, expected a mapping")
        avg.add(state)
        del state
    return avg.result()


# ---------------------------------------------------------------------------
# Candidates, evaluation results and the decision rule
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One fine-tuned model: its id and its own held-out correct count."""

    id: str
    heldout_correct: int
    load: Callable[[], StateDict] | None = field(
        default=None, compare=False, hash=False, repr=False
    )


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


Evaluate = Callable[[list[str], Union[int, None]], EvalResult]
"""``evaluate(ingredient_ids, max_wrong)``: score the soup of those ids.

Ids arrive in sort order.  With ``max_wrong`` set the evaluator may stop as
soon as more than ``max_wrong`` images are wrong (``complete=False``).
"""


def _sort_key(c: Candidate) -> tuple[int, str]:
    return (-c.heldout_correct, c.id)


def sort_candidates(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Sort by held-out correct count descending, then id ascending."""
    return sorted(candidates, key=_sort_key)


def _check_tie(tie: str) -> None:
    if tie not in _TIES:
        raise SoupError(f"tie must be one of {_TIES}, got {tie!r}")


def accept(new_correct: int, current_correct: int, tie: Tie = ">=") -> bool:
    """Greedy rule: keep the new soup when it is at least as good (``>=``) or better (``>``)."""
    _check_tie(tie)
    return new_correct >= current_correct if tie == ">=" else new_correct > current_correct


def max_wrong_for(current_wrong: int, tie: Tie = ">=") -> int:
    """Largest wrong count a candidate soup may reach and still be accepted.

    Scoring can stop as soon as ``wrong > max_wrong_for(...)``: the candidate
    is then certainly rejected, so early rejection never changes a decision.
    A negative value means no candidate can be accepted.
    """
    _check_tie(tie)
    return current_wrong if tie == ">=" else current_wrong - 1


BatchCounts = Union[tuple[int, int], tuple[Tensor, Tensor]]


def _batch_counts(batch: BatchCounts) -> tuple[int, int]:
    """(correct, size) from ``(n_correct, n_total)`` or ``(predictions, labels)``."""
    first, second = batch
    if isinstance(first, Tensor) and isinstance(second, Tensor) and second.dim() > 0:
        preds = first.argmax(dim=-1) if first.dim() == second.dim() + 1 else first
        if preds.shape != second.shape:
            raise SoupError(
                f"predictions {tuple(first.shape)} do not match labels {tuple(second.shape)}"
            )
        return int((preds == second).sum()), second.numel()
    correct, size = int(first), int(second)
    if not 0 <= correct <= size:
        raise SoupError(f"batch with {correct} correct out of {size}")
    return correct, size


def early_rejection_evaluate(
    batches: Iterable[BatchCounts], max_wrong: int | None = None
) -> EvalResult:
    """Score held-out batches lazily, stopping once ``wrong > max_wrong``.

    Each batch is ``(n_correct, n_total)`` or ``(predictions_or_logits, labels)``.
    Batches after the stopping point are never pulled from the iterable (a
    generator is closed), so their forward passes are skipped.
    """
    correct = wrong = evaluated = 0
    if max_wrong is not None and max_wrong < 0:
        return EvalResult(0, 0, 0, complete=False)
    iterator: Iterator[BatchCounts] = iter(batches)
    for batch in iterator:
        n_correct, size = _batch_counts(batch)
        correct += n_correct
        wrong += size - n_correct
        evaluated += size
        if max_wrong is not None and wrong > max_wrong:
            close = getattr(iterator, "close", None)
            if callable(close):
                close()
            return EvalResult(correct, wrong, evaluated, complete=False)
    return EvalResult(correct, wrong, evaluated, complete=True)


def _check_result(result: EvalResult, heldout_size: int, max_wrong: int | None) -> EvalResult:
    """Reject evaluator outputs that would make a greedy decision unsound."""
    if not isinstance(result, EvalResult):
        raise SoupError(f"evaluator returned {type(result).__name__}, expected EvalResult")
    if min(result.correct, result.wrong) < 0 or result.correct + result.wrong != result.evaluated:
        raise SoupError(f"inconsistent evaluation result {result}")
    if result.complete and result.evaluated != heldout_size:
        raise SoupError(
            f"complete evaluation scored {result.evaluated} images, expected {heldout_size}"
        )
    if not result.complete and (max_wrong is None or result.wrong <= max_wrong):
        raise SoupError(
            f"evaluation stopped early without exceeding max_wrong={max_wrong}: {result}"
        )
    return result


# ---------------------------------------------------------------------------
# Greedy soup (batch) and results
# ---------------------------------------------------------------------------


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


_HOPELESS = EvalResult(0, 0, 0, complete=False)

# query(ingredient_ids, max_wrong) -> (result, images scored now)
_Query = Callable[[list[str], Union[int, None]], tuple[EvalResult, int]]


def _start_step(candidate: Candidate) -> Step:
    """The best candidate starts the soup; its score needs no evaluation."""
    c = candidate.heldout_correct
    return Step(candidate.id, 0, c, True, 0, c)


def _decide(
    soup: Sequence[str],
    soup_correct: int,
    candidate: Candidate,
    position: int,
    query: _Query,
    heldout_size: int,
    tie: Tie,
    early_rejection: bool,
) -> Step:
    """Evaluate ``soup + candidate`` and apply the greedy rule."""
    max_wrong = max_wrong_for(heldout_size - soup_correct, tie) if early_rejection else None
    if max_wrong is not None and max_wrong < 0:
        result, scored = _HOPELESS, 0
    else:
        result, scored = query([*soup, candidate.id], max_wrong)
    accepted = result.complete and accept(result.correct, soup_correct, tie)
    return Step(
        candidate_id=candidate.id,
        position=position,
        correct=result.correct if result.complete else None,
        accepted=accepted,
        evaluated=scored,
        soup_correct=result.correct if accepted else soup_correct,
    )


def _validate_candidates(candidates: Sequence[Candidate], heldout_size: int) -> None:
    if heldout_size <= 0:
        raise SoupError(f"heldout_size must be positive, got {heldout_size}")
    seen: set[str] = set()
    for cand in candidates:
        if cand.id in seen:
            raise SoupError(f"duplicate candidate id {cand.id!r}")
        seen.add(cand.id)
        if not 0 <= cand.heldout_correct <= heldout_size:
            raise SoupError(
                f"candidate {cand.id!r} has heldout_correct={cand.heldout_correct} "
                f"outside [0, {heldout_size}]"
            )


class _Counter:
    """Counts evaluator calls and scored images for one batch run."""

    def __init__(self, evaluate: Evaluate, heldout_size: int) -> None:
        self.evaluate = evaluate
        self.heldout_size = heldout_size
        self.evaluations = 0
        self.images = 0

    def __call__(self, ids: list[str], max_wrong: int | None) -> tuple[EvalResult, int]:
        result = _check_result(self.evaluate(ids, max_wrong), self.heldout_size, max_wrong)
        self.evaluations += 1
        self.images += result.evaluated
        return result, result.evaluated


def greedy_soup(
    candidates: Iterable[Candidate],
    evaluate: Evaluate,
    *,
    heldout_size: int,
    tie: Tie = ">=",
    early_rejection: bool = True,
) -> GreedyResult:
    """Greedy soup: add each candidate (best first) if the soup does not get worse.

    ``tie=">="`` keeps equal-accuracy soups (as in the paper); ``">"`` requires
    a strict improvement.  Early rejection stops scoring hopeless soups and
    never changes a decision.
    """
    _check_tie(tie)
    ordered = sort_candidates(candidates)
    if not ordered:
        raise SoupError("greedy soup needs at least one candidate")
    _validate_candidates(ordered, heldout_size)
    counter = _Counter(evaluate, heldout_size)
    history = [_start_step(ordered[0])]
    soup = [ordered[0].id]
    correct = ordered[0].heldout_correct
    for position, cand in enumerate(ordered[1:], start=1):
        step = _decide(soup, correct, cand, position, counter, heldout_size, tie, early_rejection)
        history.append(step)
        if step.accepted:
            soup.append(cand.id)
            correct = step.soup_correct
    return GreedyResult(soup, correct, history, counter.evaluations, counter.images)


def batch_greedy_cost(n_candidates: int, heldout_size: int) -> int:
    """Images scored by a plain greedy soup without early rejection."""
    return max(n_candidates - 1, 0) * heldout_size


def uniform_soup(
    candidates: Iterable[Candidate], evaluate: Evaluate, *, heldout_size: int
) -> GreedyResult:
    """Uniform soup of every candidate, evaluated once (no evaluation for one)."""
    ordered = sort_candidates(candidates)
    if not ordered:
        raise SoupError("uniform soup needs at least one candidate")
    _validate_candidates(ordered, heldout_size)
    ids = [c.id for c in ordered]
    if len(ids) == 1:
        return GreedyResult(ids, ordered[0].heldout_correct)
    counter = _Counter(evaluate, heldout_size)
    result, _ = counter(ids, None)
    return GreedyResult(ids, result.correct, [], counter.evaluations, counter.images)


def best_candidate(candidates: Iterable[Candidate], *, heldout_size: int) -> GreedyResult:
    """The best individual model as a one-ingredient soup."""
    ordered = sort_candidates(candidates)
    if not ordered:
        raise SoupError("need at least one candidate")
    _validate_candidates(ordered, heldout_size)
    return GreedyResult([ordered[0].id], ordered[0].heldout_correct)


# ---------------------------------------------------------------------------
# Exact incremental greedy soup
# ---------------------------------------------------------------------------


@dataclass
class Update:
    """What one :meth:`IncrementalGreedySoup.offer` call changed."""

    added: list[str]
    duplicates: list[str]
    accepted: list[str]
    rejected: list[str]
    joined: list[str]
    dropped: list[str]
    ingredients: list[str]
    correct: int | None
    previous_ingredients: list[str]
    previous_correct: int | None
    replayed_from: int | None
    evaluations: int
    images_evaluated: int

    @property
    def changed(self) -> bool:
        """Whether the soup's ingredients changed."""
        return self.ingredients != self.previous_ingredients


_STATE_VERSION = 1


class IncrementalGreedySoup:
    """Greedy soup maintained exactly while candidates arrive in any order.

    After every :meth:`offer`, ``ingredients`` and ``correct`` equal
    :func:`greedy_soup` over all candidates offered so far.  Decisions before
    the first newcomer's sorted position are kept; later ones are replayed,
    reusing an old decision verbatim whenever the soup it was made against is
    unchanged.  Evaluations are memoised by ingredient set.
    """

    def __init__(
        self,
        evaluate: Evaluate,
        *,
        heldout_size: int,
        tie: Tie = ">=",
        early_rejection: bool = True,
    ) -> None:
        _check_tie(tie)
        if heldout_size <= 0:
            raise SoupError(f"heldout_size must be positive, got {heldout_size}")
        self.evaluate = evaluate
        self.heldout_size = heldout_size
        self.tie: Tie = tie
        self.early_rejection = early_rejection
        self.evaluations = 0
        self.images_evaluated = 0
        self._candidates: list[Candidate] = []
        self._steps: list[Step] = []
        self._soups: list[tuple[tuple[str, ...], int]] = []
        self._memo: dict[frozenset[str], tuple[EvalResult, int | None]] = {}

    # -- read-only views ---------------------------------------------------

    @property
    def candidates(self) -> list[Candidate]:
        """All candidates seen, in sort order."""
        return list(self._candidates)

    @property
    def steps(self) -> list[Step]:
        """The decision at every sorted position."""
        return list(self._steps)

    @property
    def ingredients(self) -> list[str]:
        """Ids in the current soup (empty before the first offer)."""
        return list(self._soups[-1][0]) if self._soups else []

    @property
    def correct(self) -> int | None:
        """Held-out correct count of the current soup (None before the first offer)."""
        return self._soups[-1][1] if self._soups else None

    @property
    def wrong(self) -> int | None:
        """Held-out wrong count of the current soup."""
        return None if self.correct is None else self.heldout_size - self.correct

    @property
    def accuracy(self) -> float | None:
        """Held-out accuracy of the current soup."""
        return None if self.correct is None else self.correct / self.heldout_size

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per sorted position: the candidate, the decision and the soup's accuracy after it."""
        h = self.heldout_size
        points = []
        for cand, step, (soup, correct) in zip(self._candidates, self._steps, self._soups):
            points.append(
                {
                    "position": step.position,
                    "candidate_id": cand.id,
                    "candidate_accuracy": cand.heldout_correct / h,
                    "accepted": step.accepted,
                    "soup_accuracy": correct / h,
                    "n_ingredients": len(soup),
                }
            )
        return points

    def __len__(self) -> int:
        return len(self._candidates)

    def __contains__(self, candidate_id: object) -> bool:
        return any(c.id == candidate_id for c in self._candidates)

    def result(self) -> GreedyResult:
        """The current soup as a :class:`GreedyResult`."""
        if not self._soups:
            raise SoupError("no candidates offered yet")
        return GreedyResult(
            self.ingredients, self._soups[-1][1], self.steps, self.evaluations,
            self.images_evaluated,
        )

    # -- updates -------------------------------------------------------------

    def offer(self, candidates: Iterable[Candidate]) -> Update:
        """Add newcomers (any order, any number) and update the soup exactly."""
        fresh, duplicates = self._split_new(candidates)
        before_ids, before_correct = self.ingredients, self.correct
        evals0, images0 = self.evaluations, self.images_evaluated
        start: int | None = None
        if fresh:
            merged = sort_candidates([*self._candidates, *fresh])
            fresh_ids = {c.id for c in fresh}
            start = next(i for i, c in enumerate(merged) if c.id in fresh_ids)
            self._replay(merged, start)
        now_ids = self.ingredients
        fresh_order = [c.id for c in sort_candidates(fresh)]
        return Update(
            added=fresh_order,
            duplicates=duplicates,
            accepted=[i for i in fresh_order if i in now_ids],
            rejected=[i for i in fresh_order if i not in now_ids],
            joined=[i for i in now_ids if i not in before_ids],
            dropped=[i for i in before_ids if i not in now_ids],
            ingredients=now_ids,
            correct=self.correct,
            previous_ingredients=before_ids,
            previous_correct=before_correct,
            replayed_from=start,
            evaluations=self.evaluations - evals0,
            images_evaluated=self.images_evaluated - images0,
        )

    def _split_new(self, candidates: Iterable[Candidate]) -> tuple[list[Candidate], list[str]]:
        """Separate newcomers from ids already known (or repeated in this call)."""
        known = {c.id for c in self._candidates}
        fresh: list[Candidate] = []
        duplicates: list[str] = []
        for cand in candidates:
            if not isinstance(cand, Candidate):
                raise SoupError(f"expected Candidate, got {type(cand).__name__}")
            if cand.id in known:
                duplicates.append(cand.id)
                continue
            if not 0 <= cand.heldout_correct <= self.heldout_size:
                raise SoupError(
                    f"candidate {cand.id!r} has heldout_correct={cand.heldout_correct} "
                    f"outside [0, {self.heldout_size}]"
                )
            known.add(cand.id)
            fresh.append(cand)
        return fresh, duplicates

    def _replay(self, merged: list[Candidate], start: int) -> None:
        """Recompute decisions from ``start`` on, reusing still-valid ones."""
        previous = self._previous_contexts()
        steps = self._steps[:start]
        soups = self._soups[:start]
        soup, correct = (list(soups[-1][0]), soups[-1][1]) if soups else ([], 0)
        for position in range(start, len(merged)):
            cand = merged[position]
            if position == 0:
                step = _start_step(cand)
            else:
                step = self._reused(previous.get(cand.id), soup, correct, position)
                if step is None:
                    step = _decide(
                        soup, correct, cand, position, self._query,
                        self.heldout_size, self.tie, self.early_rejection,
                    )
            if step.accepted:
                soup.append(cand.id)
            correct = step.soup_correct
            steps.append(step)
            soups.append((tuple(soup), correct))
        self._candidates, self._steps, self._soups = merged, steps, soups

    def _previous_contexts(self) -> dict[str, tuple[frozenset[str], int, Step]]:
        """For each known candidate: the soup its decision was made against."""
        contexts = {}
        soup: frozenset[str] = frozenset()
        correct = 0
        for step, (after, after_correct) in zip(self._steps, self._soups):
            contexts[step.candidate_id] = (soup, correct, step)
            soup, correct = frozenset(after), after_correct
        return contexts

    @staticmethod
    def _reused(
        context: tuple[frozenset[str], int, Step] | None,
        soup: list[str],
        correct: int,
        position: int,
    ) -> Step | None:
        """The old decision, if it was made against the same soup."""
        if context is None:
            return None
        old_soup, old_correct, step = context
        if step.position == 0 or old_correct != correct or old_soup != frozenset(soup):
            return None
        return replace(step, position=position)

    def _query(self, ids: list[str], max_wrong: int | None) -> tuple[EvalResult, int]:
        """Memoised evaluation; returns the result and the images scored now."""
        key = frozenset(ids)
        hit = self._memo.get(key)
        if hit is not None:
            result, used = hit
            # An early-stopped result proves wrong > used >= max_wrong.
            if result.complete or (max_wrong is not None and used is not None and max_wrong <= used):
                return result, 0
        result = _check_result(self.evaluate(list(ids), max_wrong), self.heldout_size, max_wrong)
        self.evaluations += 1
        self.images_evaluated += result.evaluated
        self._memo[key] = (result, max_wrong)
        return result, result.evaluated

    # -- persistence ---------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot (no tensors, no callables)."""
        order = {c.id: i for i, c in enumerate(self._candidates)}
        memo = [
            {
                "ids": sorted(key, key=lambda i: order.get(i, len(order))),
                "max_wrong": used,
                **asdict(result),
            }
            for key, (result, used) in self._memo.items()
        ]
        return {
            "version": _STATE_VERSION,
            "tie": self.tie,
            "heldout_size": self.heldout_size,
            "early_rejection": self.early_rejection,
            "candidates": [
                {"id": c.id, "heldout_correct": c.heldout_correct} for c in self._candidates
            ],
            "steps": [asdict(s) for s in self._steps],
            "soups": [
                {"ingredients": list(ids), "correct": c, "wrong": self.heldout_size - c}
                for ids, c in self._soups
            ],
            "memo": memo,
            "evaluations": self.evaluations,
            "images_evaluated": self.images_evaluated,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], evaluate: Evaluate) -> IncrementalGreedySoup:
        """Rebuild from :meth:`to_state`; raises :class:`SoupError` if inconsistent."""
        if state.get("version") != _STATE_VERSION:
            raise SoupError(f"unsupported state version {state.get('version')!r}")
        soup = cls(
            evaluate,
            heldout_size=int(state["heldout_size"]),
            tie=state["tie"],
            early_rejection=bool(state["early_rejection"]),
        )
        cands = [Candidate(str(c["id"]), int(c["heldout_correct"])) for c in state["candidates"]]
        steps = [Step(**s) for s in state["steps"]]
        soups = [(tuple(s["ingredients"]), int(s["correct"])) for s in state["soups"]]
        _check_loaded(cands, steps, soups, soup.heldout_size)
        soup._candidates, soup._steps, soup._soups = cands, steps, soups
        for entry in state.get("memo", []):
            result = EvalResult(
                int(entry["correct"]), int(entry["wrong"]), int(entry["evaluated"]),
                bool(entry["complete"]),
            )
            soup._memo[frozenset(entry["ids"])] = (result, entry["max_wrong"])
        soup.evaluations = int(state["evaluations"])
        soup.images_evaluated = int(state["images_evaluated"])
        return soup


def _check_loaded(
    cands: list[Candidate],
    steps: list[Step],
    soups: list[tuple[tuple[str, ...], int]],
    heldout_size: int,
) -> None:
    """Verify that a loaded state is internally consistent."""
    _validate_candidates(cands, heldout_size)
    if cands != sort_candidates(cands):
        raise SoupError("state candidates are not in sort order")
    if not len(cands) == len(steps) == len(soups):
        raise SoupError("state has mismatched candidate/step/soup counts")
    ingredients: list[str] = []
    for i, (cand, step, (ids, correct)) in enumerate(zip(cands, steps, soups)):
        if step.candidate_id != cand.id or step.position != i:
            raise SoupError(f"state step {i} does not match candidate {cand.id!r}")
        if step.accepted:
            ingredients.append(cand.id)
        if list(ids) != ingredients or correct != step.soup_correct:
            raise SoupError(f"state soup {i} is inconsistent with the decisions")


# ---------------------------------------------------------------------------
# Ensembles from cached logits
# ---------------------------------------------------------------------------


def _check_logits(logits: Tensor, shape: torch.Size | None, name: str) -> None:
    if logits.dim() != 2:
        raise SoupError(f"logits {name} must be [n_images, n_classes], got {tuple(logits.shape)}")
    if shape is not None and logits.shape != shape:
        raise SoupError(f"logits {name} have shape {tuple(logits.shape)}, expected {tuple(shape)}")


def logit_ensemble(logits_list: Sequence[Tensor]) -> Tensor:
    """Mean of per-model logits ``[n_images, n_classes]`` (computed in at least fp32)."""
    if not logits_list:
        raise SoupError("logit ensemble needs at least one model")
    first = logits_list[0]
    _check_logits(first, None, "0")
    total = first.detach().to(dtype=_accumulator_dtype(first.dtype), copy=True)
    for i, logits in enumerate(logits_list[1:], start=1):
        _check_logits(logits, first.shape, str(i))
        total.add_(logits.detach().to(total.device, total.dtype))
    return total / len(logits_list)


def _count_correct(logit_sum: Tensor, n_models: int, labels: Tensor) -> int:
    preds = (logit_sum / n_models).argmax(dim=-1)
    return int((preds == labels.to(preds.device)).sum())


def greedy_ensemble(
    candidate_ids_sorted: Sequence[str],
    heldout_logits: Mapping[str, Tensor],
    heldout_labels: Tensor,
    tie: Tie = ">=",
) -> GreedyResult:
    """Greedy ensemble: like greedy soup, but on averaged held-out logits.

    Candidates are taken in the given order; the first always starts the
    ensemble.  Returns the chosen ids and their held-out correct count.
    """
    _check_tie(tie)
    ids = list(candidate_ids_sorted)
    if not ids:
        raise SoupError("greedy ensemble needs at least one candidate")
    if len(set(ids)) != len(ids):
        raise SoupError("duplicate candidate ids")
    missing = [i for i in ids if i not in heldout_logits]
    if missing:
        raise SoupError(f"no held-out logits for {_fmt_names(missing)}")
    n_images = heldout_labels.shape[0]
    first = heldout_logits[ids[0]]
    _check_logits(first, None, repr(ids[0]))
    if heldout_labels.dim() != 1 or first.shape[0] != n_images:
        raise SoupError(
            f"labels {tuple(heldout_labels.shape)} do not match logits {tuple(first.shape)}"
        )
    total = first.detach().to(dtype=_accumulator_dtype(first.dtype), copy=True)
    chosen = [ids[0]]
    correct = _count_correct(total, 1, heldout_labels)
    history = [Step(ids[0], 0, correct, True, 0, correct)]
    for position, cid in enumerate(ids[1:], start=1):
        logits = heldout_logits[cid]
        _check_logits(logits, first.shape, repr(cid))
        trial = total + logits.detach().to(total.device, total.dtype)
        trial_correct = _count_correct(trial, len(chosen) + 1, heldout_labels)
        ok = accept(trial_correct, correct, tie)
        if ok:
            total, correct = trial, trial_correct
            chosen.append(cid)
        history.append(Step(cid, position, trial_correct, ok, n_images, correct))
    n_evals = len(ids) - 1
    return GreedyResult(chosen, correct, history, n_evals, n_evals * n_images)


# ---------------------------------------------------------------------------
# Registry of soup methods
# ---------------------------------------------------------------------------

SoupMethod = Callable[..., GreedyResult]
"""``method(candidates, evaluate, *, heldout_size, early_rejection=True) -> GreedyResult``."""

SOUP_METHODS: dict[str, SoupMethod] = {}

_F = TypeVar("_F", bound=SoupMethod)


def register_soup_method(name: str) -> Callable[[_F], _F]:
    """Decorator registering a soup method under ``name``."""

    def decorator(fn: _F) -> _F:
        if name in SOUP_METHODS:
            raise SoupError(f"soup method {name!r} is already registered")
        SOUP_METHODS[name] = fn
        return fn

    return decorator


def get_soup_method(name: str) -> SoupMethod:
    """Look up a registered soup method; the error lists the valid names."""
    try:
        return SOUP_METHODS[name]
    except KeyError:
        valid = ", ".join(sorted(SOUP_METHODS))
        raise SoupError(f"unknown soup method {name!r}; valid methods: {valid}") from None


@register_soup_method("uniform")
def _uniform_method(
    candidates: Iterable[Candidate],
    evaluate: Evaluate,
    *,
    heldout_size: int,
    early_rejection: bool = True,
) -> GreedyResult:
    """Average every candidate."""
    return uniform_soup(candidates, evaluate, heldout_size=heldout_size)


def _greedy_method_with(tie: Tie, doc: str) -> SoupMethod:
    """A registry entry for the greedy soup with one tie rule."""

    def method(
        candidates: Iterable[Candidate],
        evaluate: Evaluate,
        *,
        heldout_size: int,
        early_rejection: bool = True,
    ) -> GreedyResult:
        return greedy_soup(candidates, evaluate, heldout_size=heldout_size, tie=tie, early_rejection=early_rejection)

    method.__doc__ = doc
    return method


register_soup_method("greedy")(_greedy_method_with(">=", "Greedy soup keeping ties (paper rule)."))
register_soup_method("greedy_strict")(_greedy_method_with(">", "Greedy soup requiring strict improvement."))


@register_soup_method("best")
def _best_method(
    candidates: Iterable[Candidate],
    evaluate: Evaluate,
    *,
    heldout_size: int,
    early_rejection: bool = True,
) -> GreedyResult:
    """The best individual model."""
    return best_candidate(candidates, heldout_size=heldout_size)
