"""The keeper's held-out scoring counts what a plain loop counts, in any order, and still stops early."""

from __future__ import annotations

from pathlib import Path

import torch

from soup_ray.bench.soup_eval import measure, plain_loop, previous_path
from soup_ray.ingredients import Kitchen, trial_records_from_results


def test_kitchen_scoring_matches_plain_loop_and_previous_path(small_run: Path) -> None:
    kitchen = Kitchen(small_run)
    records = trial_records_from_results(small_run)
    for r in records:
        kitchen.admit(r)
    x, y = kitchen.heldout_tensors()
    assert x is kitchen.heldout_tensors()[0]  # decoded once, kept
    ids = [r.trial_id for r in records]
    state = {k: v.clone() for k, v in kitchen.weights(ids[0]).items()}
    model = kitchen.model
    result = kitchen.evaluate_weights(state)
    assert result.complete and result.evaluated == len(y)
    assert result.correct == plain_loop(model, x, y, 7) == previous_path(kitchen, model)
    # the order puts likely mistakes first (not the natural order here): counts do not depend on it
    assert kitchen.hardest_first and not torch.equal(kitchen.heldout_order(), torch.arange(len(y)))
    kitchen.hardest_first = False
    assert kitchen.evaluate_weights(state).correct == result.correct
    kitchen.hardest_first = True
    soup = kitchen.evaluate(ids, None)
    early = kitchen.evaluate(ids, max(0, soup.wrong // 3))
    assert not early.complete and early.evaluated < len(y) and early.wrong > soup.wrong // 3


def test_measure_reports_the_ratio(small_run: Path) -> None:
    out = measure(small_run, repeats=1, log=lambda m: None)
    assert out["correct"] > 0 and out["heldout_images"] > 0
    assert out["kitchen_over_plain_speed"] > 0 and "previous" in out
    assert out["early_rejection"]["evaluated"] <= out["heldout_images"]
