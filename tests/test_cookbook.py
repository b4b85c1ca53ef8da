"""Every recipe from one run: computed offline, written as open_clip folders and rows, chosen on held-out only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soup_ray.cli import main
from soup_ray.config import ConfigError, parse_config
from soup_ray.cookbook import DEFAULT_RECIPES, recipe_specs, winner
from soup_ray.export import load_soup
from soup_ray.results import read_jsonl
from tests.conftest import tiny_config_dict


def test_soup_command_computes_a_weight_recipe_into_a_servable_folder(run_copy: Path, capsys) -> None:
    assert main(["soup", str(run_copy), "--method", "model_stock"]) == 0
    folder = run_copy / "soups" / "model_stock"
    clf, info = load_soup(folder)
    assert info["method"] == "model_stock" and info["params"] == {"candidates": "all"}
    rows = [r for r in read_jsonl(run_copy / "results.jsonl") if r.get("model_name") == "model_stock"]
    assert len(rows) == 1 and rows[0]["recipe"] and rows[0]["forward_passes"] == 1
    assert rows[0]["heldout_correct"] / info["heldout_size"] == pytest.approx(rows[0]["heldout"])
    assert rows[0]["test"] is not None and rows[0]["shift_mean"] is not None
    # a second computation replaces the row instead of adding another
    assert main(["soup", str(run_copy), "--method", "model_stock"]) == 0
    assert sum(r.get("model_name") == "model_stock" for r in read_jsonl(run_copy / "results.jsonl")) == 1
    assert "model_stock" in capsys.readouterr().out


def test_wise_ft_chooses_alpha_on_heldout_and_its_endpoints_are_base_and_soup(run_copy: Path) -> None:
    assert (
        main(["soup", str(run_copy), "--method", "wise_ft", "--param", "alphas=[0.0, 1.0]", "--param", "target=best"])
        == 0
    )
    row = next(r for r in read_jsonl(run_copy / "results.jsonl") if r.get("model_name") == "wise_ft")
    best = max(
        (
            r
            for r in read_jsonl(run_copy / "results.jsonl")
            if r.get("kind") == "individual" and r.get("status") == "completed"
        ),
        key=lambda r: (r["heldout"], -int(r["trial_id"][1:])),
    )
    zero_shot = json.loads((run_copy / "base" / "zero_shot.json").read_text())["heldout"]
    chosen = row["params"]["alpha"]
    assert chosen in (0.0, 1.0)
    expected = best["heldout"] if chosen == 1.0 else zero_shot
    assert row["heldout"] == pytest.approx(expected, abs=1e-6)  # alpha 1 is the best model, 0 the base, exactly
    assert row["heldout"] == pytest.approx(max(best["heldout"], zero_shot), abs=1e-6)  # the better one on held-out


def test_wise_ft_scores_heldout_once_per_alpha_and_its_row_is_the_curve_point(run_copy: Path, monkeypatch) -> None:
    import soup_ray.cookbook as cookbook

    scored: list[int] = []  # the size of every eval set scored through the full-set scorer
    real = cookbook.predict_logits

    def counting(model, ds, *a, **kw):
        scored.append(len(ds))
        return real(model, ds, *a, **kw)

    monkeypatch.setattr(cookbook, "predict_logits", counting)
    assert main(["soup", str(run_copy), "--method", "wise_ft", "--param", "alphas=[0.0, 0.5, 1.0]"]) == 0
    row = next(r for r in read_jsonl(run_copy / "results.jsonl") if r.get("model_name") == "wise_ft")
    heldout_size = json.loads((run_copy / "soups" / "wise_ft" / "soup.json").read_text())["heldout_size"]
    # held-out is scored on the grid (by the keeper's scorer), never again for the curve or the chosen point
    assert heldout_size not in scored
    # the other sets: once per alpha, and the chosen alpha's row reuses its curve point
    n_sets = 1 + sum(1 for k in row if k in ("rotate", "affine", "noise", "occlude"))
    assert len(scored) == 3 * n_sets
    assert row["heldout"] == pytest.approx(row["heldout_correct"] / heldout_size)


def test_unknown_recipes_and_options_fail_before_any_work(run_copy: Path, capsys) -> None:
    assert main(["soup", str(run_copy), "--method", "nope"]) == 2
    assert "valid methods" in capsys.readouterr().err
    assert main(["soup", str(run_copy), "--method", "ties", "--param", "alpha=1"]) == 2
    assert "has no parameter alpha" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="has no parameter bogus"):
        parse_config(tiny_config_dict(**{"soup.methods": [{"method": "dare", "bogus": 1}]}))
    with pytest.raises(ValueError, match="appear twice"):
        recipe_specs(["greedy", "greedy"])
    assert [s.label for s in recipe_specs("all")] == [e if isinstance(e, str) else e["label"] for e in DEFAULT_RECIPES]


def test_winner_is_the_best_one_model_row_on_heldout() -> None:
    rows = [
        {"model_name": "ensemble", "heldout": 0.99, "forward_passes": 5},
        {"model_name": "greedy_soup", "heldout": 0.95, "forward_passes": 1, "n_ingredients": 3},
        {"model_name": "uniform_soup", "heldout": 0.95, "forward_passes": 1, "n_ingredients": 8},
        {"model_name": "ties", "heldout": 0.90, "forward_passes": 1},
    ]
    assert winner(rows) == "greedy_soup"
    assert winner([]) is None


def test_a_recipe_label_that_is_not_a_plain_name_is_refused_and_no_run_folder_is_touched(run_copy: Path) -> None:
    """A label names the folder soups/LABEL/ that export_soup replaces: ../base would delete the base."""
    from soup_ray.cookbook import RecipeSpec, cook_one
    from soup_ray.report import admit_run
    from soup_ray.run_dir import RunDir

    base_meta = RunDir(run_copy).base_meta
    run = admit_run(run_copy, log=lambda m: None)
    with pytest.raises(ValueError, match="plain name"):
        cook_one(
            run.kitchen, run.candidates, None, RecipeSpec("uniform", {}, "../base"), run_copy, [], log=lambda m: None
        )
    assert base_meta.is_file() and json.loads(base_meta.read_text())["fingerprint"]
    for bad in ["../soup", "../base", "a/b", "..", ".", "/tmp/elsewhere", ".hidden", "x\\y", "a b", "a" * 101]:
        with pytest.raises(ValueError, match="plain name"):
            RecipeSpec("uniform", {}, bad)
        with pytest.raises(ValueError, match="plain name"):
            RunDir(run_copy).recipe(bad)
    with pytest.raises(ValueError, match="plain name"):
        RunDir(run_copy).recipe("")
    assert RecipeSpec("uniform").label == "uniform"  # no label: the method's name
    with pytest.raises(ConfigError, match="plain name"):
        parse_config(tiny_config_dict(**{"soup.methods": [{"method": "uniform", "label": "../base"}]}))
    with pytest.raises(ValueError, match="plain name"):
        recipe_specs([{"method": "uniform", "label": "../soup"}])
    assert [s.label for s in recipe_specs(["uniform", {"method": "greedy", "label": "greedy_v2.1-b"}])] == [
        "uniform",
        "greedy_v2.1-b",
    ]
