"""Ray jobs on an autoscaling cluster made from ``cluster.yaml``: what a user does after ``ray up``.

The head is Ray's ``fake_multinode`` provider on loopback: ``RAY_FAKE_CLUSTER=1 ray start --head --block
--autoscaling-config=...`` with token auth, in a session of its own. Its config is generated from the project's
``cluster.yaml`` (``soup_ray.cluster.local_cluster``): the head type without GPUs, the single-GPU worker type
with fake GPUs from 0 workers (at most 2 here). Then, in order: ``soup-ray run --dry-run`` against the live
cluster, ``ray job submit`` of the main job, whose GPU trials make Ray's real autoscaler add worker nodes, Ray's
job and state APIs (what the dashboard shows), the live soup actor, the run served from a worker node over HTTP,
and the workers scaled back down once idle. A watcher samples the cluster's nodes every 2 s throughout.

The teardown stops the head's session by PID (SIGTERM, then SIGKILL for stragglers): the worker nodes the
autoscaler started are in that session too. Nothing else on the machine is touched.
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
import threading
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
CLUSTER_YAML = ROOT / "cluster.yaml"
WORKER_TYPE, MAX_WORKERS = "gpu_1x_a10g", 2  # cluster.yaml's one-GPU worker type; its 8-GPU type is kept out
# what the submitted job asks for: the shipped local config with a few small overrides (see JOB_ARGS). A trial
# wants a whole GPU, which only the worker type has, so each one makes the autoscaler add a worker node; the soup
# actor wants none and stays on the head, so that the workers can go once the job is done
TRIAL_CPU, TRIAL_GPU, SOUP_CPU, SOUP_GPU, NUM_TRIALS = 1.0, 1.0, 0.25, 0.0, 2
JOB_ARGS = [
    "--no-serve",
    "--num-samples",
    str(NUM_TRIALS),
    "--set",
    f"model.standin_steps={TINY_STANDIN_STEPS}",  # the session's cached tiny stand-in: nothing to build
    "--set",
    "search_space.epochs=1",
    "--set",
    "data.kind=digits",  # the job's path, not the data, is under test here: the small built-in set
    "--set",
    "data.train_size=300",
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
    autoscaling_config: Path
    submitted: dict[str, Any] = field(default_factory=dict)
    timeline: list[tuple[float, int, list[str]]] = field(default_factory=list)  # (s, live workers, their ids)

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes from Ray's state API, as the dashboard's cluster page reads them."""
        r = httpx.get(f"{self.dashboard}/api/v0/nodes?limit=100", headers=self.auth(), timeout=10)
        r.raise_for_status()
        return list(r.json()["data"]["result"]["result"])

    def live_workers(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if n["state"] == "ALIVE" and not n["is_head_node"]]

    def node_count_over_time(self) -> str:
        """The timeline as ``t=12s: 2`` at every change (for failure messages and the test's output)."""
        out, last = [], None
        for t, n, _ in self.timeline:
            if n != last:
                out.append(f"t={t:.0f}s: {n}")
                last = n
        return ", ".join(out)

    def cli(
        self, *args: str, timeout: float = 120.0, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            list(args), env={**self.env, **(env or {})}, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert done.returncode == 0, (
                f"{args[:3]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done


def watch_nodes(h: Head, stop: threading.Event, period_s: float = 2.0) -> None:
    """Sample the live worker nodes every ``period_s`` into ``h.timeline`` until ``stop`` is set."""
    t0 = time.monotonic()
    while not stop.wait(period_s):
        try:
            workers = h.live_workers()
        except (httpx.HTTPError, KeyError, ValueError):
            continue
        h.timeline.append((time.monotonic() - t0, len(workers), sorted(n["node_id"] for n in workers)))


@pytest.fixture(scope="module")
def head(prepared, cache_dir: Path) -> Iterator[Head]:
    """A fake_multinode autoscaling head from cluster.yaml, on loopback with token auth; stopped by its session."""
    from soup_ray.cluster.local_cluster import ENV, fake_multinode_config, head_resource_args
    from soup_ray.serving.launch import DEFAULT_THROUGHPUT_MODE, PROXY_ENV, THROUGHPUT_MODES

    tmp = Path(tempfile.mkdtemp(prefix="srj"))  # short: Ray's socket paths must stay under 108 characters
    token = secrets.token_hex(32)
    token_path = tmp / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_ENABLE_UV_RUN_RUNTIME_ENV"}
    env.update(
        ENV,  # RAY_FAKE_CLUSTER, a 1 s autoscaler loop, every node on 127.0.0.1
        **THROUGHPUT_MODES[DEFAULT_THROUGHPUT_MODE],  # as cluster.yaml's `ray start` lines (without HAProxy)
        **PROXY_ENV,  # soup-ray's Serve proxy callback, also as cluster.yaml sets it
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        HF_HUB_OFFLINE="1",
        SOUP_RAY_CACHE=str(cache_dir),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
    )
    gcs_port, dash_port = free_port(), free_port()
    config = fake_multinode_config(
        CLUSTER_YAML,
        f"127.0.0.1:{gcs_port}",
        max_workers={WORKER_TYPE: MAX_WORKERS, "gpu_8x_a100": 0},
        idle_timeout_minutes=0.2,  # 12 s: more room than the example 6 s for a node just added on a busy host
    )
    autoscaling = tmp / "autoscaling.yaml"
    autoscaling.write_text(json.dumps(config))  # JSON is YAML
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
        *head_resource_args(config),
        "--autoscaling-config",
        str(autoscaling),
        "--temp-dir",
        str(tmp / "ray"),
        "--disable-usage-stats",
        *[x for kv in ports.items() for x in kv],
    ]
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(tmp, token, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", env, proc, autoscaling)
    stop = threading.Event()
    watcher = threading.Thread(target=watch_nodes, args=(h, stop), daemon=True)
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
        watcher.start()
        yield h
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=15)
        print(f"\nlive worker nodes over time: {h.node_count_over_time()}")
        # the head's raylet and GCS go quickly on SIGTERM; its agents can linger for half a minute, and they are
        # this session's own processes (the autoscaler's worker nodes too), so after 5 s what is left gets SIGKILL
        stop_session(proc, grace_s=5.0)
        log.close()
        assert not session_pids(proc.pid), "processes of the test head outlived its teardown"
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def job(head: Head) -> dict[str, Any]:
    """Submit the local job as the README's one-machine steps do (plus the offline cache); follow it to the end."""
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
        # no --working-dir (the README's single-machine form): every fake node shares this machine's disk and the
        # head's session folder, so a worker node's runtime-env agent unpacking its copy of the package replaces
        # the folder the job's driver runs in (its cwd vanished: "[Errno 2]"); the head starts from the checkout
        "--submission-id",
        submission_id,
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "soup-ray",
        "run",
        str(ROOT / "tune_configs" / "local.yaml"),
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


def test_dry_run_reports_the_live_head_and_the_worker_type_the_autoscaler_adds(head: Head) -> None:
    assert head.live_workers() == []  # min_workers 0: nothing runs yet
    done = head.cli(
        SOUP_RAY,
        "run",
        "tune_configs/local.yaml",
        "--dry-run",
        "--cluster-config",
        str(head.autoscaling_config),
        *JOB_ARGS,
        check=False,
        timeout=300,
        env={"RAY_ADDRESS": head.gcs},
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert f"the Ray cluster at '{head.gcs}'" in out
    assert "head node: 8 CPU, 0 GPU x1 live -> 0 trial(s) per node" in out  # cluster.yaml's head: no GPU
    assert f"autoscaling node types from {head.autoscaling_config}" in out
    assert f"{WORKER_TYPE}: 8 CPU, 1 GPU, autoscaling 0..{MAX_WORKERS} -> 1 trial(s) per node" in out
    assert "gpu_8x_a100" not in out  # kept out of this machine (max_workers 0)


def test_submitted_job_succeeds_and_its_trials_ran(head: Head, job: dict[str, Any]) -> None:
    assert job["rc"] == 0, job["out"][-4000:]
    assert "succeeded" in job["out"]
    # the job API, as the dashboard's job page reads it
    info = httpx.get(f"{head.dashboard}/api/jobs/{job['id']}", headers=head.auth(), timeout=10).json()
    assert info["status"] == "SUCCEEDED" and info["entrypoint"].startswith(
        f"soup-ray run {ROOT}/tune_configs/local.yaml"
    )
    logs = head.cli(RAY, "job", "logs", job["id"], "--address", head.dashboard).stdout
    assert f"{NUM_TRIALS} completed, 0 diverged, 0 failed" in logs and "greedy_soup" in logs
    assert "the soup actor stays up 60 more minute(s) while idle, then exits" in logs  # frees its GPU share later
    rows = [json.loads(line) for line in (job["run_dir"] / "results.jsonl").read_text().splitlines()]
    trials = [r for r in rows if r["kind"] == "individual" and not r.get("summary")]
    assert len(trials) == NUM_TRIALS and all(r["status"] == "completed" for r in trials)
    assert {r["model_name"] for r in rows if r["kind"] == "soup"} >= {"greedy_soup", "uniform_soup"}
    assert (job["run_dir"] / "soup" / "soup.json").is_file() and (job["run_dir"] / "report.md").is_file()


def _trial_nodes(run_dir: Path) -> set[str]:
    """The Ray nodes the trials' epochs ran on (Tune's result.json of each trial)."""
    nodes = set()
    for f in (run_dir / "tune").glob("*/result.json"):
        nodes |= {json.loads(x)["node_id"] for x in f.read_text().splitlines() if x.strip()}
    return nodes


def test_the_autoscaler_added_worker_nodes_for_the_gpu_trials(head: Head, job: dict[str, Any]) -> None:
    assert job["rc"] == 0, job["out"][-4000:]
    seen = {i for _, _, ids in head.timeline for i in ids}
    most = max((n for _, n, _ in head.timeline), default=0)
    assert most == MAX_WORKERS, f"live workers over time: {head.node_count_over_time()}"
    trial_nodes = _trial_nodes(job["run_dir"])
    assert len(trial_nodes) == NUM_TRIALS and trial_nodes <= seen, (trial_nodes, seen)  # one trial per GPU node
    heads = {n["node_id"] for n in head.nodes() if n["is_head_node"]}
    assert not trial_nodes & heads, "a trial ran on the head, which has no GPU"


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
    # on a cluster a trial's actor can die (a worker node going away, a worker process lost while starting on a
    # fresh node) and Tune starts it again, up to tune.max_failures times (3 on a cluster): each attempt is an
    # actor of its own, with the same resources; every trial still completed once (test above)
    assert trials and len(trials) <= NUM_TRIALS * (1 + 3), len(trials)
    for a in trials:  # a trial actor lives inside its group: the group-scoped CPU and GPU, nothing more
        wanted = {k: v for k, v in a["required_resources"].items() if not k.startswith("bundle_group")}
        assert {k.split("_group")[0] for k in wanted} == {"CPU", "GPU"}
        assert all(v == (TRIAL_CPU if k.startswith("CPU") else TRIAL_GPU) for k, v in wanted.items()), wanted
    soup = [a for a in actors if a["class_name"] == "SoupActor"]
    assert len(soup) == 1
    assert soup[0]["state"] == "ALIVE"  # detached on a cluster: it outlives the job that started it
    from soup_ray.cluster.actor import actor_name

    assert soup[0]["name"] == actor_name(job["run_dir"]) and soup[0]["ray_namespace"] == "soup-ray"
    assert soup[0]["required_resources"] == {"CPU": SOUP_CPU}  # SOUP_GPU is 0: Ray lists no GPU
    heads = {n["node_id"] for n in head.nodes() if n["is_head_node"]}
    assert soup[0]["node_id"] in heads  # asks for no GPU: it stays on the head while workers come and go


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
        [
            SOUP_RAY,
            "serve",
            str(job["run_dir"]),
            "--address",
            head.gcs,
            "--port",
            str(port),
            "--ensemble",
            "0",
            "--num-gpus",
            "1",  # the replica wants a GPU, as on the cluster: only a worker node has one
            "--proxy-location",
            "HeadOnly",  # every fake node is 127.0.0.1: a proxy per node would each want this port
        ],
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
        info = httpx.get(f"{url}/info", params={"detail": "local"}, timeout=10).json()
        heads = {n["node_id"] for n in head.nodes() if n["is_head_node"]}
        workers = {n["node_id"] for n in head.live_workers()}
        assert info["node_id"] in workers and info["node_id"] not in heads, (info["node_id"], workers)
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


def test_the_workers_scale_back_down_once_idle(head: Head, job: dict[str, Any]) -> None:
    """After the job and the server are gone, the autoscaler removes every worker (idle_timeout_minutes 0.1)."""
    assert job["rc"] == 0, job["out"][-4000:]
    deadline = time.monotonic() + 120
    while head.live_workers():
        assert time.monotonic() < deadline, f"workers still up after 120 s idle: {head.node_count_over_time()}"
        time.sleep(2.0)
    counts = [n for _, n, _ in head.timeline]
    assert 0 in counts and MAX_WORKERS in counts, head.node_count_over_time()
    assert counts.index(MAX_WORKERS) > counts.index(0)  # up from none, then (checked above) back to none
