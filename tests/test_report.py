"""The run report and ``soup-ray soup``: soups and ensembles scored offline from a small real run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from soup_ray.cli import main
from soup_ray.evaluate import accuracy, predict_logits
from soup_ray.ingredients import Kitchen, trial_records_from_results
from soup_ray.model import load_base
from soup_ray.report import SUMMARY_NAMES, compute_report, soup_table, write_report
from soup_ray.results import read_jsonl, trial_row, write_jsonl
from soup_ray.run_dir import CHECKPOINT_LOGITS, RESULTS_FILE
from soup_ray.run_dir import WEIGHTS_FILE as CHECKPOINT_WEIGHTS
from soup_ray.soup import SOUP_METHODS, greedy_soup

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared small run plus a completed trial with a damaged checkpoint and a diverged trial."""
    run = tmp_path_factory.mktemp("report-run") / "run"
    shutil.copytree(small_run, run)
    rows = read_jsonl(run / RESULTS_FILE)
    good = next(r for r in rows if r["checkpoint"])
    bad = run / "trials" / "bad"
    shutil.copytree(run / good["checkpoint"], bad)
    (bad / CHECKPOINT_WEIGHTS).write_bytes(b"not a safetensors file")
    rows.append({**good, "model_name": "trial_bad", "trial_id": "bad", "checkpoint": "trials/bad"})
    rows.append(trial_row("div", {"status": "diverged", "heldout_acc": 0.0}, {"lr": 1e30}, None, ["rotate", "noise"]))
    write_jsonl(run / RESULTS_FILE, rows)
    return run


def _trials(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Completed trials with an intact checkpoint, by id."""
    return {
        r["trial_id"]: r
        for r in read_jsonl(run_dir / RESULTS_FILE)
        if r.get("status") == "completed" and r.get("checkpoint") and r["trial_id"] != "bad"
    }


@pytest.fixture(scope="module")
def report(run_dir: Path) -> dict[str, Any]:
    return compute_report(run_dir, log=lambda m: None)


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["model_name"]: r for r in report["rows"]}


def _checkpoint(run_dir: Path, tid: str) -> Path:
    return run_dir / _trials(run_dir)[tid]["checkpoint"]


def test_report_rows_are_complete_and_in_range(report: dict[str, Any]) -> None:
    rows = _rows(report)
    assert list(rows) == list(SUMMARY_NAMES)
    keys = ["heldout", "test", *report["shifts"], "shift_mean"]
    assert report["shifts"] == ["rotate", "noise"]
    for row in rows.values():
        for k in keys:
            assert 0.0 <= row[k] <= 1.0, (row["model_name"], k)
        assert row["shift_mean"] == pytest.approx(sum(row[s] for s in report["shifts"]) / 2)
    n = len(report["candidates"])
    assert n >= 3 and sorted(report["candidates"]) == sorted(_trials(Path(report["run_dir"])))
    assert [r["trial_id"] for r in report["rejected"]] == ["bad"]
    assert "unreadable" in report["rejected"][0]["reason"]
    assert rows["best_individual"]["kind"] == "individual" and rows["best_individual"]["forward_passes"] == 1
    assert rows["best_individual"]["ingredients"] == [report["candidates"][0]]
    assert rows["uniform_soup"]["forward_passes"] == 1 and len(rows["uniform_soup"]["ingredients"]) == n
    assert rows["greedy_soup"]["forward_passes"] == 1 and rows["greedy_soup"]["kind"] == "soup"
    assert rows["ensemble"]["forward_passes"] == n and rows["ensemble"]["kind"] == "ensemble"
    ge = rows["greedy_ensemble"]
    assert 1 <= ge["forward_passes"] == len(ge["ingredients"]) <= n
    hist = report["history"]
    assert [p["candidate_id"] for p in hist] == report["candidates"]
    accepted = [p["candidate_id"] for p in hist if p["accepted"]]
    assert accepted == rows["greedy_soup"]["ingredients"]
    assert hist[-1]["soup_accuracy"] == pytest.approx(rows["greedy_soup"]["heldout"])
    assert soup_table(report).splitlines()[0].split()[:3] == ["method", "held-out", "test"]


def test_best_individual_matches_results_file(report: dict[str, Any], run_dir: Path) -> None:
    best = _rows(report)["best_individual"]
    rows = {r["trial_id"]: r for r in read_jsonl(run_dir / RESULTS_FILE) if r.get("trial_id")}
    src = rows[best["ingredients"][0]]
    assert best["heldout"] == src["heldout"] == max(r["heldout"] for r in _trials(run_dir).values())
    assert best["test"] == src["test"] and best["rotate"] == src["rotate"]


def test_ensemble_equals_mean_of_cached_logits(report: dict[str, Any], run_dir: Path) -> None:
    files = [load_file(str(_checkpoint(run_dir, t) / CHECKPOINT_LOGITS)) for t in report["candidates"]]
    ens = _rows(report)["ensemble"]
    for name in ["heldout", "test", *report["shifts"]]:
        mean = sum(f[name].float() for f in files) / len(files)
        assert ens[name] == pytest.approx(accuracy(mean, files[0][f"{name}.labels"]), abs=1e-6)
    chosen = _rows(report)["greedy_ensemble"]["ingredients"]
    sub = [load_file(str(_checkpoint(run_dir, t) / CHECKPOINT_LOGITS)) for t in chosen]
    mean = sum(f["test"].float() for f in sub) / len(sub)
    assert _rows(report)["greedy_ensemble"]["test"] == pytest.approx(accuracy(mean, sub[0]["test.labels"]))


def test_uniform_soup_equals_manual_weight_average(report: dict[str, Any], run_dir: Path, prepared) -> None:
    _, prep = prepared
    states = [load_file(str(_checkpoint(run_dir, t) / CHECKPOINT_WEIGHTS)) for t in report["candidates"]]
    avg = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            total = v.float().clone()
            for s in states[1:]:
                total += s[k].float()
            avg[k] = (total / len(states)).to(v.dtype)
        else:
            avg[k] = v
    model, _ = load_base(run_dir / "base")
    model.load_state_dict(avg)
    uni = _rows(report)["uniform_soup"]
    for name, ds in {"test": prep.bundle.test, "noise": prep.bundle.shifts["noise"]}.items():
        logits, labels = predict_logits(model, ds)
        assert uni[name] == pytest.approx(accuracy(logits, labels), abs=1e-6)


def test_given_greedy_ingredients_are_used(report: dict[str, Any], run_dir: Path) -> None:
    given = report["candidates"][:2]
    rep = compute_report(run_dir, greedy_ingredients=given, log=lambda m: None)
    greedy = _rows(rep)["greedy_soup"]
    assert greedy["ingredients"] == given and greedy["forward_passes"] == 1
    assert [p["accepted"] for p in rep["history"]] == [i < 2 for i in range(len(report["candidates"]))]
    assert rep["history"][1]["soup_accuracy"] == pytest.approx(greedy["heldout"])


def test_write_report_is_idempotent(report: dict[str, Any], run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = read_jsonl(run / RESULTS_FILE)
    write_report(run, report)
    paths = write_report(run, report)
    rows = read_jsonl(run / RESULTS_FILE)
    assert rows[: len(before)] == before
    assert [r["model_name"] for r in rows[len(before) :]] == list(SUMMARY_NAMES)
    assert len(trial_records_from_results(run)) == len(_trials(run)) + 1  # summary rows are not trials
    md = paths["report"].read_text()
    assert "| method | held-out | test | rotate | noise | shift mean | forward passes |" in md
    for name in SUMMARY_NAMES:
        assert f"| {name} |" in md
    assert f"{len(report['candidates'])} candidates, 1 rejected (bad: unreadable" in md
    for key in ("figure", "greedy"):
        data = paths[key].read_bytes()
        assert paths[key].parent == run and len(data) > 1000 and data[:8] == PNG_MAGIC


def test_cli_soup_greedy_matches_direct_greedy(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    kitchen = Kitchen(run_dir)
    cands = []
    for rec in trial_records_from_results(run_dir):
        try:
            cands.append(kitchen.admit(rec))
        except ValueError:
            pass
    direct = greedy_soup(cands, kitchen.evaluate, heldout_size=kitchen.heldout_size, tie=">=")
    assert main(["soup", str(run_dir), "--method", "greedy"]) == 0
    out = capsys.readouterr().out
    assert ", ".join(direct.ingredients) in out
    assert f"evaluations: {direct.evaluations}, held-out images evaluated: {direct.images_evaluated}" in out
    saved = json.loads((run_dir / "soups" / "greedy.json").read_text())
    assert saved["ingredients"] == direct.ingredients
    assert saved["heldout_correct"] == direct.correct and saved["tie"] == ">="
    assert saved["evaluations"] == direct.evaluations


@pytest.mark.slow  # runs long on its own: the full suite only
def test_cli_soup_with_report(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["soup", str(run), "--method", "greedy_strict", "--no-early-rejection", "--report"]) == 0
    out = capsys.readouterr().out
    assert "greedy_ensemble" in out
    saved = json.loads((run / "soups" / "greedy_strict.json").read_text())
    assert saved["tie"] == ">" and saved["early_rejection"] is False
    assert saved["images_evaluated"] == (len(saved["candidates"]) - 1) * saved["heldout_size"]
    summary = {r["model_name"]: r for r in read_jsonl(run / RESULTS_FILE) if r.get("summary")}
    assert summary["greedy_soup"]["ingredients"] == saved["ingredients"]
    assert (run / "report.md").is_file() and (run / "greedy.png").is_file()


def test_cli_unknown_method_lists_names(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["soup", str(run_dir), "--method", "gumbo"]) == 2
    err = capsys.readouterr().err
    assert "gumbo" in err and "Traceback" not in err
    for name in SOUP_METHODS:
        assert name in err


def test_cli_missing_results_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["soup", str(tmp_path), "--method", "greedy"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / RESULTS_FILE) in err and "Traceback" not in err


def test_offers_the_live_soup_refused_get_a_note_in_the_report(report: dict[str, Any], tmp_path: Path) -> None:
    from soup_ray.report import live_soup_rejections, markdown_report

    run = tmp_path / "run"
    (run / "soup_state").mkdir(parents=True)
    (run / "soup_state" / "state.json").write_text(
        json.dumps(
            {"rejected": {"t007": "non-finite values (NaN/inf) in ['head.weight']", "t009": "still unreadable | x"}}
        )
    )
    letters = live_soup_rejections(run)
    assert [r["trial_id"] for r in letters] == ["t007", "t009"]
    md = markdown_report({**report, "live_rejected": letters})
    assert "## Offers the live soup set aside" in md
    assert "| `t007` | non-finite values (NaN/inf) in ['head.weight'] |" in md
    assert "still unreadable / x" in md  # a | in a reason does not break the table
    assert "Offers the live soup" not in markdown_report({**report, "live_rejected": []})
    assert live_soup_rejections(tmp_path / "nowhere") == []


def test_greedy_and_uniform_recipes_are_their_soups_shown_once(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import soup_ray.cookbook as cookbook

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    rescored: list[str] = []
    real = cookbook.score_state
    monkeypatch.setattr(cookbook, "score_state", lambda k, state, *a: rescored.append("x") or real(k, state, *a))
    rep = compute_report(run, log=lambda m: None, recipes=["greedy", "uniform", "model_stock"])
    rows, recipes = _rows(rep), {r["model_name"]: r for r in rep["recipes"]}
    # the recipes' soups are the report's soups, scored once (model_stock is the only one scored by the cookbook)
    for twin, soup in (("greedy", "greedy_soup"), ("uniform", "uniform_soup")):
        assert sorted(recipes[twin]["ingredients"]) == sorted(rows[soup]["ingredients"])
        assert recipes[twin]["test"] == rows[soup]["test"] and recipes[twin]["shift_mean"] == rows[soup]["shift_mean"]
    assert len(rescored) == 1
    # and each soup has one row in the table; the other recipe keeps its own
    names = [line.split()[0] for line in soup_table(rep).splitlines()[2:]]
    assert names.count("greedy_soup") == 1 and names.count("uniform_soup") == 1 and "model_stock" in names
    assert "greedy" not in names and "uniform" not in names
    # the recipes' parameters and folders are still listed in the report's recipe section
    write_report(run, rep)
    md = (run / "report.md").read_text()
    assert "| `greedy` | greedy |" in md and "| `uniform` | uniform |" in md
    assert md.count("| greedy_soup |") == 1


def test_a_trial_stopped_at_a_rung_is_a_completed_row_with_its_scores() -> None:
    from soup_ray.results import is_soup_candidate, stopped_early, trial_row

    rung = {"status": "candidate", "epoch": 1, "rung": 1, "heldout_acc": 0.8, "test_acc": 0.7, "heldout_correct": 9}
    assert not stopped_early(rung) and not is_soup_candidate(rung)  # a rung result alone: the trial goes on
    stopped = {**rung, "done": True}
    assert stopped_early(stopped) and is_soup_candidate(stopped)
    row = trial_row("a", stopped, {"epochs": 4}, "tune/a/checkpoint_000000", [])
    assert row["status"] == "completed" and row["stopped_early"] and row["epochs_run"] == 1
    assert row["heldout"] == 0.8 and row["test"] == 0.7 and row["heldout_correct"] == 9
    # a trial a scheduler stopped on an epoch without a candidate, an errored one and an unfinished one
    assert trial_row("b", {"status": "running", "epoch": 2, "done": True}, {}, None, [])["status"] == "stopped"
    failed = trial_row("c", stopped, {}, None, [], error="RuntimeError: boom")
    assert failed["status"] == "error" and "stopped_early" not in failed and failed["heldout"] is None
    assert trial_row("d", rung, {}, None, [])["status"] == "candidate"


def test_the_greedy_figure_numbers_its_candidates_with_whole_numbers(tmp_path: Path, monkeypatch) -> None:
    """greedy.png's x axis counts candidates: with 3 of them matplotlib's default ticks were 1.0, 1.5, 2.0, ..."""
    from matplotlib.figure import Figure

    from soup_ray.report import plot_greedy

    seen: list[Any] = []
    real_savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        seen.append([t for t in fig.axes[0].get_xticks() if 0.5 <= t <= 3.5])
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    history = [
        {"position": i, "candidate_accuracy": a, "soup_accuracy": s, "accepted": ok, "trial_soup_accuracy": t}
        for i, (a, s, ok, t) in enumerate([(0.9, 0.9, True, None), (0.88, 0.91, True, None), (0.8, 0.91, False, 0.87)])
    ]
    out = plot_greedy({"history": history}, tmp_path / "greedy.png")
    assert out.stat().st_size > 0
    assert seen and seen[0], seen
    assert all(float(t).is_integer() for t in seen[0]), seen[0]
