"""Held-out evaluation cost of the incremental greedy soup versus batch greedy.

Admits a finished run's completed trials as soup candidates and feeds them, in
many random arrival orders, to a fresh ``IncrementalGreedySoup`` each time (one
trial per offer, and a batched variant where several trials that finished
together are offered at once). For every order it records the held-out images
scored over the whole stream and by the last offer, and checks that the final
soup equals ``greedy_soup`` over all candidates.

Real evaluation is deterministic, so each ingredient set's per-image held-out
correctness is computed once for real (averaged weights, classifier over the
held-out split in natural index order) and memoised. Every evaluation then
replays that vector the way the soup actor's ``Kitchen.evaluate`` scores the
split at that moment: permuted by ``Kitchen.heldout_order()`` (images most
often misclassified by the candidates admitted SO FAR first, ties by index;
natural order with ``--no-hardest-first``) and cut into batches of
``soup.heldout_batch_size`` that go through ``early_rejection_evaluate``. In a
stream the actor admits an offer's candidates (adding their cached held-out
mistakes to the wrong counts) before offering them to the soup, so the order
used by an offer's evaluations includes that offer's own candidates and no
later ones. The images counted are exactly those a live evaluation would
score, early stops included. The memo only saves wall time here: each
evaluation is counted as if it were fresh. Any order gives identical
decisions; it only changes where early rejection stops.

Baselines: the reference code's batch greedy ((N-1) full held-out passes),
batch greedy with early rejection (all candidates admitted first, as the
offline ``soup-ray soup`` does), and one full held-out pass (H images).
``bench/soup_cost.py`` is the command that runs it and writes a JSON report
(default ``bench/results/soup_cost.json``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluate import predict_logits
from ..ingredients import CheckpointRejected, Kitchen, trial_records_from_results
from ..run_dir import CHECKPOINT_LOGITS
from ..soup import (
    Candidate,
    EvalResult,
    Evaluate,
    IncrementalGreedySoup,
    Tie,
    batch_greedy_cost,
    early_rejection_evaluate,
    greedy_soup,
    sort_candidates,
)
from .stats import percentile

DEFAULT_OUT = Path("bench/results/soup_cost.json")

Vector = Sequence[bool]
"""Per-image held-out correctness of one soup, in natural index order."""
VectorSource = Callable[[list[str]], Vector]
"""``source(ids)``: correctness vector of the soup of ``ids`` (computed for real)."""
VectorTable = Mapping[frozenset, Vector]
"""Pre-computed correctness vectors keyed by ingredient set."""


# ---------------------------------------------------------------------------
# The held-out order of the live soup actor
# ---------------------------------------------------------------------------


class HeldoutOrder:
    """The held-out image order ``Kitchen.heldout_order()`` gives as candidates are admitted.

    ``mistakes`` maps a candidate id to its per-image wrongness on the held-out
    split (natural index order, from its cached held-out logits). A candidate
    without an entry adds nothing, like a checkpoint without cached logits in
    the Kitchen. :meth:`admit` adds a candidate's mistakes to the wrong counts
    (the actor does this before offering it to the soup); :meth:`order` is the
    permutation the next evaluation scores images in: most often wrong first,
    ties by index (a stable sort), or the natural order if ``hardest_first`` is
    false. :meth:`reset` starts a new stream with nothing admitted.
    """

    def __init__(
        self,
        heldout_size: int,
        mistakes: Mapping[str, Sequence[bool]] | None = None,
        *,
        hardest_first: bool = True,
    ) -> None:
        if heldout_size <= 0:
            raise ValueError(f"heldout_size must be positive, got {heldout_size}")
        self.heldout_size = heldout_size
        self.hardest_first = bool(hardest_first)
        self.mistakes: dict[str, np.ndarray] = {}
        for cid, wrong in (mistakes or {}).items():
            arr = np.asarray(wrong, dtype=bool)
            if arr.shape != (heldout_size,):
                raise ValueError(f"mistakes of {cid!r} have shape {arr.shape}, expected ({heldout_size},)")
            self.mistakes[cid] = arr.astype(np.int64)
        self._natural = np.arange(heldout_size)
        self.reset()

    def reset(self) -> None:
        """Forget every admitted candidate (a fresh actor)."""
        self.counts = np.zeros(self.heldout_size, dtype=np.int64)
        self.admitted: set[str] = set()
        self._order: np.ndarray | None = None

    def admit(self, ids: Iterable[str]) -> None:
        """Admit candidates: their mistakes join the wrong counts from now on."""
        for cid in ids:
            if cid in self.admitted:
                raise ValueError(f"candidate {cid!r} admitted twice")
            self.admitted.add(cid)
            wrong = self.mistakes.get(cid)
            if wrong is not None:
                self.counts += wrong
                self._order = None

    def order(self) -> np.ndarray:
        """Image indices in the order the next evaluation scores them."""
        if not self.hardest_first:
            return self._natural
        if self._order is None:
            self._order = np.argsort(-self.counts, kind="stable")
        return self._order

    def check_admitted(self, ids: Iterable[str]) -> None:
        """Raise if a soup of ``ids`` is scored before all of them were admitted."""
        missing = [i for i in ids if i not in self.admitted]
        if missing:
            raise AssertionError(f"evaluating {sorted(missing)} before they were admitted")

    def describe(self) -> dict[str, Any]:
        """Settings for the report."""
        return {
            "hardest_first": self.hardest_first,
            "candidates_with_cached_logits": len(self.mistakes),
        }


# ---------------------------------------------------------------------------
# Replaying memoised evaluations
# ---------------------------------------------------------------------------


def batch_sizes(heldout_size: int, batch_size: int) -> list[int]:
    """Sizes of the held-out batches a sequential loader yields (last one partial)."""
    if heldout_size <= 0 or batch_size <= 0:
        raise ValueError(f"need positive sizes, got heldout_size={heldout_size}, batch_size={batch_size}")
    full, rest = divmod(heldout_size, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


class ReplayEvaluator:
    """``evaluate(ids, max_wrong)`` that replays memoised correctness batch by batch.

    The correctness vector of each ingredient set (natural index order) is
    obtained once from ``source`` (a callable or a table keyed by ``frozenset``
    of ids) and memoised. Each call permutes it by ``ordering.order()`` as it
    stands at that moment (natural order if ``ordering`` is None), cuts it into
    batches of ``batch_size`` (the soup's ``heldout_batch_size``) and replays
    the per-batch correct counts through :func:`early_rejection_evaluate`, so it
    stops at the same batch a live evaluation would, and counts the images
    scored as if it were fresh.
    """

    def __init__(
        self,
        source: VectorSource | VectorTable,
        *,
        heldout_size: int,
        batch_size: int,
        rank: Mapping[str, int] | None = None,
        ordering: HeldoutOrder | None = None,
    ) -> None:
        if ordering is not None and ordering.heldout_size != heldout_size:
            raise ValueError(f"ordering is for {ordering.heldout_size} images, evaluator for {heldout_size}")
        self.source = source
        self.heldout_size = heldout_size
        self.batch_size = batch_size
        self.sizes = batch_sizes(heldout_size, batch_size)
        self._starts = np.cumsum([0, *self.sizes[:-1]])
        self.rank = dict(rank or {})
        self.ordering = ordering
        self.calls = 0
        self.images = 0
        self.computed = 0
        self.compute_seconds = 0.0
        self._memo: dict[frozenset, np.ndarray] = {}

    def _canonical(self, ids: Iterable[str]) -> list[str]:
        """Ids in candidate sort order (averaging order fixed per set)."""
        n = len(self.rank)
        return sorted(ids, key=lambda i: (self.rank.get(i, n), i))

    def _vector(self, ids: list[str]) -> Vector:
        if isinstance(self.source, Mapping):
            try:
                return self.source[frozenset(ids)]
            except KeyError:
                raise KeyError(f"no correctness vector for ingredient set {sorted(ids)}") from None
        return self.source(ids)

    def vector(self, ids: Iterable[str]) -> np.ndarray:
        """Per-image correctness (0/1, natural index order) of the soup of ``ids``, computed once per set."""
        key = frozenset(ids)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        raw = [bool(v) for v in self._vector(self._canonical(key))]
        self.compute_seconds += time.perf_counter() - t0
        if len(raw) != self.heldout_size:
            raise ValueError(
                f"correctness vector of {sorted(key)} has {len(raw)} entries, expected {self.heldout_size}"
            )
        self.computed += 1
        self._memo[key] = np.asarray(raw, dtype=np.int64)
        return self._memo[key]

    def order(self) -> np.ndarray | None:
        """The image order an evaluation uses now (None: natural order)."""
        return None if self.ordering is None else self.ordering.order()

    def batch_correct(self, ids: Iterable[str]) -> tuple[int, ...]:
        """Per-batch correct counts of the soup of ``ids`` in the current image order."""
        vector = self.vector(ids)
        order = self.order()
        if order is not None:
            vector = vector[order]
        return tuple(int(c) for c in np.add.reduceat(vector, self._starts))

    def correct(self, ids: Iterable[str]) -> int:
        """Held-out correct count of the soup of ``ids``."""
        return int(self.vector(ids).sum())

    def __call__(self, ids: list[str], max_wrong: int | None) -> EvalResult:
        if self.ordering is not None:
            self.ordering.check_admitted(ids)
        counts = self.batch_correct(ids)
        result = early_rejection_evaluate(zip(counts, self.sizes, strict=True), max_wrong)
        self.calls += 1
        self.images += result.evaluated
        return result

    @property
    def distinct_sets(self) -> int:
        """Ingredient sets whose correctness has been computed."""
        return len(self._memo)


class CountingEvaluate:
    """Wraps an evaluator and counts the calls and images of one stream."""

    def __init__(self, evaluate: Evaluate) -> None:
        self.evaluate = evaluate
        self.calls = 0
        self.images = 0

    def __call__(self, ids: list[str], max_wrong: int | None) -> EvalResult:
        result = self.evaluate(ids, max_wrong)
        self.calls += 1
        self.images += result.evaluated
        return result


# ---------------------------------------------------------------------------
# Arrival streams
# ---------------------------------------------------------------------------


@dataclass
class StreamStats:
    """Cost and outcome of one arrival stream fed to a fresh incremental soup."""

    total_images: int
    last_images: int
    evaluations: int
    last_evaluations: int
    offers: int
    last_offer_size: int
    last_best_rank: int  # sorted position of the best candidate in the last offer
    restarts: int  # later offers that brought a new best candidate (every decision replayed)
    ingredients: list[str]
    correct: int


class CountMismatch(AssertionError):
    """Images or evaluations reported by the soup disagree with those counted."""


def run_stream(
    chunks: Sequence[Sequence[Candidate]],
    evaluate: Evaluate,
    *,
    heldout_size: int,
    tie: Tie = ">=",
    early_rejection: bool = True,
    admit: Callable[[list[str]], None] | None = None,
) -> StreamStats:
    """Offer ``chunks`` in turn to a fresh :class:`IncrementalGreedySoup` and record the cost.

    ``admit(ids)`` is called with each chunk's ids just before it is offered,
    as the soup actor admits a batch of trials (updating the held-out order)
    before offering them to the soup.
    """
    if not chunks or not all(chunks):
        raise ValueError("need at least one chunk and no empty chunk")
    counter = CountingEvaluate(evaluate)
    soup = IncrementalGreedySoup(counter, heldout_size=heldout_size, tie=tie, early_rejection=early_rejection)
    update_images = update_evals = restarts = 0
    update = None
    for k, chunk in enumerate(chunks):
        if admit is not None:
            admit([c.id for c in chunk])
        update = soup.offer(chunk)
        restarts += int(k > 0 and update.replayed_from == 0)
        update_images += update.images_evaluated
        update_evals += update.evaluations
    assert update is not None
    if not update_images == soup.images_evaluated == counter.images:
        raise CountMismatch(
            f"images: updates {update_images}, soup {soup.images_evaluated}, evaluator {counter.images}"
        )
    if not update_evals == soup.evaluations == counter.calls:
        raise CountMismatch(f"evaluations: updates {update_evals}, soup {soup.evaluations}, evaluator {counter.calls}")
    sorted_ids = [c.id for c in soup.candidates]
    last_ids = {c.id for c in chunks[-1]}
    return StreamStats(
        total_images=soup.images_evaluated,
        last_images=update.images_evaluated,
        evaluations=soup.evaluations,
        last_evaluations=update.evaluations,
        offers=len(chunks),
        last_offer_size=len(chunks[-1]),
        last_best_rank=min(i for i, cid in enumerate(sorted_ids) if cid in last_ids),
        restarts=restarts,
        ingredients=soup.ingredients,
        correct=int(soup.correct),
    )


def random_chunks(items: Sequence[Candidate], rng: random.Random, max_chunk: int) -> list[list[Candidate]]:
    """Split ``items`` (kept in order) into consecutive chunks of 1..``max_chunk`` items."""
    if max_chunk < 1:
        raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
    chunks, i = [], 0
    while i < len(items):
        size = rng.randint(1, max_chunk)
        chunks.append(list(items[i : i + size]))
        i += size
    return chunks


# ---------------------------------------------------------------------------
# Summaries and the benchmark
# ---------------------------------------------------------------------------


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean, median, p95, min and max of a non-empty sequence."""
    return {
        "mean": float(statistics.fmean(values)),
        "median": float(statistics.median(values)),
        "p95": percentile(values, 95, method="nearest_rank"),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def _ratio_summary(ratios: Sequence[float]) -> dict[str, float]:
    return {
        "mean": float(statistics.fmean(ratios)),
        "median": float(statistics.median(ratios)),
        "max": float(max(ratios)),
    }


def _target(ratios: Sequence[float]) -> dict[str, Any]:
    """Whether ``ratio <= 1`` holds on the mean, for every order, and for how many."""
    meeting = sum(r <= 1.0 for r in ratios)
    return {
        "holds_on_mean": statistics.fmean(ratios) <= 1.0,
        "holds_for_every_order": max(ratios) <= 1.0,
        "orders_meeting": meeting,
        "fraction_meeting": meeting / len(ratios),
    }


def _variant_report(stats: list[StreamStats], reference: int, batch_er: int, heldout_size: int) -> dict[str, Any]:
    """Summaries, ratios and target checks of one arrival variant."""
    totals = [s.total_images for s in stats]
    lasts = [s.last_images for s in stats]
    tot_ratio = [t / reference for t in totals] if reference else [0.0 for _ in totals]
    er_ratio = [t / batch_er for t in totals] if batch_er else [0.0 for _ in totals]
    last_ratio = [x / heldout_size for x in lasts]
    over_pass = [s for s in stats if s.last_images > heldout_size]
    by_rank: dict[int, list[int]] = {}
    by_restarts: dict[int, list[int]] = {}
    for s in stats:
        by_rank.setdefault(s.last_best_rank, []).append(s.last_images)
        by_restarts.setdefault(s.restarts, []).append(s.total_images)
    return {
        "orders": len(stats),
        "total_images": summarise(totals),
        "last_arrival_images": summarise(lasts),
        "evaluations": summarise([s.evaluations for s in stats]),
        "last_arrival_evaluations": summarise([s.last_evaluations for s in stats]),
        "offers": summarise([s.offers for s in stats]),
        "ratios": {
            "incremental_total_over_batch_reference": _ratio_summary(tot_ratio),
            "incremental_total_over_batch_early_rejection": _ratio_summary(er_ratio),
            "last_arrival_over_one_pass": _ratio_summary(last_ratio),
        },
        "targets": {
            "total_le_batch_reference": _target(tot_ratio),
            "last_arrival_le_one_pass": _target(last_ratio),
        },
        "last_arrival_images_by_sorted_rank": {
            str(rank): {"orders": len(v), "mean": statistics.fmean(v), "max": max(v)}
            for rank, v in sorted(by_rank.items())
        },
        "total_images_by_restarts": {
            str(k): {"orders": len(v), "mean": statistics.fmean(v), "max": max(v)}
            for k, v in sorted(by_restarts.items())
        },
        "restarts": summarise([s.restarts for s in stats]),
        "orders_last_arrival_over_one_pass": len(over_pass),
        "per_order": [
            {
                "total": s.total_images,
                "last": s.last_images,
                "evaluations": s.evaluations,
                "last_evaluations": s.last_evaluations,
                "offers": s.offers,
                "last_best_rank": s.last_best_rank,
                "restarts": s.restarts,
            }
            for s in stats
        ],
    }


def run_benchmark(
    candidates: Sequence[Candidate],
    evaluator: ReplayEvaluator,
    *,
    orders: int = 200,
    seed: int = 0,
    tie: Tie = ">=",
    early_rejection: bool = True,
    max_chunk: int = 4,
    progress: Callable[[str], None] | None = None,
    progress_every: int = 20,
) -> dict[str, Any]:
    """Baselines plus per-order incremental costs (single and batched arrivals) as a report dict."""
    if orders < 1:
        raise ValueError(f"orders must be >= 1, got {orders}")
    say = progress or (lambda _msg: None)
    cands = sort_candidates(candidates)
    n, h = len(cands), evaluator.heldout_size
    ordering = evaluator.ordering
    admit = ordering.admit if ordering is not None else None
    t0 = time.perf_counter()

    # batch greedy (offline soup): every candidate is admitted before the soup is computed
    if ordering is not None:
        ordering.reset()
        ordering.admit(c.id for c in cands)
    reference = batch_greedy_cost(n, h)
    batch_full = greedy_soup(cands, evaluator, heldout_size=h, tie=tie, early_rejection=False)
    batch_er = greedy_soup(cands, evaluator, heldout_size=h, tie=tie, early_rejection=True)
    expected = batch_er.ingredients
    if batch_full.ingredients != expected:
        raise AssertionError("batch greedy with and without early rejection disagree")
    say(
        f"batch greedy: {len(expected)}/{n} ingredients, {batch_er.correct}/{h} correct; "
        f"reference cost {reference} images, with early rejection {batch_er.images_evaluated}"
    )

    rng = random.Random(seed)
    single: list[StreamStats] = []
    batched: list[StreamStats] = []
    mismatches: list[dict[str, Any]] = []
    for k in range(orders):
        perm = rng.sample(cands, n)
        chunks = random_chunks(perm, rng, max_chunk)
        for name, plan, bucket in (("single", [[c] for c in perm], single), ("batched", chunks, batched)):
            if ordering is not None:
                ordering.reset()  # a fresh actor: nothing admitted yet
            stats = run_stream(plan, evaluator, heldout_size=h, tie=tie, early_rejection=early_rejection, admit=admit)
            bucket.append(stats)
            if stats.ingredients != expected:
                mismatches.append(
                    {
                        "variant": name,
                        "order": k,
                        "arrivals": [[c.id for c in ch] for ch in plan],
                        "incremental": stats.ingredients,
                        "batch": expected,
                    }
                )
        if (k + 1) % progress_every == 0 or k + 1 == orders:
            say(
                f"order {k + 1}/{orders}: {evaluator.distinct_sets} distinct sets computed "
                f"({evaluator.compute_seconds:.1f} s), {len(mismatches)} mismatches, "
                f"{time.perf_counter() - t0:.1f} s"
            )

    return {
        "N": n,
        "H": h,
        "heldout_batch_size": evaluator.batch_size,
        "hardest_first": bool(ordering is not None and ordering.hardest_first),
        "heldout_order": (
            {**ordering.describe(), "wrong_counts_from": "candidates admitted so far (each offer's own included)"}
            if ordering is not None
            else {"hardest_first": False, "candidates_with_cached_logits": 0}
        ),
        "tie": tie,
        "early_rejection": early_rejection,
        "orders": orders,
        "seed": seed,
        "max_chunk": max_chunk,
        "baselines": {
            "batch_reference_images": reference,
            "batch_full_images_counted": batch_full.images_evaluated,
            "batch_early_rejection_images": batch_er.images_evaluated,
            "batch_early_rejection_evaluations": batch_er.evaluations,
            "one_full_pass_images": h,
        },
        "batch_soup": {"ingredients": expected, "correct": batch_er.correct},
        "single": _variant_report(single, reference, batch_er.images_evaluated, h),
        "batched": _variant_report(batched, reference, batch_er.images_evaluated, h),
        "mismatches": mismatches,
        "all_match_batch": not mismatches,
        "distinct_sets_computed": evaluator.distinct_sets,
        "replayed_evaluations": evaluator.calls,
        "compute_seconds": evaluator.compute_seconds,
        "benchmark_seconds": time.perf_counter() - t0,
    }


def write_report(report: Mapping[str, Any], path: Path) -> None:
    """Write ``report`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def format_summary(report: Mapping[str, Any]) -> str:
    """A short human-readable summary of a report."""
    b = report["baselines"]
    lines = [
        f"N={report['N']} candidates, H={report['H']} held-out images, held-out batch "
        f"{report['heldout_batch_size']}, {'hardest first' if report['hardest_first'] else 'natural order'}, "
        f"tie {report['tie']!r}, {report['orders']} orders",
        f"baselines: batch reference {b['batch_reference_images']} images, "
        f"batch + early rejection {b['batch_early_rejection_images']}, one pass {b['one_full_pass_images']}",
    ]
    for name in ("single", "batched"):
        v = report[name]
        r, t = v["ratios"], v["targets"]
        lines.append(
            f"{name:>7}: total mean {v['total_images']['mean']:.0f} / max {v['total_images']['max']:.0f} images "
            f"({r['incremental_total_over_batch_reference']['mean']:.2f}x / "
            f"{r['incremental_total_over_batch_reference']['max']:.2f}x batch reference); "
            f"last offer mean {v['last_arrival_images']['mean']:.0f} / max {v['last_arrival_images']['max']:.0f} "
            f"({r['last_arrival_over_one_pass']['mean']:.2f}x / {r['last_arrival_over_one_pass']['max']:.2f}x one pass, "
            f"median {r['last_arrival_over_one_pass']['median']:.2f}x)"
        )
        lines.append(
            f"{'':>7}  targets: total <= batch for {t['total_le_batch_reference']['orders_meeting']}/{v['orders']} "
            f"orders, last <= one pass for {t['last_arrival_le_one_pass']['orders_meeting']}/{v['orders']} orders"
        )
    lines.append(
        "final soups equal batch greedy in every order"
        if report["all_match_batch"]
        else f"MISMATCH: {len(report['mismatches'])} streams ended with a soup other than batch greedy"
    )
    if "time_seconds" in report:
        lines.append(f"time: {report['time_seconds']:.1f} s ({report['distinct_sets_computed']} real evaluations)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Real runs
# ---------------------------------------------------------------------------


def kitchen_source(kitchen: Any) -> VectorSource:
    """Correctness vectors computed for real: averaged weights, classifier over the held-out split (index order)."""

    def vector(ids: list[str]) -> list[bool]:
        model = kitchen.classifier(list(ids))
        logits, labels = predict_logits(model, kitchen.heldout, kitchen.eval_batch_size)
        return (logits.argmax(dim=-1) == labels).tolist()

    return vector


def candidate_mistakes(kitchen: Any, checkpoint: Path) -> list[bool] | None:
    """Per-image wrongness of one checkpoint's cached held-out logits, as ``Kitchen.admit`` counts it.

    None where the Kitchen adds nothing (no readable logits, or a different number of images).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(Path(checkpoint) / CHECKPOINT_LOGITS), "pt") as f:
            logits = f.get_tensor("heldout")
    except (SafetensorError, OSError, KeyError, RuntimeError):
        return None
    if logits.shape[0] != kitchen.heldout_size:
        return None
    return (logits.argmax(1) != kitchen.heldout_labels).tolist()


@dataclass
class LoadedRun:
    """A finished run's Kitchen, admitted candidates, their held-out mistakes and the rejected trials."""

    kitchen: Any
    candidates: list[Candidate]
    mistakes: dict[str, list[bool]]
    rejected: list[str]


def load_run(run_dir: Path, eval_batch_size: int | None, threads: int | None) -> LoadedRun:
    """Admit a run's trials through its Kitchen and read each candidate's cached held-out mistakes.

    The per-candidate mistakes must add up to the Kitchen's own ``wrong_counts``
    (the counts the live actor orders images by), so the replay cannot drift from it.
    """
    import torch

    kitchen = Kitchen(run_dir, threads=threads)
    if eval_batch_size:
        kitchen.eval_batch_size = eval_batch_size
    cands: list[Candidate] = []
    mistakes: dict[str, list[bool]] = {}
    rejected: list[str] = []
    for record in trial_records_from_results(run_dir):
        try:
            cands.append(kitchen.admit(record))
        except CheckpointRejected as err:
            rejected.append(f"{record.trial_id}: {err}")
            continue
        wrong = candidate_mistakes(kitchen, Path(record.checkpoint))
        if wrong is not None:
            mistakes[record.trial_id] = wrong
    total = torch.zeros(kitchen.heldout_size, dtype=torch.long)
    for wrong in mistakes.values():
        total += torch.as_tensor(wrong, dtype=torch.long)
    if not torch.equal(total, kitchen.wrong_counts):
        raise AssertionError("per-candidate held-out mistakes do not add up to the Kitchen's wrong_counts")
    return LoadedRun(kitchen, cands, mistakes, rejected)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/soup_cost.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("run_dir", type=Path, help="finished run folder (config.json, base/, results.jsonl)")
    ap.add_argument("--orders", type=int, default=200, help="random arrival orders to simulate (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the arrival orders and chunks (default 0)")
    ap.add_argument("--tie", choices=[">=", ">"], default=">=", help="greedy tie rule (default '>=')")
    ap.add_argument(
        "--no-early-rejection", action="store_true", help="incremental soup scores every evaluation in full"
    )
    ap.add_argument(
        "--max-chunk", type=int, default=4, help="batched variant: each offer holds 1..MAX_CHUNK trials (default 4)"
    )
    ap.add_argument(
        "--heldout-batch-size",
        type=int,
        default=None,
        help="held-out images per scored batch, the granularity of early rejection "
        "(default: the run config's soup.heldout_batch_size, as the soup actor uses)",
    )
    ap.add_argument(
        "--hardest-first",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score the images the admitted candidates most often get wrong first; "
        "--no-hardest-first scores them in index order (default: the run config's "
        "soup.hardest_first)",
    )
    ap.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="batch size of the real forward passes that compute the memoised correctness "
        "vectors (wall time only; the counted images do not depend on it)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for the real evaluations (default 1: more is slower on a busy machine)",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report path (default {DEFAULT_OUT})")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark on a finished run; returns 1 if any stream disagreed with batch greedy."""
    args = parse_args(argv)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    say(f"loading {args.run_dir}")
    run = load_run(args.run_dir, args.eval_batch_size, args.threads)
    kitchen, cands = run.kitchen, run.candidates
    for line in run.rejected:
        say(f"rejected {line}")
    if len(cands) < 2:
        say(f"need at least two admitted candidates, got {len(cands)}")
        return 2
    heldout_batch = args.heldout_batch_size or kitchen.heldout_batch_size
    hardest_first = kitchen.hardest_first if args.hardest_first is None else args.hardest_first
    say(
        f"{len(cands)} candidates ({len(run.mistakes)} with cached held-out logits), held-out "
        f"{kitchen.heldout_size} images, scored in batches of {heldout_batch}, "
        f"{'hardest first' if hardest_first else 'natural order'} "
        f"(run config: {kitchen.heldout_batch_size}, hardest_first={kitchen.hardest_first})"
    )
    ranked = sort_candidates(cands)
    evaluator = ReplayEvaluator(
        kitchen_source(kitchen),
        heldout_size=kitchen.heldout_size,
        batch_size=heldout_batch,
        rank={c.id: i for i, c in enumerate(ranked)},
        ordering=HeldoutOrder(kitchen.heldout_size, run.mistakes, hardest_first=hardest_first),
    )
    report = run_benchmark(
        cands,
        evaluator,
        orders=args.orders,
        seed=args.seed,
        tie=args.tie,
        early_rejection=not args.no_early_rejection,
        max_chunk=args.max_chunk,
        progress=say,
    )
    report = {
        "run_dir": str(Path(args.run_dir).resolve()),
        **report,
        "settings": {
            "heldout_batch_size": heldout_batch,
            "heldout_batch_size_from": "flag" if args.heldout_batch_size else "run config (soup.heldout_batch_size)",
            "hardest_first": hardest_first,
            "hardest_first_from": "run config (soup.hardest_first)" if args.hardest_first is None else "flag",
            "run_config": {
                "heldout_batch_size": kitchen.heldout_batch_size,
                "hardest_first": kitchen.hardest_first,
            },
            "compute_batch_size": kitchen.eval_batch_size,
            "argv": list(sys.argv[1:] if argv is None else argv),
        },
        "rejected_trials": run.rejected,
        "candidates": [
            {"id": c.id, "heldout_correct": c.heldout_correct, "cached_logits": c.id in run.mistakes} for c in ranked
        ],
        "torch_threads": _torch_threads(),
        "time_seconds": time.perf_counter() - t0,
    }
    write_report(report, args.out)
    print(format_summary(report))
    say(f"wrote {args.out}")
    return 0 if report["all_match_batch"] else 1


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
