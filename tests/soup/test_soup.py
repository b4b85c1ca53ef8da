"""Tests for soup_ray.soup: weight averaging, greedy soups, ensembles, registry."""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterator, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soup_ray.soup import (
    SOUP_METHODS,
    Candidate,
    EvalResult,
    IncrementalGreedySoup,
    RunningAverage,
    SoupError,
    SoupMethod,
    accept,
    average_state_dicts,
    batch_greedy_cost,
    configure_soup_method,
    early_rejection_evaluate,
    get_soup_method,
    greedy_ensemble,
    greedy_in_order,
    greedy_soup,
    logit_ensemble,
    max_wrong_for,
    register_soup_method,
    sort_candidates,
    uniform_soup,
)

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# Synthetic evaluators
# ---------------------------------------------------------------------------


class SyntheticEvaluator:
    """Soup correctness = majority vote of ingredient vectors, hash-seeded ties.

    A single ingredient reproduces its own vector exactly, so its correct
    count equals ``Candidate.heldout_correct``.  Images are scored one batch
    at a time through ``early_rejection_evaluate``.
    """

    def __init__(self, vectors: dict[str, list[bool]], batch_size: int = 1) -> None:
        self.vectors = vectors
        self.heldout_size = len(next(iter(vectors.values())))
        self.batch_size = batch_size
        self.calls = 0
        self.images = 0
        self.queries: list[tuple[list[str], int | None]] = []

    def correctness(self, ids: Sequence[str]) -> list[bool]:
        if len(ids) == 1:
            return list(self.vectors[ids[0]])
        rng = random.Random(zlib.crc32("|".join(sorted(ids)).encode()))
        out = []
        for j in range(self.heldout_size):
            votes = 2 * sum(self.vectors[i][j] for i in ids)
            out.append(votes > len(ids) or (votes == len(ids) and rng.random() < 0.5))
        return out

    def __call__(self, ids: list[str], max_wrong: int | None) -> EvalResult:
        assert len(set(ids)) == len(ids)
        self.queries.append((list(ids), max_wrong))
        vec = self.correctness(ids)

        def batches() -> Iterator[tuple[int, int]]:
            for j in range(0, len(vec), self.batch_size):
                chunk = vec[j : j + self.batch_size]
                yield sum(chunk), len(chunk)

        result = early_rejection_evaluate(batches(), max_wrong)
        self.calls += 1
        self.images += result.evaluated
        return result


class TableEvaluator:
    """Soup scores from an explicit table; wrong images come first."""

    def __init__(self, heldout_size: int, scores: dict[frozenset[str], int]) -> None:
        self.heldout_size = heldout_size
        self.scores = scores
        self.calls = 0

    def __call__(self, ids: list[str], max_wrong: int | None) -> EvalResult:
        self.calls += 1
        correct = self.scores[frozenset(ids)]
        wrong = self.heldout_size - correct
        batches = [(0, 1)] * wrong + [(1, 1)] * correct
        return early_rejection_evaluate(iter(batches), max_wrong)


def make_vectors(scores: dict[str, int], heldout_size: int, seed: int) -> dict[str, list[bool]]:
    rng = random.Random(seed)
    vectors = {}
    for cid, score in scores.items():
        right = set(rng.sample(range(heldout_size), score))
        vectors[cid] = [j in right for j in range(heldout_size)]
    return vectors


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    """Candidates with deliberate score ties, an arrival order and offer chunks."""
    heldout_size = draw(st.integers(5, 40))
    n = draw(st.integers(1, 9))
    pool = draw(st.lists(st.integers(0, heldout_size), min_size=1, max_size=3))
    names = draw(st.permutations([f"m{i}" for i in range(n)]))
    scores = {name: draw(st.sampled_from(pool)) for name in names}
    vectors = make_vectors(scores, heldout_size, draw(st.integers(0, 2**32 - 1)))
    cands = [Candidate(name, score) for name, score in scores.items()]
    order = draw(st.permutations(cands))
    cuts = draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1))
    chunks, current = [], [order[0]]
    for cand, cut in zip(order[1:], cuts, strict=True):
        if cut:
            chunks.append(current)
            current = []
        current.append(cand)
    chunks.append(current)
    return {
        "heldout_size": heldout_size,
        "vectors": vectors,
        "candidates": cands,
        "chunks": chunks,
        "tie": draw(st.sampled_from([">=", ">"])),
        "early": draw(st.booleans()),
        "batch_size": draw(st.integers(1, 4)),
    }


def reference(cands: list[Candidate], sc: dict, early: bool | None = None):
    ev = SyntheticEvaluator(sc["vectors"], sc["batch_size"])
    early = sc["early"] if early is None else early
    res = greedy_soup(cands, ev, heldout_size=sc["heldout_size"], tie=sc["tie"], early_rejection=early)
    return res, ev


# ---------------------------------------------------------------------------
# Decision rule and early rejection
# ---------------------------------------------------------------------------


@given(
    st.integers(1, 50).flatmap(lambda h: st.tuples(st.just(h), st.integers(0, h), st.integers(0, h))),
    st.sampled_from([">=", ">"]),
)
def test_max_wrong_is_exact(hcn, tie):
    h, current, new = hcn
    assert accept(new, current, tie) == (h - new <= max_wrong_for(h - current, tie))


def test_accept_rules():
    assert accept(5, 5, ">=") and not accept(5, 5, ">")
    assert accept(6, 5, ">") and not accept(4, 5, ">=")
    assert max_wrong_for(3, ">=") == 3 and max_wrong_for(3, ">") == 2
    with pytest.raises(SoupError):
        accept(1, 1, "<")  # type: ignore[arg-type]


def test_early_rejection_evaluate_is_lazy():
    pulled = []

    def batches():
        for i in range(10):
            pulled.append(i)
            yield (1, 4)  # 3 wrong per batch

    res = early_rejection_evaluate(batches(), max_wrong=4)
    assert res == EvalResult(correct=2, wrong=6, evaluated=8, complete=False)
    assert pulled == [0, 1]
    full = early_rejection_evaluate([(1, 4)] * 3, None)
    assert full == EvalResult(3, 9, 12, True)
    assert early_rejection_evaluate([(4, 4)] * 3, 0).complete
    pulled.clear()
    assert early_rejection_evaluate(batches(), -1) == EvalResult(0, 0, 0, False)
    assert pulled == []


def test_early_rejection_evaluate_tensors():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    assert early_rejection_evaluate([(logits, labels)]) == EvalResult(2, 1, 3, True)
    preds = logits.argmax(-1)
    assert early_rejection_evaluate([(preds, labels), (preds, labels)], 0).evaluated == 3
    with pytest.raises(SoupError):
        early_rejection_evaluate([(5, 3)])


# ---------------------------------------------------------------------------
# Batch greedy soup
# ---------------------------------------------------------------------------


def test_sort_candidates_ties_by_id():
    cands = [Candidate("b", 5), Candidate("a", 5), Candidate("c", 7)]
    assert [c.id for c in sort_candidates(cands)] == ["c", "a", "b"]
    assert Candidate("a", 5, load=lambda: {}) == Candidate("a", 5)


def test_greedy_soup_example():
    scores = {
        frozenset("ab"): 9,
        frozenset("abc"): 7,
        frozenset("abd"): 10,
    }
    ev = TableEvaluator(10, scores)
    cands = [Candidate("d", 6), Candidate("b", 8), Candidate("a", 9), Candidate("c", 7)]
    res = greedy_soup(cands, ev, heldout_size=10)
    assert res.ingredients == ["a", "b", "d"]
    assert res.correct == 10
    assert [s.accepted for s in res.history] == [True, True, False, True]
    assert res.history[2].correct is None  # rejected early
    assert res.history[2].evaluated == 2  # stopped after the second wrong image
    assert res.evaluations == 3 and ev.calls == 3
    strict_scores = {frozenset("ab"): 9, frozenset("ac"): 10, frozenset("acd"): 10}
    strict = greedy_soup(cands, TableEvaluator(10, strict_scores), heldout_size=10, tie=">")
    assert strict.ingredients == ["a", "c"] and strict.correct == 10
    assert [s.accepted for s in strict.history] == [True, False, True, False]
    assert strict.evaluations == 2  # {a, c, d} is hopeless: no wrong answer allowed
    assert batch_greedy_cost(4, 10) == 30 and batch_greedy_cost(0, 10) == 0


def test_greedy_soup_validation():
    ev = TableEvaluator(10, {})
    with pytest.raises(SoupError):
        greedy_soup([], ev, heldout_size=10)
    with pytest.raises(SoupError, match="duplicate"):
        greedy_soup([Candidate("a", 1), Candidate("a", 2)], ev, heldout_size=10)
    with pytest.raises(SoupError, match="outside"):
        greedy_soup([Candidate("a", 11)], ev, heldout_size=10)


@PROPS
@given(scenarios())
def test_early_rejection_never_changes_a_decision(sc):
    cands = sc["candidates"]
    with_er, ev_on = reference(cands, sc, early=True)
    without, ev_off = reference(cands, sc, early=False)
    assert with_er.ingredients == without.ingredients
    assert with_er.correct == without.correct
    assert [s.accepted for s in with_er.history] == [s.accepted for s in without.history]
    assert [s.soup_correct for s in with_er.history] == [s.soup_correct for s in without.history]
    assert with_er.images_evaluated <= without.images_evaluated
    assert without.images_evaluated == batch_greedy_cost(len(cands), sc["heldout_size"])
    assert with_er.images_evaluated == ev_on.images == sum(s.evaluated for s in with_er.history)
    assert without.evaluations == ev_off.calls == len(cands) - 1
    for ids, _ in ev_on.queries:  # the evaluator always sees ids in sort order
        order = [c.id for c in sort_candidates(c for c in cands if c.id in ids)]
        assert ids == order


def test_uniform_soup():
    ev = TableEvaluator(10, {frozenset("abc"): 6})
    cands = [Candidate("c", 5), Candidate("a", 9), Candidate("b", 7)]
    res = uniform_soup(cands, ev, heldout_size=10)
    assert res.ingredients == ["a", "b", "c"] and res.correct == 6
    assert res.evaluations == 1 and res.images_evaluated == 10
    single = uniform_soup([Candidate("x", 4)], ev, heldout_size=10)
    assert single.ingredients == ["x"] and single.correct == 4 and single.evaluations == 0


# ---------------------------------------------------------------------------
# Incremental greedy soup
# ---------------------------------------------------------------------------


@PROPS
@given(scenarios())
def test_incremental_matches_batch_after_every_offer(sc):
    ev = SyntheticEvaluator(sc["vectors"], sc["batch_size"])
    inc = IncrementalGreedySoup(ev, heldout_size=sc["heldout_size"], tie=sc["tie"], early_rejection=sc["early"])
    seen: list[Candidate] = []
    for chunk in sc["chunks"]:
        upd = inc.offer(chunk)
        seen.extend(chunk)
        ref, _ = reference(seen, sc)
        other, _ = reference(seen, sc, early=not sc["early"])
        assert inc.ingredients == ref.ingredients == other.ingredients == upd.ingredients
        assert inc.correct == ref.correct == other.correct == upd.correct
        assert [s.accepted for s in inc.steps] == [s.accepted for s in ref.history]
        assert [s.soup_correct for s in inc.steps] == [s.soup_correct for s in ref.history]
        assert [c.id for c in inc.candidates] == [s.candidate_id for s in ref.history]
        # Never more work than recomputing the batch soup from scratch.
        assert upd.evaluations <= ref.evaluations
        assert upd.images_evaluated <= ref.images_evaluated
        assert sorted(upd.added) == sorted(c.id for c in chunk)
        assert set(upd.accepted) | set(upd.rejected) == set(upd.added)
        assert inc.evaluations == ev.calls and inc.images_evaluated == ev.images
        assert len(inc.history) == len(seen)
        assert inc.history[-1]["soup_accuracy"] == ref.correct / sc["heldout_size"]
    # Re-offering everything is a no-op.
    again = inc.offer(sc["candidates"])
    assert again.added == [] and sorted(again.duplicates) == sorted(c.id for c in sc["candidates"])
    assert again.evaluations == 0 and not again.changed


@PROPS
@given(scenarios(), st.data())
def test_removing_candidates_leaves_the_batch_soup_of_the_others(sc, data):
    ev = SyntheticEvaluator(sc["vectors"], sc["batch_size"])
    inc = IncrementalGreedySoup(ev, heldout_size=sc["heldout_size"], tie=sc["tie"], early_rejection=sc["early"])
    inc.offer(sc["candidates"])
    ids = [c.id for c in sc["candidates"]]
    gone = data.draw(st.lists(st.sampled_from(ids), unique=True, max_size=len(ids)))
    upd = inc.remove([*gone, "never-offered"])
    rest = [c for c in sc["candidates"] if c.id not in gone]
    assert sorted(upd.removed) == sorted(gone) and [c.id for c in inc.candidates] == [
        c.id for c in sort_candidates(rest)
    ]
    if rest:
        ref, _ = reference(rest, sc)
        assert inc.ingredients == ref.ingredients == upd.ingredients and inc.correct == ref.correct
        assert [s.accepted for s in inc.steps] == [s.accepted for s in ref.history]
    else:
        assert inc.ingredients == [] and inc.correct is None
    state = inc.to_state()
    assert not any(set(m["ids"]) & set(gone) for m in state["memo"])  # no stale score survives
    IncrementalGreedySoup.from_state(state, ev)  # and the state stays consistent
    if gone:  # a removed candidate offered again joins as a newcomer
        back = next(c for c in sc["candidates"] if c.id == gone[0])
        assert inc.offer([back]).added == [back.id]


def test_a_failed_removal_changes_nothing():
    calls = {"n": 0}
    scores = {
        frozenset({"a"}): 8,
        frozenset({"b"}): 7,
        frozenset({"c"}): 6,
        frozenset({"a", "b"}): 9,
        frozenset({"a", "b", "c"}): 9,
    }

    def ev(ids, max_wrong):
        calls["n"] += 1
        if "a" not in ids:
            raise OSError("weights gone")
        return TableEvaluator(10, scores)(ids, max_wrong)

    inc = IncrementalGreedySoup(ev, heldout_size=10)
    inc.offer([Candidate("a", 8), Candidate("b", 7), Candidate("c", 6)])
    before = inc.to_state()
    with pytest.raises(OSError):
        inc.remove(["a"])  # b then c must be scored without a
    assert inc.to_state() == before


@PROPS
@given(scenarios(), st.data())
def test_rejected_newcomer_costs_one_evaluation(sc, data):
    cands = sc["candidates"]
    if len(cands) < 2:
        return
    newcomer = data.draw(st.sampled_from(cands))
    base = [c for c in cands if c.id != newcomer.id]
    ev = SyntheticEvaluator(sc["vectors"], sc["batch_size"])
    inc = IncrementalGreedySoup(ev, heldout_size=sc["heldout_size"], tie=sc["tie"], early_rejection=sc["early"])
    inc.offer(base)
    old_steps = {s.candidate_id: s for s in inc.steps}
    upd = inc.offer([newcomer])
    if upd.rejected != [newcomer.id]:
        return
    pos = upd.replayed_from
    assert pos is not None and pos > 0
    soup_wrong = sc["heldout_size"] - inc.steps[pos - 1].soup_correct
    hopeless = sc["early"] and max_wrong_for(soup_wrong, sc["tie"]) < 0
    assert upd.evaluations == (0 if hopeless else 1)
    assert not upd.changed
    for step in inc.steps:
        if step.candidate_id != newcomer.id:
            old = old_steps[step.candidate_id]
            assert (old.accepted, old.correct, old.soup_correct) == (step.accepted, step.correct, step.soup_correct)


def test_incremental_example_and_costs():
    scores = {
        frozenset("ab"): 9,
        frozenset("abc"): 10,
        frozenset("abd"): 7,
        frozenset("ea"): 10,
        frozenset("eab"): 10,
        frozenset("eabd"): 10,
        frozenset("eabdc"): 10,
    }
    ev = TableEvaluator(10, scores)
    inc = IncrementalGreedySoup(ev, heldout_size=10)
    upd = inc.offer([Candidate("c", 7), Candidate("a", 9), Candidate("b", 8)])
    assert upd.ingredients == ["a", "b", "c"] and upd.correct == 10
    assert upd.evaluations == 2
    # d ties with b, sorts after it (position 2), and is rejected: one evaluation.
    upd = inc.offer([Candidate("d", 8)])
    assert upd.rejected == ["d"] and upd.replayed_from == 2
    # Soup {a, b} has 1 wrong, so scoring stops at the second wrong image.
    assert upd.evaluations == 1 and upd.images_evaluated == 2
    assert inc.ingredients == ["a", "b", "c"]
    # Duplicate id: no-op.
    upd = inc.offer([Candidate("d", 8)])
    assert upd.duplicates == ["d"] and upd.evaluations == 0
    # A new best becomes the start; everything after is replayed.
    upd = inc.offer([Candidate("e", 10)])
    assert upd.replayed_from == 0 and upd.accepted == ["e"] and upd.evaluations == 4
    assert upd.joined == ["e", "d"] and upd.dropped == []
    assert inc.ingredients == ["e", "a", "b", "d", "c"]
    assert inc.correct == 10
    assert inc.history[0]["candidate_id"] == "e"
    with pytest.raises(SoupError, match="outside"):
        inc.offer([Candidate("f", 11)])


def test_memo_reuses_complete_results():
    calls = []

    def evaluate(ids, max_wrong):
        calls.append((tuple(ids), max_wrong))
        return EvalResult(5, 5, 10, True)

    inc = IncrementalGreedySoup(evaluate, heldout_size=10, early_rejection=False)
    inc.offer([Candidate("a", 5), Candidate("b", 5)])
    inc.offer([Candidate("a0", 5)])  # sorts between a and b: {a, a0} then {a, a0, b}
    assert calls == [(("a", "b"), None), (("a", "a0"), None), (("a", "a0", "b"), None)]
    assert inc.ingredients == ["a", "a0", "b"]


def test_memo_early_stopped_results_only_answer_stricter_queries():
    ev = TableEvaluator(10, {frozenset("ab"): 6})
    inc = IncrementalGreedySoup(ev, heldout_size=10)
    first, scored = inc._query(["a", "b"], 1)
    assert not first.complete and scored == 2 and ev.calls == 1
    assert inc._query(["a", "b"], 0) == (first, 0) and ev.calls == 1
    full, scored = inc._query(["a", "b"], 5)  # a looser bound needs a new evaluation
    assert full.complete and full.correct == 6 and scored == 10 and ev.calls == 2
    assert inc._query(["a", "b"], None) == (full, 0) and ev.calls == 2


def test_evaluator_contract_is_checked():
    inc = IncrementalGreedySoup(lambda ids, m: EvalResult(3, 3, 6, True), heldout_size=10)
    inc.offer([Candidate("a", 5)])
    with pytest.raises(SoupError, match="expected 10"):
        inc.offer([Candidate("b", 4)])
    bad_stop = IncrementalGreedySoup(lambda ids, m: EvalResult(1, 1, 2, False), heldout_size=10, early_rejection=False)
    bad_stop.offer([Candidate("a", 5)])
    with pytest.raises(SoupError, match="stopped early"):
        bad_stop.offer([Candidate("b", 4)])


@PROPS
@given(scenarios(), st.data())
def test_state_round_trip_mid_stream(sc, data):
    chunks = sc["chunks"]
    k = data.draw(st.integers(0, len(chunks)))
    kwargs = dict(heldout_size=sc["heldout_size"], tie=sc["tie"], early_rejection=sc["early"])
    a = IncrementalGreedySoup(SyntheticEvaluator(sc["vectors"], sc["batch_size"]), **kwargs)
    for chunk in chunks[:k]:
        a.offer(chunk)
    state = json.loads(json.dumps(a.to_state()))
    b = IncrementalGreedySoup.from_state(state, SyntheticEvaluator(sc["vectors"], sc["batch_size"]))
    assert b.to_state() == a.to_state()
    for chunk in chunks[k:]:
        assert a.offer(chunk) == b.offer(chunk)
        assert a.to_state() == b.to_state()
    assert a.steps == b.steps


def test_from_state_rejects_corruption():
    ev = TableEvaluator(10, {frozenset("ab"): 9})
    inc = IncrementalGreedySoup(ev, heldout_size=10)
    inc.offer([Candidate("a", 9), Candidate("b", 8)])
    state = json.loads(json.dumps(inc.to_state()))
    state["soups"][1]["ingredients"] = ["a"]
    with pytest.raises(SoupError, match="inconsistent"):
        IncrementalGreedySoup.from_state(state, ev)
    state = inc.to_state()
    state["version"] = 99
    with pytest.raises(SoupError, match="version"):
        IncrementalGreedySoup.from_state(state, ev)


# ---------------------------------------------------------------------------
# Weight averaging
# ---------------------------------------------------------------------------

TOLERANCES = {
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float32: (1e-6, 1e-6),
    torch.float64: (1e-12, 1e-12),
}


@PROPS
@given(
    shapes=st.lists(st.lists(st.integers(1, 4), max_size=3), min_size=1, max_size=3),
    count=st.integers(1, 6),
    dtype=st.sampled_from(list(TOLERANCES)),
    seed=st.integers(0, 2**31 - 1),
)
def test_running_average_matches_float64_mean(shapes, count, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    dicts = [
        {f"w{i}": (torch.randn(tuple(s), generator=gen) * 3).to(dtype) for i, s in enumerate(shapes)}
        | {"steps": torch.tensor([7, 1])}
        for _ in range(count)
    ]
    originals = [{k: v.clone() for k, v in d.items()} for d in dicts]
    avg = RunningAverage()
    for d in dicts:
        avg.add(d)
    out = avg.result()
    assert avg.count == count
    assert list(out) == list(dicts[0])
    for key in out:
        if key == "steps":
            assert torch.equal(out[key], dicts[0][key])
            continue
        expected = torch.stack([d[key].double() for d in dicts]).mean(0)
        assert out[key].dtype == dtype and out[key].shape == expected.shape
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(out[key].double(), expected, rtol=rtol, atol=atol)
    for d, orig in zip(dicts, originals, strict=True):  # inputs are never modified
        for key in d:
            assert torch.equal(d[key], orig[key])


def test_average_state_dicts_accepts_loaders_lazily():
    loaded = []

    def loader(value: float):
        def load():
            loaded.append(value)
            return {"w": torch.full((2,), value, dtype=torch.float16), "n": torch.tensor(3)}

        return load

    items = (
        loader(v) if i % 2 else {"w": torch.full((2,), v, dtype=torch.float16), "n": torch.tensor(3)}
        for i, v in enumerate([1.0, 2.0, 3.0, 6.0])
    )
    out = average_state_dicts(items)
    assert loaded == [2.0, 6.0]
    assert out["w"].dtype == torch.float16
    assert torch.equal(out["w"], torch.full((2,), 3.0, dtype=torch.float16))
    assert torch.equal(out["n"], torch.tensor(3))
    with pytest.raises(SoupError):
        average_state_dicts([])


def test_running_average_errors():
    base = {"w": torch.zeros(2, 3), "num_batches_tracked": torch.tensor(5)}
    avg = RunningAverage()
    avg.add(base)
    with pytest.raises(SoupError, match="num_batches_tracked"):
        avg.add({"w": torch.zeros(2, 3), "num_batches_tracked": torch.tensor(6)})
    with pytest.raises(SoupError, match=r"missing keys: 'num_batches_tracked'"):
        avg.add({"w": torch.zeros(2, 3)})
    with pytest.raises(SoupError, match=r"unexpected keys: 'extra'"):
        avg.add(base | {"extra": torch.zeros(1)})
    with pytest.raises(SoupError, match=r"'w': \(2, 3\) vs \(3, 2\)"):
        avg.add({"w": torch.zeros(3, 2), "num_batches_tracked": torch.tensor(5)})
    # Failed adds leave the average untouched.
    avg.add({"w": torch.ones(2, 3), "num_batches_tracked": torch.tensor(5)})
    assert avg.count == 2
    assert torch.equal(avg.result()["w"], torch.full((2, 3), 0.5))
    assert issubclass(SoupError, ValueError)
    with pytest.raises(SoupError):
        RunningAverage().result()


# ---------------------------------------------------------------------------
# Ensembles
# ---------------------------------------------------------------------------


def test_logit_ensemble_is_mean():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, 4, generator=gen) for _ in range(3)]
    torch.testing.assert_close(logit_ensemble(logits), torch.stack(logits).mean(0))
    half = logit_ensemble([t.half() for t in logits])
    assert half.dtype == torch.float32
    with pytest.raises(SoupError):
        logit_ensemble([])
    with pytest.raises(SoupError):
        logit_ensemble([logits[0], torch.zeros(6, 5)])


def test_greedy_ensemble_example():
    labels = torch.tensor([0, 1, 2, 0])
    eye = torch.eye(3)
    logits = {
        "a": eye[[0, 1, 1, 0]] * 2.0,  # 3/4, wrong on image 2
        "b": torch.tensor([[3.0, 0, 0], [0, 3, 0], [0, 0, 3], [0, 1, 0]]),  # 3/4, wrong on 3
        "c": eye[[2, 2, 1, 1]] * 9.0,  # 0/4, ruins the ensemble
    }
    res = greedy_ensemble(["a", "b", "c"], logits, labels)
    assert res.ingredients == ["a", "b"] and res.correct == 4
    expected = (logit_ensemble([logits["a"], logits["b"]]).argmax(-1) == labels).sum()
    assert res.correct == int(expected)
    assert [s.accepted for s in res.history] == [True, True, False]
    with pytest.raises(SoupError, match="no held-out logits"):
        greedy_ensemble(["a", "zz"], logits, labels)


@PROPS
@given(
    n=st.integers(1, 5),
    n_images=st.integers(1, 12),
    tie=st.sampled_from([">=", ">"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_greedy_ensemble_consistent_with_logit_ensemble(n, n_images, tie, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n_images,), generator=gen)
    logits = {f"m{i}": torch.randn(n_images, 3, generator=gen) for i in range(n)}
    res = greedy_ensemble(list(logits), logits, labels, tie=tie)
    mean = logit_ensemble([logits[i] for i in res.ingredients])
    assert res.correct == int((mean.argmax(-1) == labels).sum())
    assert res.ingredients[0] == "m0"
    soup_scores = [s.soup_correct for s in res.history]
    assert soup_scores == sorted(soup_scores)  # greedy never gets worse


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def test_registry():
    assert {"uniform", "greedy", "greedy_strict", "best"} <= set(SOUP_METHODS)
    with pytest.raises(SoupError) as err:
        get_soup_method("nope")
    for name in SOUP_METHODS:
        assert name in str(err.value)

    class Again(SoupMethod):
        name = "greedy"

    with pytest.raises(SoupError, match="already registered"):
        register_soup_method(Again)

    @register_soup_method
    class TestOnly(SoupMethod):
        name = "test_only_method"

        def __call__(self, candidates, evaluate, *, heldout_size, early_rejection=True):
            return get_soup_method("best")(candidates, evaluate, heldout_size=heldout_size)

    try:
        assert isinstance(get_soup_method("test_only_method"), TestOnly)
    finally:
        SOUP_METHODS.pop("test_only_method")


def test_method_parameters_are_declared_and_checked():
    greedy = get_soup_method("greedy")
    assert greedy.tie == ">=" and greedy.describe() == {"method": "greedy", "tie": ">=", "order": "heldout", "seed": 0}
    assert get_soup_method("greedy", tie=">").tie == ">"
    assert get_soup_method("greedy_strict").tie == ">"
    assert get_soup_method("uniform").tie is None and get_soup_method("best").tie is None
    with pytest.raises(SoupError, match="tie='=' is not allowed"):
        get_soup_method("greedy", tie="=")
    with pytest.raises(SoupError, match="has no parameter alpha"):
        get_soup_method("uniform", alpha=0.5)
    # a shared option reaches only the recipes that declare it
    assert configure_soup_method("greedy", tie=">").tie == ">"
    assert configure_soup_method("uniform", tie=">").describe() == {"method": "uniform"}
    assert [p.name for p in SOUP_METHODS["greedy"].params] == ["tie", "order", "seed"]


@settings(max_examples=40, deadline=None)
@given(scenarios(), st.integers(0, 10_000))
def test_greedy_in_random_order_is_the_greedy_rule_over_a_seeded_shuffle(sc, seed):
    import random as _random

    cands, h = sc["candidates"], sc["heldout_size"]
    ev = SyntheticEvaluator(sc["vectors"])
    res = get_soup_method("greedy", order="random", seed=seed)(cands, ev, heldout_size=h)
    order = sort_candidates(cands)
    _random.Random(seed).shuffle(order)
    ref = greedy_in_order(order, ev, heldout_size=h)
    assert (res.ingredients, res.correct) == (ref.ingredients, ref.correct)
    assert res.ingredients[0] == order[0].id  # a random order starts from its first candidate, not the best
    again = get_soup_method("greedy", order="random", seed=seed)(cands, ev, heldout_size=h)
    assert again.ingredients == res.ingredients  # seeded: the same order every time


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_registered_methods(sc):
    cands, h = sc["candidates"], sc["heldout_size"]
    ev = SyntheticEvaluator(sc["vectors"])
    best = get_soup_method("best")(cands, ev, heldout_size=h)
    top = sort_candidates(cands)[0]
    assert best.ingredients == [top.id] and best.correct == top.heldout_correct
    uniform = get_soup_method("uniform")(cands, ev, heldout_size=h)
    assert uniform.ingredients == [c.id for c in sort_candidates(cands)]
    assert uniform.correct == sum(ev.correctness(uniform.ingredients))
    for name, tie in [("greedy", ">="), ("greedy_strict", ">")]:
        res = get_soup_method(name)(cands, ev, heldout_size=h, early_rejection=sc["early"])
        ref = greedy_soup(cands, ev, heldout_size=h, tie=tie)
        assert (res.ingredients, res.correct) == (ref.ingredients, ref.correct)
