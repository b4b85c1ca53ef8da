"""Run stages and what a Ctrl-C leaves: the stage lines, the next-step messages, whole-or-nothing run files."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from soup_ray import atomic
from soup_ray.stages import (
    DATA,
    RAY_START,
    REPORT,
    SERVING,
    SERVING_START,
    SOUP,
    STAND_IN,
    TRIALS,
    Stages,
    install_ctrl_c,
    next_step,
    stage_pause,
)


def test_each_stage_names_what_finished_and_the_command_that_carries_on(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert "Start again with the same command" in next_step(STAND_IN, "run", run)
    assert "before any trial was trained" in next_step(DATA, "run", run)
    # before Tune has written its experiment state there is nothing to resume
    assert "before any trial was trained" in next_step(TRIALS, "run", run, resumable=False)
    assert f"Resume with: soup-ray run --resume {run}" in next_step(TRIALS, "run", run, resumable=True)
    assert f"Resume with: soup-ray sweep --resume {run}" in next_step(RAY_START, "sweep", run, resumable=True)
    assert f"soup-ray run --resume {run}" in next_step(SOUP, "run", run)
    report = next_step(REPORT, "run", run)
    assert f"soup-ray report {run}" in report and f"soup-ray serve {run}" in report
    assert "serve" not in next_step(REPORT, "sweep", run).split("Write it with")[1]
    for stage in (SERVING_START, SERVING):
        assert f"soup-ray serve {run}" in next_step(stage, "run", run)


def test_stages_print_their_line_and_keep_their_seconds_in_order() -> None:
    lines: list[str] = []
    stages = Stages(lines.append)
    with stages.stage(DATA):
        pass
    stages.start(SERVING_START)
    stages.start(SERVING, timed=False)
    stages.end()
    assert lines == [f"stage: {DATA}", f"stage: {SERVING_START}", f"stage: {SERVING}"]
    assert list(stages.seconds) == [DATA, SERVING_START]
    assert stages.current == SERVING


def test_stage_pause_holds_only_the_named_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOUP_RAY_STAGE_PAUSE", "finishing the soup=2.5")
    assert stage_pause(SOUP) == 2.5 and stage_pause(DATA) == 0.0
    monkeypatch.setenv("SOUP_RAY_STAGE_PAUSE", "finishing the soup=soon")
    assert stage_pause(SOUP) == 0.0


def test_the_command_line_handler_raises_keyboard_interrupt_once() -> None:
    previous = install_ctrl_c()
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_at_the_next_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler's KeyboardInterrupt can land in a finalizer or a weakref callback, where Python only prints
    "Exception ignored"; the stop it began must still end the command at the next stage, and the handler put
    in place again for serving must keep it, not start afresh (a Ctrl-C at "stage: serving start" was lost so)."""
    from soup_ray.serving.launch import sigterm_as_interrupt

    swallowed: list[BaseException | None] = []
    monkeypatch.setattr("sys.unraisablehook", lambda u: swallowed.append(u.exc_value))
    previous_term = signal.getsignal(signal.SIGTERM)
    previous = install_ctrl_c()
    try:

        class Finalized:
            def __del__(self) -> None:
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # Ctrl-C arriving during a finalizer

        Finalized()  # collected at once: the handler's KeyboardInterrupt is swallowed
        assert swallowed and isinstance(swallowed[0], KeyboardInterrupt)
        sigterm_as_interrupt()  # what serving does before it waits
        lines: list[str] = []
        with pytest.raises(KeyboardInterrupt):
            Stages(log=lines.append).start(SERVING_START)
        assert lines == []  # stopped before the stage began
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        install_ctrl_c()  # leave no stop pending for the tests after this one
        signal.signal(signal.SIGINT, previous)


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    atomic.write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.replacing(target) as tmp:
            tmp.write_text("half of the new")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
    atomic.write_json(target.with_suffix(".json"), {"a": 1}, durable=True)
    assert json.loads(target.with_suffix(".json").read_text()) == {"a": 1}


def test_an_interrupted_base_save_leaves_no_base_and_the_next_run_builds_it(
    prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import soup_ray.model as model
    from soup_ray.prepare import prepare_run
    from soup_ray.run_dir import RunDir

    cfg, _ = prepared
    real = model._write_base

    def interrupted(base, out_dir):
        real(base, out_dir)
        raise KeyboardInterrupt  # after every file of the base was written, before the folder is in place

    monkeypatch.setattr(model, "_write_base", interrupted)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        prepare_run(cfg, run, log=lambda m: None)
    assert not RunDir(run).base.exists()
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    monkeypatch.setattr(model, "_write_base", real)
    # a base without its zero-shot scores (stopped between the two) is built again, not half-reused
    prep = prepare_run(cfg, run, log=lambda m: None)
    RunDir(run).zero_shot.unlink()
    again = prepare_run(cfg, run, log=lambda m: None)
    assert again.fingerprint == prep.fingerprint and RunDir(run).zero_shot.is_file()


@pytest.mark.slow  # runs long on its own: the full suite only
def test_a_ctrl_c_caught_after_a_string_exec_still_exits_130_under_python_m(tmp_path: Path) -> None:
    """``python -m soup_ray.cli`` (as the tests and job entrypoints run it) exits 130 after a caught Ctrl-C.

    CPython remembers a KeyboardInterrupt that ended a string ``exec`` (huggingface_hub's lazy imports
    run one, under timm under open_clip) and, under ``-m``, ends the process by SIGINT at exit even when
    the command caught the Ctrl-C and returned 130: the status was then -2, about one Ctrl-C in three
    during the report stage of ``soup-ray run``.
    """
    import subprocess
    import sys

    (tmp_path / "interrupted_cmd.py").write_text(
        "import sys\n"
        "from soup_ray import cli\n"
        "def interrupted(args):\n"
        "    try:\n"
        "        exec('raise KeyboardInterrupt', {})  # a Ctrl-C landing inside a string exec\n"
        "    except KeyboardInterrupt:\n"
        "        print('caught', flush=True)\n"
        "        return 130\n"
        "cli.cmd_status = interrupted\n"
        "if __name__ == '__main__':\n"
        "    cli.console()\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": f"{tmp_path}:{root}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "interrupted_cmd", "status", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "caught" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 130, (done.returncode, done.stderr[-2000:])


def test_an_error_raised_once_a_ctrl_c_came_counts_as_the_ctrl_c() -> None:
    """Native code (pydantic-core building a validator while Ray Serve is imported) can turn the Ctrl-C's
    KeyboardInterrupt into an error of its own; the command must still stop as for a Ctrl-C (exit 130)."""
    import os
    import signal

    from soup_ray import stages
    from soup_ray.stages import install_ctrl_c, interrupted

    previous = install_ctrl_c()
    try:
        assert not interrupted(ValueError("a real error, no Ctrl-C"))
        try:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler raises here
            except KeyboardInterrupt as err:
                raise ValueError("SchemaError: ... KeyboardInterrupt") from err  # what pydantic-core hands back
        except ValueError as wrapped:
            assert interrupted(wrapped)
        assert interrupted(KeyboardInterrupt())
    finally:
        signal.signal(signal.SIGINT, previous)
        stages._stopping.clear()  # no stop under way for the tests after this one


def test_a_second_ctrl_c_returns_only_once_every_descendant_is_gone_and_its_port_free(tmp_path: Path) -> None:
    """The second Ctrl-C kills what the command started (an embedded Ray: raylet, GCS, workers) and exits.
    Ray puts each worker in a process group of its own, and a killed process holding much memory takes a
    while to unmap it before its sockets close: the command used to exit while Serve's proxy still held the
    HTTP port, and a ``soup-ray serve`` started again at once found the port taken."""
    import socket
    import subprocess
    import sys

    import psutil

    from soup_ray import stages

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = tmp_path / "ready"
    worker = (  # a stand-in for a Ray worker: own process group, a listening port, 1.5 GB touched
        "import os, socket, sys, time\n"
        "os.setpgrp()\n"
        "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
        "held = bytearray(1536 * 2**20)\n"
        "for i in range(0, len(held), 4096): held[i] = 1\n"
        "open(sys.argv[2], 'w').close()\n"
        "time.sleep(120)\n"
    )
    parent = (  # a stand-in for the raylet: starts the worker, then waits
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {worker!r}, sys.argv[1], sys.argv[2]])\n"
        "time.sleep(120)\n"
    )
    raylet = subprocess.Popen([sys.executable, "-c", parent, str(port), str(ready)])
    started = [psutil.Process(raylet.pid)]
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "the worker did not start"
        started += started[0].children(recursive=True)
        assert len(started) == 2
        stages._kill_descendants()
        running = [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not running, f"still running after the kill returned: {running}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # the port is free the moment the kill returns
    finally:  # stop only what this test started, by PID, even when it failed
        for p in started:
            try:
                p.kill()
            except psutil.Error:
                pass
        raylet.wait(timeout=30)
