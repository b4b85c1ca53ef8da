"""The soup-cost benchmark's replay machinery, on synthetic correctness tables (no real run)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import soup_ray.bench.soup_cost as sc
from soup_ray.ingredients import Kitchen
from soup_ray.soup import Candidate, batch_greedy_cost, greedy_soup, sort_candidates

H = 40
BATCH = 8


def _synthetic(n: int = 7, seed: int = 3) -> tuple[list[Candidate], dict[str, list[bool]]]:
    """Candidates with random per-image correctness of varied accuracy."""
    rng = random.Random(seed)
    vectors: dict[str, list[bool]] = {}
    for i in range(n):
        p = 0.45 + 0.5 * rng.random()
        vectors[f"t{i:02d}"] = [rng.random() < p for _ in range(H)]
    cands = [Candidate(cid, sum(v)) for cid, v in vectors.items()]
    return cands, vectors


class MajoritySource:
    """A soup gets an image right when at least half of its ingredients do; counts calls."""

    def __init__(self, vectors: dict[str, list[bool]]) -> None:
        self.vectors = vectors
        self.calls = 0

    def __call__(self, ids: list[str]) -> list[bool]:
        self.calls += 1
        return [2 * sum(self.vectors[i][k] for i in ids) >= len(ids) for k in range(H)]


def _evaluator(
    vectors: dict[str, list[bool]], batch_size: int = BATCH, hardest_first: bool | None = None
) -> tuple[object, MajoritySource]:
    """Replay of majority soups; ``hardest_first`` None: no ordering (natural order, no admissions)."""
    source = MajoritySource(vectors)
    ordering = None
    if hardest_first is not None:
        mistakes = {cid: [not x for x in v] for cid, v in vectors.items()}
        ordering = sc.HeldoutOrder(H, mistakes, hardest_first=hardest_first)
    return sc.ReplayEvaluator(source, heldout_size=H, batch_size=batch_size, ordering=ordering), source


class Recorder:
    """Wraps an evaluator; records each call's ingredient set, bound, result and the admitted set then."""

    def __init__(self, evaluate, ordering=None) -> None:
        self.evaluate = evaluate
        self.ordering = ordering
        self.calls: list[tuple[frozenset, object, object]] = []
        self.admitted_at_call: list[frozenset] = []

    def __call__(self, ids, max_wrong):
        result = self.evaluate(ids, max_wrong)
        self.calls.append((frozenset(ids), max_wrong, result))
        if self.ordering is not None:
            self.admitted_at_call.append(frozenset(self.ordering.admitted))
        return result

    def decisions(self) -> list[tuple]:
        """What the soup sees of each call, independent of the image order."""
        return [(ids, mw, r.complete, r.correct if r.complete else None) for ids, mw, r in self.calls]


def _stream(plan, ev, tie: str = ">="):
    """One stream through a fresh actor state (nothing admitted); returns its stats and a recorder."""
    ordering = getattr(ev, "ordering", None)
    if ordering is not None:
        ordering.reset()
    rec = Recorder(ev, ordering)
    stats = sc.run_stream(plan, rec, heldout_size=H, tie=tie, admit=ordering.admit if ordering is not None else None)
    return stats, rec


def test_batch_sizes() -> None:
    assert sc.batch_sizes(359, 256) == [256, 103]
    assert sc.batch_sizes(16, 8) == [8, 8]
    assert sc.batch_sizes(5, 8) == [5]
    with pytest.raises(ValueError):
        sc.batch_sizes(0, 8)


def test_replay_stops_early_and_counts_every_call() -> None:
    # batches of 4: all right, 2 wrong, 2 wrong
    vector = [True] * 4 + [True, False, True, False] + [False, True, False, True]
    calls: list[list[str]] = []

    def source(ids: list[str]) -> list[bool]:
        calls.append(ids)
        return vector

    ev = sc.ReplayEvaluator(source, heldout_size=12, batch_size=4)
    r = ev(["a", "b"], 1)
    assert (r.evaluated, r.wrong, r.correct, r.complete) == (8, 2, 6, False)
    r = ev(["b", "a"], None)
    assert (r.evaluated, r.wrong, r.complete) == (12, 4, True)
    r = ev(["a", "b"], 3)
    assert (r.evaluated, r.wrong, r.complete) == (12, 4, False)
    r = ev(["a", "b"], 4)
    assert (r.evaluated, r.complete) == (12, True)
    # the memo computes once but every call is counted as fresh
    assert len(calls) == 1 and ev.computed == 1 and ev.distinct_sets == 1
    assert ev.calls == 4 and ev.images == 8 + 12 + 12 + 12
    assert ev.correct(["a", "b"]) == 8


def test_table_source_and_canonical_order() -> None:
    table = {frozenset({"a"}): [True, False], frozenset({"a", "b"}): [True, True]}
    ev = sc.ReplayEvaluator(table, heldout_size=2, batch_size=1)
    assert ev(["b", "a"], 0).complete
    assert ev(["a"], 0).evaluated == 2 and not ev(["a"], 0).complete
    with pytest.raises(KeyError):
        ev(["c"], None)
    seen: list[list[str]] = []
    ranked = sc.ReplayEvaluator(
        lambda ids: seen.append(ids) or [True], heldout_size=1, batch_size=1, rank={"z": 0, "a": 1}
    )
    ranked(["a", "z"], None)
    assert seen == [["z", "a"]]
    with pytest.raises(ValueError):
        sc.ReplayEvaluator(lambda ids: [True], heldout_size=2, batch_size=1)(["a"], None)


@pytest.mark.parametrize("tie", [">=", ">"])
def test_streams_match_batch_greedy_and_counts_add_up(tie: str) -> None:
    cands, vectors = _synthetic()
    ev, source = _evaluator(vectors)
    expected = greedy_soup(cands, ev, heldout_size=H, tie=tie)
    assert len(expected.ingredients) > 1  # the table makes a non-trivial soup
    rng = random.Random(0)
    for _ in range(25):
        perm = rng.sample(cands, len(cands))
        for plan in ([[c] for c in perm], sc.random_chunks(perm, rng, 3)):
            outer = sc.CountingEvaluate(ev)
            stats = sc.run_stream(plan, outer, heldout_size=H, tie=tie)
            assert stats.ingredients == expected.ingredients
            assert stats.correct == expected.correct
            assert stats.total_images == outer.images and stats.evaluations == outer.calls
            assert 0 <= stats.last_images <= stats.total_images
            assert stats.last_evaluations <= stats.evaluations
            assert stats.offers == len(plan)
            assert stats.last_offer_size == len(plan[-1])
            ranks = {c.id: i for i, c in enumerate(sort_candidates(cands))}
            assert stats.last_best_rank == min(ranks[c.id] for c in plan[-1])
            best = min(ranks[c.id] for c in plan[0])
            records = 0
            for chunk in plan[1:]:
                top = min(ranks[c.id] for c in chunk)
                records += top < best
                best = min(best, top)
            assert stats.restarts == records
    assert source.calls == ev.distinct_sets  # each set computed once


def test_memo_never_reduces_counted_images() -> None:
    cands, vectors = _synthetic()
    ev, source = _evaluator(vectors)
    plan = [[c] for c in cands]
    first = sc.run_stream(plan, ev, heldout_size=H)
    computed = source.calls
    second = sc.run_stream(plan, ev, heldout_size=H)
    assert source.calls == computed  # nothing recomputed ...
    assert second.total_images == first.total_images > 0  # ... yet counted again in full
    assert second.evaluations == first.evaluations


def test_single_arrival_in_sorted_order_costs_batch_greedy() -> None:
    cands, vectors = _synthetic()
    ev, _ = _evaluator(vectors)
    batch = greedy_soup(cands, ev, heldout_size=H)
    stats = sc.run_stream([[c] for c in sort_candidates(cands)], ev, heldout_size=H)
    assert stats.total_images == batch.images_evaluated
    assert stats.evaluations == batch.evaluations
    full = greedy_soup(cands, ev, heldout_size=H, early_rejection=False)
    assert full.images_evaluated == batch_greedy_cost(len(cands), H)


def test_run_stream_rejects_empty_plans() -> None:
    cands, vectors = _synthetic(n=3)
    ev, _ = _evaluator(vectors)
    with pytest.raises(ValueError):
        sc.run_stream([], ev, heldout_size=H)
    with pytest.raises(ValueError):
        sc.run_stream([[cands[0]], []], ev, heldout_size=H)


def test_random_chunks_cover_items_in_order() -> None:
    cands, _ = _synthetic(n=7)
    chunks = sc.random_chunks(cands, random.Random(1), 3)
    assert [c for ch in chunks for c in ch] == cands
    assert all(1 <= len(ch) <= 3 for ch in chunks)
    with pytest.raises(ValueError):
        sc.random_chunks(cands, random.Random(1), 0)


def test_summarise_and_percentile() -> None:
    values = list(range(1, 21))
    s = sc.summarise(values)
    assert s == {"mean": 10.5, "median": 10.5, "p95": 19.0, "min": 1.0, "max": 20.0}
    assert sc.percentile([5], 95) == 5.0


def test_report_written_with_keys(tmp_path: Path) -> None:
    cands, vectors = _synthetic()
    ev, _ = _evaluator(vectors)
    messages: list[str] = []
    report = sc.run_benchmark(cands, ev, orders=12, seed=4, max_chunk=3, progress=messages.append, progress_every=5)
    assert messages and report["all_match_batch"] and report["mismatches"] == []
    b = report["baselines"]
    assert b["batch_reference_images"] == batch_greedy_cost(len(cands), H)
    assert b["batch_full_images_counted"] == b["batch_reference_images"]
    assert b["one_full_pass_images"] == H
    assert b["batch_early_rejection_images"] <= b["batch_reference_images"]
    for name in ("single", "batched"):
        v = report[name]
        assert v["orders"] == 12 and len(v["per_order"]) == 12
        totals = [o["total"] for o in v["per_order"]]
        lasts = [o["last"] for o in v["per_order"]]
        assert v["total_images"]["max"] == max(totals)
        r = v["ratios"]
        assert r["incremental_total_over_batch_reference"]["max"] == pytest.approx(
            max(totals) / b["batch_reference_images"]
        )
        assert r["last_arrival_over_one_pass"]["mean"] == pytest.approx(sum(lasts) / len(lasts) / H)
        t = v["targets"]
        assert t["last_arrival_le_one_pass"]["holds_for_every_order"] == (max(lasts) <= H)
        assert t["total_le_batch_reference"]["orders_meeting"] == sum(x <= b["batch_reference_images"] for x in totals)
        assert t["last_arrival_le_one_pass"]["fraction_meeting"] == pytest.approx(
            sum(x <= H for x in lasts) / len(lasts)
        )
        assert r["last_arrival_over_one_pass"]["median"] == pytest.approx(v["last_arrival_images"]["median"] / H)
    assert all(o["offers"] == len(cands) for o in report["single"]["per_order"])
    out = tmp_path / "nested" / "soup_cost.json"
    sc.write_report({"run_dir": "synthetic", **report, "time_seconds": 0.1}, out)
    data = json.loads(out.read_text())
    for key in ("run_dir", "N", "H", "baselines", "single", "batched", "all_match_batch", "time_seconds"):
        assert key in data
    assert data["N"] == len(cands) and data["H"] == H
    assert data["heldout_batch_size"] == BATCH and data["hardest_first"] is False
    text = sc.format_summary(data)
    assert "batch reference" in text and "every order" in text and "natural order" in text


def test_mismatch_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    cands, vectors = _synthetic()
    ev, _ = _evaluator(vectors)
    real = sc.greedy_soup

    def wrong_batch(*args, **kwargs):  # a batch answer the streams cannot reproduce
        result = real(*args, **kwargs)
        return dataclasses.replace(result, ingredients=result.ingredients + ["nobody"])

    monkeypatch.setattr(sc, "greedy_soup", wrong_batch)
    report = sc.run_benchmark(cands, ev, orders=3, seed=0)
    assert not report["all_match_batch"]
    assert len(report["mismatches"]) == 6  # every stream of both variants
    m = report["mismatches"][0]
    assert set(m) == {"variant", "order", "arrivals", "incremental", "batch"}
    assert "MISMATCH" in sc.format_summary(report)


def test_cli_defaults() -> None:
    args = sc.parse_args(["some/run"])
    assert (args.orders, args.seed, args.tie, args.max_chunk) == (200, 0, ">=", 4)
    assert args.out == sc.DEFAULT_OUT and not args.no_early_rejection
    # None: take soup.heldout_batch_size / soup.hardest_first from the run config, as the actor does
    assert args.heldout_batch_size is None and args.hardest_first is None
    args = sc.parse_args(["some/run", "--heldout-batch-size", "256", "--no-hardest-first"])
    assert args.heldout_batch_size == 256 and args.hardest_first is False
    assert sc.parse_args(["some/run", "--hardest-first"]).hardest_first is True


# ---------------------------------------------------------------------------
# Held-out order: hardest images first, from the candidates admitted so far
# ---------------------------------------------------------------------------


def _kitchen_order(counts: list[int], hardest_first: bool = True) -> list[int]:
    """``Kitchen.heldout_order`` itself, on a stand-in holding only what it reads."""
    stub = SimpleNamespace(
        heldout_size=len(counts), hardest_first=hardest_first, wrong_counts=torch.tensor(counts, dtype=torch.long)
    )
    return Kitchen.heldout_order(stub).tolist()


def test_heldout_order_matches_the_kitchen() -> None:
    rng = random.Random(5)
    n = 50
    mistakes = {f"c{i}": [rng.random() < 0.3 for _ in range(n)] for i in range(6)}
    order = sc.HeldoutOrder(n, mistakes)
    assert order.order().tolist() == list(range(n))  # nothing admitted: all ties, index order
    counts = [0] * n
    for cid in ["c3", "c0", "c5", "c1"]:
        order.admit([cid])
        counts = [c + int(w) for c, w in zip(counts, mistakes[cid], strict=True)]
        assert order.counts.tolist() == counts
        assert order.order().tolist() == _kitchen_order(counts)  # ties by index (stable)
    order.admit(["no-logits"])  # a candidate without cached logits adds nothing
    assert order.order().tolist() == _kitchen_order(counts)
    with pytest.raises(ValueError):
        order.admit(["c3"])
    natural = sc.HeldoutOrder(n, mistakes, hardest_first=False)
    natural.admit(mistakes)
    assert natural.order().tolist() == list(range(n)) == _kitchen_order(counts, hardest_first=False)
    order.reset()
    assert order.admitted == set() and order.order().tolist() == list(range(n))
    with pytest.raises(ValueError):
        sc.HeldoutOrder(n, {"x": [True] * (n - 1)})


def test_replay_scores_in_the_current_order() -> None:
    # the soup is wrong on the last 4 of 12 images; candidate "a" also gets those wrong
    vector = [True] * 8 + [False] * 4
    ordering = sc.HeldoutOrder(12, {"a": [not x for x in vector], "b": [False] * 12})
    ev = sc.ReplayEvaluator(lambda ids: vector, heldout_size=12, batch_size=4, ordering=ordering)
    with pytest.raises(AssertionError):
        ev(["a", "b"], 0)  # the actor never scores a soup of candidates it has not admitted
    ordering.admit(["b"])
    with pytest.raises(AssertionError):
        ev(["a", "b"], 0)
    ordering.admit(["a"])
    assert ev.batch_correct(["a", "b"]) == (0, 4, 4)  # hard images first
    r = ev(["a", "b"], 0)
    assert (r.evaluated, r.wrong, r.complete) == (4, 4, False)
    r = ev(["a", "b"], 4)
    assert (r.evaluated, r.correct, r.complete) == (12, 8, True)
    assert ev.correct(["a", "b"]) == 8 and ev.vector(["a", "b"]).tolist() == [1] * 8 + [0] * 4
    ordering.reset()
    ordering.admit(["b", "a"])  # same counts, same order
    assert ev.batch_correct(["a", "b"]) == (0, 4, 4)
    natural = sc.ReplayEvaluator(
        lambda ids: vector,
        heldout_size=12,
        batch_size=4,
        ordering=sc.HeldoutOrder(12, ordering.mistakes, hardest_first=False),
    )
    natural.ordering.admit(["a", "b"])
    assert natural.batch_correct(["a", "b"]) == (4, 4, 0)
    assert natural(["a", "b"], 0).evaluated == 12  # the mistakes come last in index order
    assert ev.computed == natural.computed == 1
    with pytest.raises(ValueError):
        sc.ReplayEvaluator(lambda ids: vector, heldout_size=10, batch_size=4, ordering=ordering)


def test_order_uses_only_the_candidates_arrived_so_far() -> None:
    cands, vectors = _synthetic(n=8)
    ev, _ = _evaluator(vectors, hardest_first=True)
    ordering = ev.ordering
    rng = random.Random(2)
    for _ in range(10):
        perm = rng.sample(cands, len(cands))
        for plan in ([[c] for c in perm], sc.random_chunks(perm, rng, 3)):
            ordering.reset()
            offered: list[set[str]] = []
            admitted_sizes: list[int] = []

            def admit(ids: list[str], offered: list[set[str]] = offered) -> None:
                offered.append(set(ids))
                ordering.admit(ids)

            def evaluate(ids, max_wrong, offered=offered, admitted_sizes=admitted_sizes):
                # exactly the offers so far, the current one included, and none after it
                arrived = set().union(*offered)
                assert ordering.admitted == arrived and set(ids) <= arrived
                expected = [sum(not vectors[c][k] for c in arrived) for k in range(H)]
                assert ordering.counts.tolist() == expected
                assert ordering.order().tolist() == _kitchen_order(expected)
                admitted_sizes.append(len(arrived))
                return ev(ids, max_wrong)

            sc.run_stream(plan, evaluate, heldout_size=H, admit=admit)
            assert len(offered) == len(plan)
            if len(plan) == len(cands):  # single arrivals: the order changes along the stream
                assert len(set(admitted_sizes)) > 1


@pytest.mark.parametrize("tie", [">=", ">"])
def test_order_never_changes_the_soup(tie: str) -> None:
    cands, vectors = _synthetic(n=9, seed=11)
    settings = [(None, BATCH)] + [(hf, b) for hf in (False, True) for b in (1, 3, BATCH, H)]
    evs = {s: _evaluator(vectors, batch_size=s[1], hardest_first=s[0])[0] for s in settings}
    base = evs[(None, BATCH)]
    expected = greedy_soup(cands, base, heldout_size=H, tie=tie)
    rng = random.Random(7)
    for _ in range(20):
        perm = rng.sample(cands, len(cands))
        plans = ([[c] for c in perm], sc.random_chunks(perm, rng, 4))
        for plan in plans:
            runs = {s: _stream(plan, ev, tie) for s, ev in evs.items()}
            ref_stats, ref_rec = runs[(None, BATCH)]
            assert ref_stats.ingredients == expected.ingredients
            for stats, rec in runs.values():
                assert stats.ingredients == ref_stats.ingredients and stats.correct == ref_stats.correct
                assert rec.decisions() == ref_rec.decisions()  # same calls, same outcomes
                assert stats.evaluations == ref_stats.evaluations and stats.restarts == ref_stats.restarts
    for (hf, b), ev in evs.items():
        report = sc.run_benchmark(cands, ev, orders=4, seed=1, tie=tie, max_chunk=3)
        assert report["all_match_batch"] and report["batch_soup"]["ingredients"] == expected.ingredients
        assert report["heldout_batch_size"] == b and report["hardest_first"] is bool(hf)


def _hard_tail(n: int = 8, seed: int = 4) -> tuple[list[Candidate], dict[str, list[bool]]]:
    """Every candidate gets images 0..29 right; their mistakes all fall in the last 10 images."""
    rng = random.Random(seed)
    vectors = {}
    for i in range(n):
        p = 0.25 + 0.5 * rng.random()
        vectors[f"h{i}"] = [True] * 30 + [rng.random() > p for _ in range(10)]
    return [Candidate(cid, sum(v)) for cid, v in vectors.items()], vectors


def test_hardest_first_never_counts_more_where_mistakes_are_shared() -> None:
    # A majority soup is only wrong where an ingredient is, so its mistakes are among the images the
    # admitted candidates get wrong: hardest first puts them in the first batches, index order last.
    cands, vectors = _hard_tail()
    hard, _ = _evaluator(vectors, hardest_first=True)
    natural, _ = _evaluator(vectors, hardest_first=False)
    rng = random.Random(0)
    saved = early = 0
    for _ in range(30):
        perm = rng.sample(cands, len(cands))
        for plan in ([[c] for c in perm], sc.random_chunks(perm, rng, 3)):
            h_stats, h_rec = _stream(plan, hard)
            n_stats, n_rec = _stream(plan, natural)
            assert h_stats.ingredients == n_stats.ingredients
            assert h_rec.decisions() == n_rec.decisions()
            for (_, _, hr), (_, _, nr) in zip(h_rec.calls, n_rec.calls, strict=False):
                assert hr.evaluated <= nr.evaluated  # per evaluation, not just in total
                early += not hr.complete
            assert h_stats.total_images <= n_stats.total_images
            assert h_stats.last_images <= n_stats.last_images
            saved += n_stats.total_images - h_stats.total_images
    assert early > 0 and saved > 0  # the example does exercise early rejection
    h_rep = sc.run_benchmark(cands, hard, orders=10, seed=3)
    n_rep = sc.run_benchmark(cands, natural, orders=10, seed=3)
    assert h_rep["batch_soup"] == n_rep["batch_soup"]
    assert h_rep["baselines"]["batch_early_rejection_images"] <= n_rep["baselines"]["batch_early_rejection_images"]
    for name in ("single", "batched"):
        for ho, no in zip(h_rep[name]["per_order"], n_rep[name]["per_order"], strict=True):
            assert ho["total"] <= no["total"] and ho["last"] <= no["last"]
            assert ho["evaluations"] == no["evaluations"]
        assert h_rep[name]["total_images"]["mean"] < n_rep[name]["total_images"]["mean"]


def test_smaller_batches_never_count_more() -> None:
    # with the same order, a batch size dividing another stops at or before the coarser one's stop
    cands, vectors = _synthetic(n=8, seed=9)
    for hf in (False, True):
        totals = []
        for b in (4, 8, H):
            ev, _ = _evaluator(vectors, batch_size=b, hardest_first=hf)
            rep = sc.run_benchmark(cands, ev, orders=8, seed=2)
            totals.append([o["total"] for o in rep["single"]["per_order"]])
        for fine, coarse in zip(totals, totals[1:], strict=False):
            assert all(f <= c for f, c in zip(fine, coarse, strict=True))
