"""Ctrl-C in the middle of a real sweep, then ``run --resume`` to the served soup and Ctrl-C again: nothing finished
is trained again or lost, and the server stops and frees its port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from soup_ray.results import read_jsonl
from soup_ray.run_dir import RunDir
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def finished_checkpoints(run_dir: Path) -> list[Path]:
    """Final trial checkpoints Tune has written so far (the soup candidates)."""
    return sorted(run_dir.glob("tune/*/checkpoint_*/model.safetensors"))


def result_lines(trial_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (trial_dir / "result.json").read_text().splitlines() if x.strip()]


def test_ctrl_c_stops_the_sweep_and_run_resume_finishes_serves_and_stops_on_ctrl_c(
        prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import httpx
    from soup_ray.soup import greedy_soup
    from soup_ray.ingredients import Kitchen, trial_records_from_results

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = tiny_config_dict(**{
        "search_space.epochs": 2, "tune.num_samples": 2, "tune.max_concurrent_trials": 1,
        "tune.checkpoint_interval_s": 0, "trial_resources.cpu": 1, "soup.methods": [],
        "serve.ensemble": 0,  # the soup alone: the ensemble's replicas are served in tests of their own
    })
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "soup_ray.cli", "sweep", str(cfg_file), "--out", str(run_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not finished_checkpoints(run_dir) and proc.poll() is None:
            time.sleep(0.5)
        assert finished_checkpoints(run_dir), "no trial finished in time"
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out[-3000:]
    assert f"soup-ray sweep --resume {run_dir.resolve()}" in out, out[-3000:]
    first = read_jsonl(RunDir(run_dir).results)
    assert len(first) == 1 and all(r["status"] == "completed" for r in first)
    done_before = {r["trial_id"]: r for r in first}

    # `soup-ray run --resume`: the sweep finishes, the report is written, the soup is served over HTTP, and one
    # Ctrl-C (after Tune's own SIGINT handler ran during the sweep) stops the server and frees the port in 30 s
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "resume.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "soup_ray.cli", "run", "--resume", str(run_dir),
                                 "--port", str(port), "--no-dashboard"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 420
            text = ""
            while time.time() < deadline and proc.poll() is None and "Ctrl-C stops" not in text:
                time.sleep(1)
                text = log_path.read_text()
            assert "Ctrl-C stops" in text, text[-3000:]
            assert "POST /predict (test image 0" in text and "wall time of this run:" in text
            info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=30).json()
            assert info["ingredients"] == json.loads((run_dir / "soup" / "soup.json").read_text())["ingredients"]
            # serve.ensemble: 0 from the sweep config reached `soup-ray run`: no ensemble was deployed
            ens = httpx.post(f"http://127.0.0.1:{port}/predict/ensemble", content=b"x", timeout=30)
            assert ens.status_code == 404 and ens.json()["error"] == "ensemble_disabled", ens.text
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
                stopped = True
            except subprocess.TimeoutExpired:
                stopped = False
                proc.kill()
                proc.wait(timeout=30)
    text = log_path.read_text()
    assert stopped, "one Ctrl-C did not stop `soup-ray run` while it served: " + text[-2000:]
    assert proc.returncode == 0, text[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the port is free again
    rows = [r for r in read_jsonl(RunDir(run_dir).results) if "trial_id" in r]
    assert sorted(r["trial_id"] for r in rows) == sorted({r["trial_id"] for r in rows}) and len(rows) == 2
    assert all(r["status"] == "completed" for r in rows)
    for tid in done_before:
        lines = [x for d in (run_dir / "tune").iterdir() if d.is_dir() and tid in d.name
                 for x in result_lines(d)]
        assert [x["epoch"] for x in lines] == [1, 2], f"{tid} finished before Ctrl-C and trained again"
        assert rows[[r["trial_id"] for r in rows].index(tid)]["heldout"] == done_before[tid]["heldout"]
    # at most two checkpoints per trial on disk (the last resumable state and the final weights)
    for d in (run_dir / "tune").iterdir():
        if d.is_dir():
            assert len(list(d.glob("checkpoint_*"))) <= 2, d
    # the live soup, resumed from its state on disk, equals the batch greedy soup over the same trials
    state = json.loads(RunDir(run_dir).state_file.read_text())
    assert set(state["records"]) == {r["trial_id"] for r in rows}
    kitchen = Kitchen(run_dir)
    candidates = [kitchen.admit(r) for r in trial_records_from_results(run_dir)]
    oracle = greedy_soup(candidates, kitchen.evaluate, heldout_size=kitchen.heldout_size, tie=">=")
    assert state["soup"]["soups"][-1]["ingredients"] == oracle.ingredients
    # the CLI's offline greedy soup, the report files and `soup-ray status` agree with the live soup
    from soup_ray.cli import main

    live = json.loads((run_dir / "soup" / "soup.json").read_text())["ingredients"]
    assert main(["soup", str(run_dir), "--method", "greedy"]) == 0
    assert json.loads((run_dir / "soups" / "greedy.json").read_text())["ingredients"] == live
    names = {r["model_name"] for r in read_jsonl(RunDir(run_dir).results)}
    assert {"uniform_soup", "greedy_soup", "ensemble", "greedy_ensemble", "best_individual"} <= names
    for f in ("report.md", "figure.png", "greedy.png", "timings.json"):
        assert (run_dir / f).stat().st_size > 0
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    st = capsys.readouterr().out
    assert "persisted state" in st and all(t in st for t in live)
