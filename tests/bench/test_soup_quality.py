"""The soup-quality summary: means over runs and the local default's targets, from finished run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soup_ray.bench.soup_quality import (
    METHODS,
    README_END,
    README_START,
    format_table,
    readme_table,
    replace_readme_table,
    summarise,
)
from soup_ray.config import parse_config
from soup_ray.results import write_jsonl
from tests.conftest import tiny_config_dict


def fake_run(root: Path, seed: int, test: dict[str, float], shift: dict[str, float], greedy_models: int) -> Path:
    run = root / f"seed{seed}"
    (run / "base").mkdir(parents=True)
    cfg = parse_config(tiny_config_dict(**{"tune.seed": seed}))
    (run / "config.json").write_text(cfg.model_dump_json())
    (run / "base" / "zero_shot.json").write_text(json.dumps({"heldout": 0.4, "test": 0.41}))
    rows = [{"model_name": "trial_a", "kind": "individual", "trial_id": "a", "status": "completed"}]
    for m in METHODS:
        n = greedy_models if m == "greedy_soup" else 1
        rows.append(
            {
                "model_name": m,
                "status": "summary",
                "summary": True,
                "heldout": 0.9,
                "test": test.get(m, 0.9),
                "shift_mean": shift.get(m, 0.5),
                "ingredients": [f"t{i}" for i in range(n)],
            }
        )
    write_jsonl(run / "results.jsonl", rows)
    return run


def test_targets_are_checked_from_the_means_and_every_run(tmp_path: Path) -> None:
    runs = [
        fake_run(
            tmp_path,
            0,
            {"best_individual": 0.95, "greedy_soup": 0.96, "uniform_soup": 0.90},
            {"best_individual": 0.55, "greedy_soup": 0.58},
            4,
        ),
        fake_run(
            tmp_path,
            1,
            {"best_individual": 0.95, "greedy_soup": 0.955, "uniform_soup": 0.95},
            {"best_individual": 0.55, "greedy_soup": 0.56},
            2,
        ),
    ]
    s = summarise(runs, {str(runs[0]): 100.0})
    assert s["n_runs"] == 2 and s["runs"][0]["wall_s"] == 100.0 and s["runs"][1]["wall_s"] is None
    assert s["mean"]["greedy_soup"]["test"] == pytest.approx(0.9575)
    assert s["mean"]["greedy_soup"]["ingredients"] == 3
    c = s["checks"]
    assert (
        c["greedy_test_minus_best_points"]["value"] == pytest.approx(0.75) and c["greedy_test_minus_best_points"]["ok"]
    )
    assert (
        c["greedy_shift_minus_best_points"]["value"] == pytest.approx(2.0) and c["greedy_shift_minus_best_points"]["ok"]
    )
    # 8 of 10 runs need 3+ ingredients: of 2 runs, both (seed 1 kept 2)
    assert c["runs_with_3_or_more_greedy_ingredients"]["value"] == 1
    assert not c["runs_with_3_or_more_greedy_ingredients"]["ok"]
    assert c["worst_greedy_test_minus_best_points"]["value"] == pytest.approx(0.5)
    assert c["worst_greedy_test_minus_best_points"]["ok"]
    assert c["greedy_test_minus_uniform_points_per_run"]["value"] == [6.0, 0.5]
    assert not c["greedy_test_minus_uniform_points_per_run"]["ok"]  # seed 1's greedy soup is only 0.5 above
    # the spread over runs, and the gains run by run
    assert s["spread"]["greedy_soup"]["test"] == [pytest.approx(0.955), pytest.approx(0.96)]
    assert s["spread"]["greedy_soup"]["ingredients"] == [2, 4]
    assert s["greedy_minus_best_points"] == {"test": [1.0, 0.5], "shift_mean": [3.0, 1.0]}
    table = format_table(s)
    assert "MISS greedy_test_minus_uniform_points_per_run" in table and "seed 0:" in table
    assert "greedy minus best, test: mean +0.75, min +0.50, max +1.00 points" in table


def test_a_run_more_than_0_3_below_the_best_misses_the_worst_case_target(tmp_path: Path) -> None:
    runs = [
        fake_run(tmp_path, i, {"best_individual": 0.95, "greedy_soup": g}, {"greedy_soup": 0.6}, 3)
        for i, g in enumerate((0.99, 0.946))
    ]
    c = summarise(runs)["checks"]
    assert c["greedy_test_minus_best_points"]["ok"]  # the mean gain is +1.5 points
    assert c["worst_greedy_test_minus_best_points"]["value"] == pytest.approx(-0.4)
    assert not c["worst_greedy_test_minus_best_points"]["ok"]
    assert c["runs_with_3_or_more_greedy_ingredients"]["ok"]


def test_the_readme_table_is_rendered_from_the_summary_and_replaces_only_its_block(tmp_path: Path) -> None:
    runs = [
        fake_run(tmp_path, i, {"best_individual": 0.95, "greedy_soup": g}, {"greedy_soup": 0.6}, n)
        for i, (g, n) in enumerate(((0.96, 3), (0.955, 5)))
    ]
    table = readme_table(summarise(runs))
    assert (
        "| **greedy soup** | **90.0 (90.0-90.0)** | **95.8 (95.5-96.0)** | **60.0 (60.0-60.0)** | **4.0 (3-5)** |"
        in (table)
    )
    assert "test: mean +0.8 points, from +0.5 to +1.0." in table and "3 or more models in 2 of 2 runs" in table
    readme = f"# x\n\nbefore\n{README_START}\nold table\n{README_END}\nafter\n"
    new = replace_readme_table(readme, table)
    assert new.startswith("# x\n\nbefore\n") and new.endswith("\nafter\n") and "old table" not in new
    assert replace_readme_table(new, table) == new
    with pytest.raises(ValueError, match="markers"):
        replace_readme_table("# no markers", table)


def test_a_run_without_a_report_is_named(tmp_path: Path) -> None:
    run = fake_run(tmp_path, 0, {}, {}, 1)
    write_jsonl(run / "results.jsonl", [{"model_name": "trial_a", "kind": "individual", "trial_id": "a"}])
    with pytest.raises(ValueError, match="soup-ray soup .* --report"):
        summarise([run])


def test_the_readmes_table_is_the_one_the_committed_json_renders() -> None:
    root = Path(__file__).resolve().parents[2]
    summary = json.loads((root / "bench" / "results" / "soup_quality.json").read_text())
    assert summary["n_runs"] == 10 and len({(r["standin_seed"], r["seed"]) for r in summary["runs"]}) == 10
    readme = (root / "README.md").read_text()
    assert readme_table(summary) in readme, "run `python bench/soup_quality.py --readme-only` after a new measurement"
