"""Scenario 3: the ``soup-ray sweep`` driver SIGKILLed once a trial finished, then ``soup-ray sweep --resume``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from ...run_dir import WEIGHTS_FILE, RunDir
from .common import (
    Bench,
    ScenarioTimeout,
    accounting,
    compare_with_offline_soup,
    in_session,
    process_key,
    result_lines,
    still_alive,
    tiny_config,
    trial_dirs,
)

LEFTOVER_WAIT_S = 90.0  # how long the killed driver's embedded Ray may take to go (see the loop below)


def cli_env(b: Bench) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def scenario_driver_kill(b: Bench, rec: dict[str, Any]) -> None:
    import yaml

    from ...results import read_jsonl

    n = 3 if b.quick else 4
    cfg = tiny_config(
        **{"tune.num_samples": n, "tune.seed": 5, "tune.checkpoint_interval_s": 0, "search_space.epochs": 2}
    )
    folder = b.work / "s3-driver-kill"
    folder.mkdir(parents=True, exist_ok=True)
    cfg_file = folder / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run_dir = (folder / "run").resolve()
    first_cmd = [sys.executable, "-m", "soup_ray.cli", "sweep", str(cfg_file), "--out", str(run_dir), "--no-dashboard"]
    resume_cmd = [sys.executable, "-m", "soup_ray.cli", "sweep", "--resume", str(run_dir), "--no-dashboard"]
    rec["details"].update(
        trials=n,
        epochs=2,
        checkpoint_interval_s=0,
        commands=[" ".join(["python", *first_cmd[1:]]), " ".join(["python", *resume_cmd[1:]])],
    )
    log1 = (folder / "first.log").open("w")
    t0 = time.time()
    proc = subprocess.Popen(first_cmd, stdout=log1, stderr=subprocess.STDOUT, env=cli_env(b), start_new_session=True)
    from safetensors.torch import load_file

    finished_before: dict[str, int] = {}
    weights_before: dict[str, dict[str, Any]] = {}
    leftover_names: list[str] = []
    try:
        deadline = t0 + (300 if b.quick else 360)
        finals: list[Path] = []
        while time.time() < deadline and proc.poll() is None:
            finals = sorted(run_dir.glob("tune/*/checkpoint_*/model.safetensors"))
            if finals:
                break
            time.sleep(0.5)
        if not finals:
            raise ScenarioTimeout(
                f"no trial finished within the bound (exit code {proc.poll()}); see {folder / 'first.log'}"
            )
        # the final checkpoint is persisted before Tune's driver logs the result: wait (bounded) for that line
        done_dirs = {f.parents[1] for f in finals}
        for _ in range(40):
            if all(any(x.get("status") == "completed" for x in result_lines(d)) for d in done_dirs):
                break
            time.sleep(0.25)
        children = [k for k in (process_key(p) for p in psutil.Process(proc.pid).children(recursive=True)) if k]
        for d in trial_dirs(run_dir):
            lines = result_lines(d)
            if any(x.get("status") == "completed" for x in lines):
                finished_before[d.name] = len(lines)
                finals_of = sorted(d.glob("checkpoint_*/model.safetensors"))
                if finals_of:
                    weights_before[d.name] = load_file(str(finals_of[-1]))
        states = sorted(RunDir(run_dir).tune.glob("experiment_state-*.json"))
        rec["details"]["experiment_state_age_at_kill_s"] = (
            round(time.time() - states[-1].stat().st_mtime, 2) if states else None
        )
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=30)
        rec["injected"] = [
            {
                "what": "SIGKILL to the `soup-ray sweep` driver",
                "t_s": round(killed_at - t0, 1),
                "trials_finished_before": len(finished_before),
                "driver_children_before": len(children),
            }
        ]
        rec["faults_injected"] = 1
        alive: list[psutil.Process] = []
        timeline: dict[str, int] = {}
        # Ray's dashboard and runtime-env agents notice the raylet's death within 2 s, then try for up to 60 s to
        # publish it to the (dead) GCS before they exit: give the embedded Ray 90 s to go with its driver
        marks = [1.0, 5.0, 10.0, 20.0, 30.0, 60.0, 75.0, 90.0]
        for _ in range(400):
            alive = still_alive(children) + [
                p for p in in_session(proc.pid) if (p.pid, p.create_time()) not in set(children)
            ]
            while marks and time.time() - killed_at >= marks[0]:
                timeline[f"{marks.pop(0):g}s"] = len(alive)
            if not alive or time.time() - killed_at >= LEFTOVER_WAIT_S:
                break
            time.sleep(0.25)
        rec["details"]["driver_ray_processes_alive_after_kill"] = timeline
        rec["details"][f"ray_processes_left_{LEFTOVER_WAIT_S:g}s_after_driver_kill"] = len(alive)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                leftover_names.append(" ".join(p.cmdline())[:80] or p.name())
                p.kill()  # by PID: only processes of the driver this benchmark started
        rec["details"]["leftover_processes_killed"] = leftover_names
        rec["details"]["seconds_until_driver_children_gone"] = round(time.time() - killed_at, 1) if not alive else None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log1.close()
    first_rows = read_jsonl(RunDir(run_dir).results) if RunDir(run_dir).results.exists() else []
    rec["details"]["results_jsonl_rows_at_kill"] = len(first_rows)
    log2 = (folder / "resume.log").open("w")
    t1 = time.time()
    resumed = subprocess.Popen(
        resume_cmd, stdout=log2, stderr=subprocess.STDOUT, env=cli_env(b), start_new_session=True
    )
    try:
        code = resumed.wait(timeout=360 if b.quick else 420)
    except subprocess.TimeoutExpired:
        code = None
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(resumed.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        resumed.kill()
        resumed.wait(timeout=30)
    finally:
        log2.close()
    rec["details"]["resume_s"] = round(time.time() - t1, 1)
    rec["details"]["resume_exit_code"] = code
    if code is None:
        raise ScenarioTimeout(f"the resumed sweep ran past its bound; see {folder / 'resume.log'}")
    rows = [r for r in read_jsonl(RunDir(run_dir).results) if "trial_id" in r]
    ids = [r["trial_id"] for r in rows]
    retrained, rereported = {}, {}
    for d in trial_dirs(run_dir):
        if d.name in finished_before:
            added = result_lines(d)[finished_before[d.name] :]
            # an epoch trained again reports status "running"; a finished trial that Tune restarts (its end was
            # not yet in the experiment state at the kill) only reports its final checkpoint again, "completed"
            epochs_again = sum(1 for r in added if r.get("status") != "completed")
            if epochs_again:
                retrained[d.name] = epochs_again
            elif added:
                rereported[d.name] = len(added)
    rec["details"]["finished_trials_trained_again"] = len(retrained)
    rec["details"]["retrained_epochs_added"] = retrained
    rec["details"]["finished_trials_reported_again_without_training"] = rereported
    same_after: dict[str, bool | None] = {}
    import torch

    for name in [*retrained, *rereported]:  # did it change its weights? (same seed, CPU: it should not)
        row = next((r for r in rows if r["trial_id"] in name and r.get("checkpoint")), None)
        if row is None or name not in weights_before:
            same_after[name] = None
            continue
        now = load_file(str(run_dir / row["checkpoint"] / WEIGHTS_FILE))
        before = weights_before[name]
        same_after[name] = set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in now)
    rec["details"]["retrained_trials_final_weights_unchanged"] = same_after
    cmp: dict[str, Any] = {"bit_identical": False}
    if code == 0:
        cmp = compare_with_offline_soup(run_dir)
    rec["details"]["soup_vs_offline"] = cmp
    state = RunDir(run_dir).state_file
    if state.exists():
        acc = accounting(state, [r["trial_id"] for r in rows if r["status"] == "completed"], None)
        rec["offers_sent"], rec["offers_accounted_for"] = acc["offers_sent"], acc["offers_accounted_for"]
        rec["details"]["accounting"] = acc
    rec["checks"] = {
        "at least one trial finished before the kill": len(finished_before) >= 1,
        f"the killed driver's Ray processes were gone within {LEFTOVER_WAIT_S:g} s": not leftover_names,
        "--resume exited 0": code == 0,
        "results.jsonl has every trial once": sorted(ids) == sorted(set(ids)) and len(ids) == n,
        "every trial completed": all(r["status"] == "completed" for r in rows) and len(rows) == n,
        "0 finished trials trained again": not retrained,
        "soup equals the offline greedy soup (bit-identical)": cmp.get("bit_identical", False),
    }
    rec["faults_survived"] = 1 if (code == 0 and len(ids) == n == len(set(ids)) and cmp.get("bit_identical")) else 0
