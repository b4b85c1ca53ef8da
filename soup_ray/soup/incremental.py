"""The exact incremental greedy soup: candidates arrive in any order, the soup always equals the batch greedy soup."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .base import Candidate, EvalResult, Evaluate, GreedyResult, SoupError, Step, Tie, check_tie, sort_candidates
from .greedy import check_result, decide, start_step, validate_candidates


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
    removed: list[str] = field(default_factory=list)

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
        check_tie(tie)
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
        for cand, step, (soup, correct) in zip(self._candidates, self._steps, self._soups, strict=False):
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
            self.ingredients,
            self._soups[-1][1],
            self.steps,
            self.evaluations,
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

    def remove(self, candidate_ids: Iterable[str]) -> Update:
        """Forget candidates (say, whose weights were lost) and update the soup exactly.

        Afterwards the soup equals :func:`greedy_soup` over the remaining
        candidates. Decisions before the first removed candidate's position are
        kept; later ones are replayed as in :meth:`offer`, reusing an old
        decision whenever the soup it was made against is unchanged. Memoised
        evaluations that include a removed id are forgotten; unknown ids are
        ignored. If an evaluation raises, nothing changes.
        """
        gone = {str(i) for i in candidate_ids} & {c.id for c in self._candidates}
        before_ids, before_correct = self.ingredients, self.correct
        evals0, images0 = self.evaluations, self.images_evaluated
        start: int | None = None
        if gone:
            start = next(i for i, c in enumerate(self._candidates) if c.id in gone)
            self._replay([c for c in self._candidates if c.id not in gone], start)
            self._memo = {k: v for k, v in self._memo.items() if not k & gone}
        now_ids = self.ingredients
        return Update(
            added=[],
            duplicates=[],
            accepted=[],
            rejected=[],
            joined=[i for i in now_ids if i not in before_ids],
            dropped=[i for i in before_ids if i not in now_ids],
            ingredients=now_ids,
            correct=self.correct,
            previous_ingredients=before_ids,
            previous_correct=before_correct,
            replayed_from=start,
            evaluations=self.evaluations - evals0,
            images_evaluated=self.images_evaluated - images0,
            removed=sorted(gone),
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
                    f"candidate {cand.id!r} has heldout_correct={cand.heldout_correct} outside [0, {self.heldout_size}]"
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
                step = start_step(cand)
            else:
                step = self._reused(previous.get(cand.id), soup, correct, position)
                if step is None:
                    step = decide(
                        soup,
                        correct,
                        cand,
                        position,
                        self._query,
                        self.heldout_size,
                        self.tie,
                        self.early_rejection,
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
        for step, (after, after_correct) in zip(self._steps, self._soups, strict=False):
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
        result = check_result(self.evaluate(list(ids), max_wrong), self.heldout_size, max_wrong)
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
            "candidates": [{"id": c.id, "heldout_correct": c.heldout_correct} for c in self._candidates],
            "steps": [asdict(s) for s in self._steps],
            "soups": [
                {"ingredients": list(ids), "correct": c, "wrong": self.heldout_size - c} for ids, c in self._soups
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
                int(entry["correct"]),
                int(entry["wrong"]),
                int(entry["evaluated"]),
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
    validate_candidates(cands, heldout_size)
    if cands != sort_candidates(cands):
        raise SoupError("state candidates are not in sort order")
    if not len(cands) == len(steps) == len(soups):
        raise SoupError("state has mismatched candidate/step/soup counts")
    ingredients: list[str] = []
    for i, (cand, step, (ids, correct)) in enumerate(zip(cands, steps, soups, strict=False)):
        if step.candidate_id != cand.id or step.position != i:
            raise SoupError(f"state step {i} does not match candidate {cand.id!r}")
        if step.accepted:
            ingredients.append(cand.id)
        if list(ids) != ingredients or correct != step.soup_correct:
            raise SoupError(f"state soup {i} is inconsistent with the decisions")
