"""Ctrl-C in every stage of the real ``soup-ray run``, sent to its process group as a terminal does.

One run folder goes through the stages one command at a time: each command is stopped in the next
stage by SIGINT to its process group, as soon as the console prints that stage's line. Every stop
must end within 30 s with exit status 130, one line naming what to run next, no process of the
command's session left (Ray's workers included), no half-written run file and (while serving) the port
freed. The commands that line names then finish the run, to the same soup as the offline batch greedy over the same trials.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from soup_ray.results import read_jsonl
from soup_ray.run_dir import RunDir
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STOP_WITHIN_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def group_members(pgid: int) -> list[psutil.Process]:
    """Processes of the command's process group ``pgid`` or of its session, still running (zombies waiting
    for init to reap them excluded). Ray puts each worker (Serve's proxy among them) in a process group of its
    own, inside the command's session (the command started one: ``start_new_session``)."""
    out = []
    for p in psutil.process_iter():
        try:
            if pgid in (os.getpgid(p.pid), os.getsid(p.pid)) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


def group_alive(pgid: int, wait_s: float = 15.0) -> list[str]:
    """What is left of group ``pgid`` after up to ``wait_s`` seconds for it to go."""
    deadline = time.time() + wait_s
    while group_members(pgid) and time.time() < deadline:
        time.sleep(0.25)
    out = []
    for p in group_members(pgid):
        try:
            out.append(" ".join(p.cmdline())[:100] or p.name())
        except psutil.Error:
            continue
    return out


class Cli:
    """One ``soup-ray`` command in its own process group, its console in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]):
        self.log = log
        self.file = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "soup_ray.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=self.file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, line: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if line in self.text():
                return
            time.sleep(0.2)
        raise AssertionError(
            f"{line!r} did not appear within {timeout:.0f}s (exit {self.proc.poll()}):\n" + self.text()[-3000:]
        )

    def ctrl_c(self, twice: bool = False) -> float:
        """SIGINT to the whole group (a terminal's Ctrl-C); returns the seconds until the command exited."""
        t0 = time.time()
        os.killpg(self.proc.pid, signal.SIGINT)
        if twice:
            self.wait_for("Ctrl-C again", 20)
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        return time.time() - t0

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.file.close()
        group_alive(self.proc.pid)
        for p in group_members(self.proc.pid):  # never leave a test's processes behind, even when it failed
            try:
                p.kill()
            except psutil.Error:
                pass


def half_written(run_dir: Path) -> list[str]:
    """Temporary files of an unfinished write anywhere in the run folder (Tune's own folder aside)."""
    return [
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if p.name.endswith(".tmp") and "tune" not in p.relative_to(run_dir).parts[:1]
    ]


def stop_in_stage(
    args: list[str],
    trigger: str,
    expect: str,
    tmp_path: Path,
    name: str,
    env: dict[str, str],
    run_dir: Path | None,
    port: int | None = None,
    twice: bool = False,
    timeout: float = 300,
) -> tuple[str, float]:
    """Start the command, Ctrl-C it once ``trigger`` is printed, check how it stopped; returns (console, seconds)."""
    cli = Cli(args, tmp_path / f"{name}.log", env)
    try:
        cli.wait_for(trigger, timeout)
        seconds = cli.ctrl_c(twice=twice)
        text = cli.text()
        assert cli.proc.returncode == 130, f"{name}: exit {cli.proc.returncode}\n{text[-3000:]}"
        assert seconds < STOP_WITHIN_S, f"{name}: took {seconds:.1f}s to stop\n{text[-3000:]}"
        assert expect in text, f"{name}: no {expect!r} in\n{text[-3000:]}"
        left = group_alive(cli.proc.pid)
        assert not left, f"{name}: left {left}"
        if port is not None:
            assert port_is_free(port), f"{name}: port {port} still taken"
        if run_dir is not None and run_dir.exists():
            assert not half_written(run_dir), f"{name}: half-written files {half_written(run_dir)}"
        return text, seconds
    finally:
        cli.close()


@pytest.mark.timeout(1500)  # eight real commands in a row; each wait inside is bounded on its own (300 s at most)
def test_ctrl_c_in_every_stage_of_soup_ray_run(
    prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import httpx

    from soup_ray.cli import main
    from soup_ray.ingredients import Kitchen, trial_records_from_results
    from soup_ray.soup import greedy_soup

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = tiny_config_dict(
        **{
            "search_space.epochs": 2,
            "data.train_size": 300,  # cheap epochs: what is checked is how each stage stops
            "tune.num_samples": 2,
            "tune.max_concurrent_trials": 1,
            "tune.checkpoint_interval_s": 0,
            "trial_resources.cpu": 1,
            "soup.methods": [],
            "serve.ensemble": 0,  # the soup alone: the ensemble's replicas are served in tests of their own
        }
    )
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run_dir = (tmp_path / "run").resolve()
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = ["run", str(cfg_file), "--out", str(run_dir), "--port", str(port), "--no-dashboard"]
    resume = ["run", "--resume", str(run_dir), "--port", str(port), "--no-dashboard"]
    stops: dict[str, float] = {}

    # stand-in build, from an empty cache: nothing of the stand-in is kept
    empty_cache = tmp_path / "empty-cache"
    _, stops["stand-in build"] = stop_in_stage(
        start,
        "stand-in pretraining: step 1/",
        "Start again with the same command",
        tmp_path,
        "standin",
        {**env, "SOUP_RAY_CACHE": str(empty_cache)},
        run_dir,
    )
    assert not [p for p in empty_cache.glob("*") if not p.name.endswith(".lock")], list(empty_cache.iterdir())

    # data and base (the stand-in is cached: the session's)
    _, stops["data and base"] = stop_in_stage(
        start,
        "holding the stage",
        "stopped before any trial was trained",
        tmp_path,
        "data",
        {**env, "SOUP_RAY_STAGE_PAUSE": "data and base=60"},
        run_dir,
    )

    # trials: once the first trial finished (Tune's own handler takes this Ctrl-C and saves its state)
    text, stops["trials"] = stop_in_stage(
        start, "[1/2 done]", f"Resume with: soup-ray run --resume {run_dir}", tmp_path, "trials", env, run_dir
    )
    assert "stage: trials" in text
    first = read_jsonl(RunDir(run_dir).results)
    assert len(first) == 1 and all(r["status"] == "completed" for r in first)
    done_before = {r["trial_id"]: r for r in first}

    # finishing the soup (the resumed sweep trains the second trial first)
    _, stops["finishing the soup"] = stop_in_stage(
        resume,
        "holding the stage",
        f"Finish the soup and the report with: soup-ray run --resume {run_dir}",
        tmp_path,
        "soup",
        {**env, "SOUP_RAY_STAGE_PAUSE": "finishing the soup=60"},
        run_dir,
    )

    # report and recipes: nothing of the report is written; `soup-ray report` then writes all of it
    _, stops["report and recipes"] = stop_in_stage(
        resume,
        "stage: report and recipes",
        f"Write it with: soup-ray report {run_dir}",
        tmp_path,
        "report",
        env,
        run_dir,
    )
    assert not (run_dir / "report.md").exists()
    assert main(["report", str(run_dir)]) == 0
    for f in ("report.md", "figure.png", "greedy.png"):
        assert (run_dir / f).stat().st_size > 0

    # serving start: Serve is starting when Ctrl-C comes (Tune's handler used to swallow this one)
    _, stops["serving start"] = stop_in_stage(
        resume,
        "stage: serving start",
        f"serve the soup again with: soup-ray serve {run_dir}",
        tmp_path,
        "serving-start",
        env,
        run_dir,
        port=port,
    )

    # serving: real HTTP first, then one Ctrl-C stops the server and frees the port
    cli = Cli(resume, tmp_path / "serving.log", env)
    try:
        cli.wait_for("Ctrl-C stops", 300)
        text = cli.text()
        assert "POST /predict (test image 0" in text and "wall time of this run:" in text
        info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=30).json()
        assert info["ingredients"] == json.loads((run_dir / "soup" / "soup.json").read_text())["ingredients"]
        # serve.ensemble: 0 from the sweep config reached `soup-ray run`: no ensemble was deployed
        ens = httpx.post(f"http://127.0.0.1:{port}/predict/ensemble", content=b"x", timeout=30)
        assert ens.status_code == 404 and ens.json()["error"] == "ensemble_disabled", ens.text
        stops["serving"] = cli.ctrl_c()
        text = cli.text()
        assert cli.proc.returncode == 130, text[-3000:]
        assert stops["serving"] < STOP_WITHIN_S, text[-3000:]
        assert f"serve the soup again with: soup-ray serve {run_dir}" in text
        assert port_is_free(port)
        left = group_alive(cli.proc.pid)
        assert not left, left
    finally:
        cli.close()

    # a second Ctrl-C while the server shuts down exits at once, still 130, and takes its Ray with it
    text, stops["serving, second Ctrl-C"] = stop_in_stage(
        ["serve", str(run_dir), "--port", str(port), "--ensemble", "0"],
        "serving " + str(run_dir),
        "second Ctrl-C: exiting now",
        tmp_path,
        "serve-twice",
        env,
        run_dir,
        port=port,
        twice=True,
    )
    with capsys.disabled():  # shown with or without -s
        print("\nseconds from Ctrl-C to exit, per stage:", json.dumps({k: round(v, 1) for k, v in stops.items()}))

    # what finished was kept: no trial trained twice, every trial once, and the soup is the batch greedy one
    rows = [r for r in read_jsonl(RunDir(run_dir).results) if "trial_id" in r]
    assert sorted(r["trial_id"] for r in rows) == sorted({r["trial_id"] for r in rows}) and len(rows) == 2
    assert all(r["status"] == "completed" for r in rows)
    for tid in done_before:
        lines = [
            json.loads(x)
            for d in (run_dir / "tune").iterdir()
            if d.is_dir() and tid in d.name
            for x in (d / "result.json").read_text().splitlines()
            if x.strip()
        ]
        assert [x["epoch"] for x in lines] == [1, 2], f"{tid} finished before Ctrl-C and trained again"
        assert rows[[r["trial_id"] for r in rows].index(tid)]["heldout"] == done_before[tid]["heldout"]
    for d in (run_dir / "tune").iterdir():  # at most two checkpoints per trial: the last state, the final weights
        if d.is_dir():
            assert len(list(d.glob("checkpoint_*"))) <= 2, d
    state = json.loads(RunDir(run_dir).state_file.read_text())
    assert set(state["records"]) == {r["trial_id"] for r in rows}
    kitchen = Kitchen(run_dir)
    candidates = [kitchen.admit(r) for r in trial_records_from_results(run_dir)]
    oracle = greedy_soup(candidates, kitchen.evaluate, heldout_size=kitchen.heldout_size, tie=">=")
    live = json.loads((run_dir / "soup" / "soup.json").read_text())["ingredients"]
    assert state["soup"]["soups"][-1]["ingredients"] == oracle.ingredients == live
    # the CLI's offline greedy soup, the report's rows and `soup-ray status` agree with the live soup
    assert main(["soup", str(run_dir), "--method", "greedy"]) == 0
    assert json.loads((run_dir / "soups" / "greedy.json").read_text())["ingredients"] == live
    names = {r["model_name"] for r in read_jsonl(RunDir(run_dir).results)}
    assert {"uniform_soup", "greedy_soup", "ensemble", "greedy_ensemble", "best_individual"} <= names
    assert (run_dir / "timings.json").stat().st_size > 0
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    st = capsys.readouterr().out
    assert "persisted state" in st and all(t in st for t in live)


def test_report_refuses_a_soup_that_missed_a_finished_trial(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    """``soup-ray report`` reports on the published soup only once it has seen every finished trial."""
    from soup_ray.cli import main

    assert main(["report", str(run_copy)]) == 2
    assert "no soup/soup.json" in capsys.readouterr().err
    (run_copy / "soup").mkdir()
    (run_copy / "soup" / "soup.json").write_text(json.dumps({"ingredients": ["t000"]}))
    assert main(["report", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "the soup has not seen 5 finished trial(s)" in err and f"soup-ray run --resume {run_copy}" in err, err
    assert not (run_copy / "report.md").exists()
