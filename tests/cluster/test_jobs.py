"""Ray jobs for real: a token-auth head on loopback advertising fake GPUs, ``ray job submit``, Ray's job and state
APIs (what the dashboard shows), the live soup actor, then the run served over HTTP from the same cluster.

The head is started with ``ray start --head --block`` in a session of its own; the teardown stops that session's
processes by PID (SIGTERM, then SIGKILL for stragglers) and never touches any other Ray on the machine.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_STANDIN_STEPS

httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
SOUP_RAY = str(BIN / "soup-ray")
FAKE_GPUS = 2
# what the submitted job asks for: the shipped local config with a few small overrides (see JOB_ARGS)
TRIAL_CPU, TRIAL_GPU, SOUP_CPU, SOUP_GPU, NUM_TRIALS = 0.75, 0.5, 0.25, 0.25, 2  # both trials at once
JOB_ARGS = [
    "--no-serve",
    "--num-samples",
    str(NUM_TRIALS),
    "--set",
    f"model.standin_steps={TINY_STANDIN_STEPS}",  # the session's cached tiny stand-in: nothing to build
    "--set",
    "search_space.epochs=1",
    "--set",
    "soup.methods=[]",  # recipes have tests of their own
    "--set",
    f"trial_resources.cpu={TRIAL_CPU}",
    "--set",
    f"trial_resources.gpu={TRIAL_GPU}",
    "--set",
    f"soup.resources.cpu={SOUP_CPU}",
    "--set",
    f"soup.resources.gpu={SOUP_GPU}",
]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_pids(sid: int) -> list[int]:
    """PIDs of the live processes in session ``sid`` (Linux ``/proc``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields[3] is the session id, fields[0] the state
                out.append(int(entry.name))
    return out


def stop_session(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 45.0) -> None:
    """Signal the session a test started, wait for it, then SIGKILL whatever of it is left."""
    sid = proc.pid
    if proc.poll() is None:
        try:
            os.killpg(sid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (proc.poll() is None or session_pids(sid)):
        time.sleep(0.5)
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10  # SIGKILLed processes take a moment to go
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)


@dataclass
class Head:
    """A local Ray head started by this module."""

    tmp: Path
    token: str
    gcs: str
    dashboard: str
    env: dict[str, str]
    proc: subprocess.Popen
    submitted: dict[str, Any] = field(default_factory=dict)

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def cli(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, (
                f"{args[:3]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done


@pytest.fixture(scope="module")
def head(prepared, cache_dir: Path) -> Iterator[Head]:
    """``ray start --head`` on loopback with token auth and ``--num-gpus`` fake GPUs; stopped by its session id."""
    tmp = Path(tempfile.mkdtemp(prefix="srj"))  # short: Ray's socket paths must stay under 108 characters
    token = secrets.token_hex(32)
    token_path = tmp / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_ENABLE_UV_RUN_RUNTIME_ENV"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        HF_HUB_OFFLINE="1",
        SOUP_RAY_CACHE=str(cache_dir),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
    )
    gcs_port, dash_port = free_port(), free_port()
    ports = {
        flag: str(free_port())
        for flag in (
            "--ray-client-server-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
            "--node-manager-port",
            "--object-manager-port",
        )
    }
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs_port),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash_port),
        "--num-cpus",
        "2",
        "--num-gpus",
        str(FAKE_GPUS),
        "--temp-dir",
        str(tmp / "ray"),
        "--disable-usage-stats",
        *[x for kv in ports.items() for x in kv],
    ]
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(tmp, token, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", env, proc)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{(tmp / 'head.log').read_text()[-3000:]}"
            try:
                if httpx.get(f"{h.dashboard}/api/jobs/", headers=h.auth(), timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the dashboard of the test head did not answer within 120 s"
            time.sleep(1.0)
        yield h
    finally:
        # the head's raylet and GCS go quickly on SIGTERM; its agents can linger for half a minute, and they are
        # this session's own processes, so after 5 s whatever is left gets SIGKILL
        stop_session(proc, grace_s=5.0)
        log.close()
        assert not session_pids(proc.pid), "processes of the test head outlived its teardown"
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def job(head: Head) -> dict[str, Any]:
    """Submit the local job exactly as the README does (plus the offline cache) and follow it to the end."""
    run_dir = head.tmp / "runs" / "job-run"
    submission_id = f"soup-ray-test-{secrets.token_hex(4)}"
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "SOUP_RAY_CACHE": head.env["SOUP_RAY_CACHE"]}}
    t0 = time.monotonic()
    done = head.cli(
        RAY,
        "job",
        "submit",
        "--address",
        head.dashboard,
        "--working-dir",
        ".",
        "--submission-id",
        submission_id,
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "soup-ray",
        "run",
        "tune_configs/local.yaml",
        "--out",
        str(run_dir),
        *JOB_ARGS,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:  # the job's driver runs in a session of its own: stop it through Ray, not by PID
        head.cli(RAY, "job", "stop", submission_id, "--address", head.dashboard, check=False)
    return {
        "id": submission_id,
        "run_dir": run_dir,
        "rc": done.returncode,
        "out": done.stdout + done.stderr,
        "seconds": time.monotonic() - t0,
    }


def test_token_auth_guards_the_dashboard(head: Head) -> None:
    assert httpx.get(f"{head.dashboard}/api/jobs/", timeout=10).status_code == 401
    wrong = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
    assert httpx.get(f"{head.dashboard}/api/jobs/", headers=wrong, timeout=10).status_code in (401, 403)
    assert httpx.get(f"{head.dashboard}/api/jobs/", headers=head.auth(), timeout=10).status_code == 200


def test_submitted_job_succeeds_and_its_trials_ran(head: Head, job: dict[str, Any]) -> None:
    assert job["rc"] == 0, job["out"][-4000:]
    assert "succeeded" in job["out"]
    # the job API, as the dashboard's job page reads it
    info = httpx.get(f"{head.dashboard}/api/jobs/{job['id']}", headers=head.auth(), timeout=10).json()
    assert info["status"] == "SUCCEEDED" and "soup-ray run tune_configs/local.yaml" in info["entrypoint"]
    logs = head.cli(RAY, "job", "logs", job["id"], "--address", head.dashboard).stdout
    assert f"{NUM_TRIALS} completed, 0 diverged, 0 failed" in logs and "greedy_soup" in logs
    assert "the soup actor stays up 60 more minute(s) while idle, then exits" in logs  # frees its GPU share later
    rows = [json.loads(line) for line in (job["run_dir"] / "results.jsonl").read_text().splitlines()]
    trials = [r for r in rows if r["kind"] == "individual" and not r.get("summary")]
    assert len(trials) == NUM_TRIALS and all(r["status"] == "completed" for r in trials)
    assert {r["model_name"] for r in rows if r["kind"] == "soup"} >= {"greedy_soup", "uniform_soup"}
    assert (job["run_dir"] / "soup" / "soup.json").is_file() and (job["run_dir"] / "report.md").is_file()


def _state(head: Head, kind: str) -> list[dict[str, Any]]:
    out = head.cli(
        RAY, "list", kind, "--detail", "--format", "json", "--limit", "1000", "--address", head.dashboard
    ).stdout
    return json.loads(out[out.index("[") :])


def test_trials_and_soup_actor_hold_exactly_the_configured_resources(head: Head, job: dict[str, Any]) -> None:
    assert job["rc"] == 0, job["out"][-4000:]
    job_id = httpx.get(f"{head.dashboard}/api/jobs/{job['id']}", headers=head.auth(), timeout=10).json()["job_id"]
    groups = [g for g in _state(head, "placement-groups") if g["creator_job_id"] == job_id]
    assert len(groups) >= 1  # Tune reserves one placement group per running trial (actors may be reused)
    for g in groups:
        assert [b["unit_resources"] for b in g["bundles"]] == [{"CPU": TRIAL_CPU, "GPU": TRIAL_GPU}]
    actors = [a for a in _state(head, "actors") if a["job_id"] == job_id]
    trials = [a for a in actors if a["class_name"] == "ImplicitFunc"]
    if not trials:
        # the GCS may already have dropped the dead actors of a finished job; their creation tasks keep the same
        # resource request in the task table
        trials = [
            t
            for t in _state(head, "tasks")
            if t["job_id"] == job_id
            and t["type"] == "ACTOR_CREATION_TASK"
            and t["func_or_class_name"].startswith("ImplicitFunc")
        ]
    assert trials and len(trials) <= NUM_TRIALS
    for a in trials:  # a trial actor lives inside its group: the group-scoped CPU and GPU, nothing more
        wanted = {k: v for k, v in a["required_resources"].items() if not k.startswith("bundle_group")}
        assert {k.split("_group")[0] for k in wanted} == {"CPU", "GPU"}
        assert all(v == (TRIAL_CPU if k.startswith("CPU") else TRIAL_GPU) for k, v in wanted.items()), wanted
    soup = [a for a in actors if a["class_name"] == "SoupActor"]
    assert len(soup) == 1
    assert soup[0]["state"] == "ALIVE"  # detached on a cluster: it outlives the job that started it
    from soup_ray.cluster.actor import actor_name

    assert soup[0]["name"] == actor_name(job["run_dir"]) and soup[0]["ray_namespace"] == "soup-ray"
    assert soup[0]["required_resources"] == {"CPU": SOUP_CPU, "GPU": SOUP_GPU}
    # the node advertises exactly the fake GPUs it was started with
    status = head.cli(RAY, "status", "--address", head.gcs).stdout
    assert f"/{FAKE_GPUS}.0 GPU" in status


def test_status_reads_the_live_soup_actor(head: Head, job: dict[str, Any]) -> None:
    assert job["rc"] == 0, job["out"][-4000:]
    st = json.loads(head.cli(SOUP_RAY, "status", str(job["run_dir"]), "--address", head.gcs, "--json").stdout)
    assert st["source"] == "live" and st["candidates_seen"] == NUM_TRIALS and st["queued"] == 0
    soup_json = json.loads((job["run_dir"] / "soup" / "soup.json").read_text())
    assert st["ingredients"] == soup_json["ingredients"] and st["version"] == soup_json["version"]


def _digit_pngs(n: int) -> tuple[list[bytes], Any]:
    from soup_ray.config import DigitsData
    from soup_ray.data import build_dataset

    x, y = build_dataset(DigitsData(), 32).test.tensors
    out = []
    for i in range(n):
        arr = (x[i].permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0], "L").save(buf, "PNG")
        out.append(buf.getvalue())
    return out, x[:n]


def test_the_run_is_served_from_the_cluster_over_http(head: Head, job: dict[str, Any]) -> None:
    assert job["rc"] == 0, job["out"][-4000:]
    import torch

    from soup_ray.export import load_soup
    from soup_ray.serving import load_image, to_model_input

    port = free_port()
    log = open(head.tmp / "serve.log", "w")
    # from another folder, as `ray exec` runs it: the replicas must find serve/ without the driver's working dir
    proc = subprocess.Popen(
        [SOUP_RAY, "serve", str(job["run_dir"]), "--address", head.gcs, "--port", str(port), "--ensemble", "0"],
        env=head.env,
        cwd=head.tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (head.tmp / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the served soup did not become healthy within 180 s"
            time.sleep(1.0)
        info = httpx.get(f"{url}/info", timeout=10).json()
        soup_json = json.loads((job["run_dir"] / "soup" / "soup.json").read_text())
        assert info["model"] == "soup" and info["ingredients"] == soup_json["ingredients"]
        pngs, _ = _digit_pngs(6)
        model, _ = load_soup(job["run_dir"] / "soup")
        with torch.no_grad():
            expected = model(to_model_input([load_image(b, info["image_size"]) for b in pngs])).argmax(1).tolist()
        with httpx.Client(base_url=url, timeout=30) as client:
            got = []
            for b in pngs:
                r = client.post("/predict", content=b, headers={"content-type": "image/png"})
                assert r.status_code == 200, r.text
                got.append(r.json()["predictions"][0]["index"])
            bad = client.post("/predict", content=b"not an image", headers={"content-type": "image/png"})
        assert got == expected
        assert bad.status_code == 400 and bad.json()["error"] == "not_an_image"
    finally:
        stop_session(proc, signal.SIGTERM, grace_s=60)
        log.close()
