"""Soup diagnostics on real fine-tunes: a run that leaves the basin shows a barrier the verdict names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from soup_ray.diagnostics import ALPHAS, soup_diagnostics
from soup_ray.ingredients import Kitchen, trial_records_from_results
from soup_ray.results import read_jsonl, write_jsonl
from soup_ray.soup import greedy_soup, sort_candidates
from tests.conftest import make_trials


def _admitted(run: Path):
    kitchen = Kitchen(run)
    cands = sort_candidates([kitchen.admit(r) for r in trial_records_from_results(run)])
    rows = {r["trial_id"]: r for r in read_jsonl(run / "results.jsonl")}
    return kitchen, cands, rows


@pytest.fixture(scope="module")
def basin_run(prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two fine-tunes of one base: a gentle learning rate, and one so high that the run leaves the basin."""
    cfg, prep = prepared
    run = tmp_path_factory.mktemp("basin") / "run"
    shutil.copytree(prep.run_dir, run)
    make_trials(cfg, prep, run, [3e-3, 0.2], epochs=2)
    return run


def test_verdict_names_the_barrier_when_greedy_keeps_one(basin_run: Path) -> None:
    kitchen, cands, rows = _admitted(basin_run)
    assert len(cands) == 2
    greedy = greedy_soup(cands, kitchen.evaluate, heldout_size=kitchen.heldout_size)
    assert greedy.ingredients == [cands[0].id], "the high learning rate run should not join the soup"
    diag = soup_diagnostics(kitchen, cands, rows, greedy.ingredients)
    assert diag.kept == 1 and len(diag.curves) == 1
    curve = diag.curves[0]
    assert curve.alphas == list(ALPHAS) and not curve.partner_in_soup
    assert curve.heldout[0] == pytest.approx(cands[0].heldout_correct / kitchen.heldout_size)
    assert curve.heldout[-1] == pytest.approx(cands[1].heldout_correct / kitchen.heldout_size)
    ends = 100 * (curve.heldout[0] + curve.heldout[-1]) / 2
    assert curve.barrier_points == pytest.approx(max(0.0, ends - 100 * curve.heldout[2]), abs=0.01)
    assert curve.barrier_points >= 2.0
    assert "greedy kept 1 of 2" in diag.verdict
    assert f"{curve.barrier_points:.1f} points at the midpoint" in diag.verdict
    by_lr = sorted(diag.distances, key=lambda d: d["lr"])
    assert by_lr[1]["distance"] > 2 * by_lr[0]["distance"]  # the high learning rate travelled far from the base
    assert diag.lr_split is not None and diag.lr_split["ratio"] > 1.0
    json.dumps(diag.to_json())  # goes into the report as JSON


def test_two_copies_of_one_model_have_no_barrier(basin_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(basin_run, run)
    rows = read_jsonl(run / "results.jsonl")
    gentle = next(r for r in rows if r["hyperparameters"]["lr"] < 0.01)
    twin = dict(gentle, trial_id="twin", model_name="trial_twin", checkpoint="trials/twin")
    shutil.copytree(run / gentle["checkpoint"], run / "trials" / "twin")
    write_jsonl(run / "results.jsonl", [gentle, twin])
    kitchen, cands, rows_by_id = _admitted(run)
    diag = soup_diagnostics(kitchen, cands, rows_by_id, [c.id for c in cands])
    assert len(diag.curves) == 1
    assert diag.curves[0].barrier_points == pytest.approx(0.0, abs=1e-9)
    assert len(set(diag.curves[0].heldout)) == 1  # the same weights all along the line
    assert all(d["distance"] == diag.distances[0]["distance"] for d in diag.distances)
