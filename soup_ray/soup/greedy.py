"""Greedy, uniform and best-model soups over candidate ids and an evaluator callback (Wortsman et al., 2022).

Sort the fine-tuned models by held-out accuracy, start from the best one, and
add each next model when the averaged weights do not lose held-out accuracy.
Early rejection stops scoring a candidate soup as soon as it is certainly
worse; it never changes a decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from torch import Tensor

from .base import Candidate, EvalResult, Evaluate, GreedyResult, SoupError, Step, Tie, check_tie, sort_candidates


def accept(new_correct: int, current_correct: int, tie: Tie = ">=") -> bool:
    """Greedy rule: keep the new soup when it is at least as good (``>=``) or better (``>``)."""
    check_tie(tie)
    return new_correct >= current_correct if tie == ">=" else new_correct > current_correct


def max_wrong_for(current_wrong: int, tie: Tie = ">=") -> int:
    """Largest wrong count a candidate soup may reach and still be accepted.

    Scoring can stop as soon as ``wrong > max_wrong_for(...)``: the candidate
    is then certainly rejected, so early rejection never changes a decision.
    A negative value means no candidate can be accepted.
    """
    check_tie(tie)
    return current_wrong if tie == ">=" else current_wrong - 1


BatchCounts = tuple[int, int] | tuple[Tensor, Tensor]


def _batch_counts(batch: BatchCounts) -> tuple[int, int]:
    """(correct, size) from ``(n_correct, n_total)`` or ``(predictions, labels)``."""
    first, second = batch
    if isinstance(first, Tensor) and isinstance(second, Tensor) and second.dim() > 0:
        preds = first.argmax(dim=-1) if first.dim() == second.dim() + 1 else first
        if preds.shape != second.shape:
            raise SoupError(f"predictions {tuple(first.shape)} do not match labels {tuple(second.shape)}")
        return int((preds == second).sum()), second.numel()
    correct, size = int(first), int(second)
    if not 0 <= correct <= size:
        raise SoupError(f"batch with {correct} correct out of {size}")
    return correct, size


def early_rejection_evaluate(batches: Iterable[BatchCounts], max_wrong: int | None = None) -> EvalResult:
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


def check_result(result: EvalResult, heldout_size: int, max_wrong: int | None) -> EvalResult:
    """Reject evaluator outputs that would make a greedy decision unsound."""
    if not isinstance(result, EvalResult):
        raise SoupError(f"evaluator returned {type(result).__name__}, expected EvalResult")
    if min(result.correct, result.wrong) < 0 or result.correct + result.wrong != result.evaluated:
        raise SoupError(f"inconsistent evaluation result {result}")
    if result.complete and result.evaluated != heldout_size:
        raise SoupError(f"complete evaluation scored {result.evaluated} images, expected {heldout_size}")
    if not result.complete and (max_wrong is None or result.wrong <= max_wrong):
        raise SoupError(f"evaluation stopped early without exceeding max_wrong={max_wrong}: {result}")
    return result


# ---------------------------------------------------------------------------
# Greedy soup (batch) and results
# ---------------------------------------------------------------------------


_HOPELESS = EvalResult(0, 0, 0, complete=False)

# query(ingredient_ids, max_wrong) -> (result, images scored now)
Query = Callable[[list[str], int | None], tuple[EvalResult, int]]


def start_step(candidate: Candidate) -> Step:
    """The best candidate starts the soup; its score needs no evaluation."""
    c = candidate.heldout_correct
    return Step(candidate.id, 0, c, True, 0, c)


def decide(
    soup: Sequence[str],
    soup_correct: int,
    candidate: Candidate,
    position: int,
    query: Query,
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


def validate_candidates(candidates: Sequence[Candidate], heldout_size: int) -> None:
    if heldout_size <= 0:
        raise SoupError(f"heldout_size must be positive, got {heldout_size}")
    seen: set[str] = set()
    for cand in candidates:
        if cand.id in seen:
            raise SoupError(f"duplicate candidate id {cand.id!r}")
        seen.add(cand.id)
        if not 0 <= cand.heldout_correct <= heldout_size:
            raise SoupError(
                f"candidate {cand.id!r} has heldout_correct={cand.heldout_correct} outside [0, {heldout_size}]"
            )


class _Counter:
    """Counts evaluator calls and scored images for one batch run."""

    def __init__(self, evaluate: Evaluate, heldout_size: int) -> None:
        self.evaluate = evaluate
        self.heldout_size = heldout_size
        self.evaluations = 0
        self.images = 0

    def __call__(self, ids: list[str], max_wrong: int | None) -> tuple[EvalResult, int]:
        result = check_result(self.evaluate(ids, max_wrong), self.heldout_size, max_wrong)
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
    return greedy_in_order(
        sort_candidates(candidates), evaluate, heldout_size=heldout_size, tie=tie, early_rejection=early_rejection
    )


def greedy_in_order(
    ordered: Sequence[Candidate],
    evaluate: Evaluate,
    *,
    heldout_size: int,
    tie: Tie = ">=",
    early_rejection: bool = True,
) -> GreedyResult:
    """The greedy rule over candidates in the given order: the first starts the soup.

    :func:`greedy_soup` passes them best held-out first; the paper's ablation
    ("greedy soup, random order") passes a shuffled order.
    """
    check_tie(tie)
    ordered = list(ordered)
    if not ordered:
        raise SoupError("greedy soup needs at least one candidate")
    validate_candidates(ordered, heldout_size)
    counter = _Counter(evaluate, heldout_size)
    history = [start_step(ordered[0])]
    soup = [ordered[0].id]
    correct = ordered[0].heldout_correct
    for position, cand in enumerate(ordered[1:], start=1):
        step = decide(soup, correct, cand, position, counter, heldout_size, tie, early_rejection)
        history.append(step)
        if step.accepted:
            soup.append(cand.id)
            correct = step.soup_correct
    return GreedyResult(soup, correct, history, counter.evaluations, counter.images)


def batch_greedy_cost(n_candidates: int, heldout_size: int) -> int:
    """Images scored by a plain greedy soup without early rejection."""
    return max(n_candidates - 1, 0) * heldout_size


def uniform_soup(candidates: Iterable[Candidate], evaluate: Evaluate, *, heldout_size: int) -> GreedyResult:
    """Uniform soup of every candidate, evaluated once (no evaluation for one)."""
    ordered = sort_candidates(candidates)
    if not ordered:
        raise SoupError("uniform soup needs at least one candidate")
    validate_candidates(ordered, heldout_size)
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
    validate_candidates(ordered, heldout_size)
    return GreedyResult([ordered[0].id], ordered[0].heldout_correct)
