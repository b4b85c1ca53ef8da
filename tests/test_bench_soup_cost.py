"""The soup-cost benchmark's replay machinery, on synthetic correctness tables (no real run)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

from soup_ray.soup import Candidate, batch_greedy_cost, greedy_soup, sort_candidates

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soup_cost", ROOT / "bench" / "soup_cost.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sc = _load()

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


def _evaluator(vectors: dict[str, list[bool]]) -> tuple[object, MajoritySource]:
    source = MajoritySource(vectors)
    return sc.ReplayEvaluator(source, heldout_size=H, batch_size=BATCH), source


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
    ranked = sc.ReplayEvaluator(lambda ids: seen.append(ids) or [True], heldout_size=1, batch_size=1,
                                rank={"z": 0, "a": 1})
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
    report = sc.run_benchmark(cands, ev, orders=12, seed=4, max_chunk=3, progress=messages.append,
                              progress_every=5)
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
            max(totals) / b["batch_reference_images"])
        assert r["last_arrival_over_one_pass"]["mean"] == pytest.approx(sum(lasts) / len(lasts) / H)
        t = v["targets"]
        assert t["last_arrival_le_one_pass"]["holds_for_every_order"] == (max(lasts) <= H)
        assert t["total_le_batch_reference"]["orders_meeting"] == sum(
            x <= b["batch_reference_images"] for x in totals)
    assert all(o["offers"] == len(cands) for o in report["single"]["per_order"])
    out = tmp_path / "nested" / "soup_cost.json"
    sc.write_report({"run_dir": "synthetic", **report, "time_seconds": 0.1}, out)
    data = json.loads(out.read_text())
    for key in ("run_dir", "N", "H", "baselines", "single", "batched", "all_match_batch", "time_seconds"):
        assert key in data
    assert data["N"] == len(cands) and data["H"] == H
    text = sc.format_summary(data)
    assert "batch reference" in text and "every order" in text


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
