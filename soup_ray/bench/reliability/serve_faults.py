"""Scenarios 4 and 5 on a served run: a Serve model replica killed under load, and the soak."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from .common import Bench, ScenarioTimeout


class TimelineClient:
    """An ``httpx.Client`` stand-in for ``loadgen.run_level`` that also records every request's start, end and
    status (what the recovery time is measured from)."""

    def __init__(self, concurrency: int, timeout_s: float):
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.Client(timeout=timeout_s, limits=limits, trust_env=False)
        self.lock = threading.Lock()
        self.events: list[tuple[float, float, str]] = []

    def post(self, url: str, **kw: Any) -> Any:
        start = time.time()
        try:
            r = self.client.post(url, **kw)
        except Exception as err:
            with self.lock:
                self.events.append((start, time.time(), f"exc:{type(err).__name__}"))
            raise
        with self.lock:
            self.events.append((start, time.time(), str(r.status_code)))
        return r

    def close(self) -> None:
        self.client.close()


def _ok(key: str) -> bool:
    return key.isdigit() and 200 <= int(key) < 300


def recovery_time(events: Sequence[tuple[float, float, str]], kill_t: float) -> dict[str, Any]:
    """Seconds from the kill until requests succeed again.

    Answers already on their way at the kill (completed within ``max(1 s, 3 x``
    the median latency before the kill``)``) do not count; after that, the first
    successful answer that completed after the last failed one is the
    recovery, whether the requests in between failed (503/504) or waited for
    the new replica.
    """
    from ..stats import percentile

    before = [e[1] - e[0] for e in events if e[1] < kill_t and _ok(e[2])]
    in_transit = max(1.0, 3.0 * (percentile(before, 50) or 0.0))
    after = [e for e in events if e[1] >= kill_t]
    failures = [e for e in after if not _ok(e[2])]
    out: dict[str, Any] = {"failures_after_kill": len(failures), "in_transit_cutoff_s": round(in_transit, 3)}
    since = kill_t + in_transit
    if failures:
        last_fail = max(e[1] for e in failures)
        out["first_failure_s"] = round(min(e[1] for e in failures) - kill_t, 3)
        out["last_failure_s"] = round(last_fail - kill_t, 3)
        since = max(since, last_fail)
    oks = [e[1] for e in after if _ok(e[2]) and e[1] >= since]
    out["recovery_s"] = round(min(oks) - kill_t, 3) if oks else None
    slow = [e[1] - e[0] for e in after if e[0] <= kill_t + 1.0]
    out["slowest_request_around_kill_s"] = round(max(slow), 3) if slow else None
    return out


def local_info(url: str) -> dict[str, Any]:
    import httpx

    r = httpx.get(f"{url}/info", params={"detail": "local"}, timeout=10, trust_env=False)
    r.raise_for_status()
    return r.json()


def wait_ready(url: str, body: bytes, seconds: float) -> float:
    """Poll until ``/healthz`` and ``POST /predict`` answer 200; returns the seconds waited."""
    from ..serving_bench import wait_ready as wait_route

    try:
        return wait_route(url, "/predict", body, seconds)
    except TimeoutError as err:
        raise ScenarioTimeout(str(err)) from None


def rss_mb(pid: int) -> float | None:
    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 2)
    except psutil.Error:
        return None


class Server:
    """The run of scenario 1 served on 127.0.0.1 (a free port) by a Ray this benchmark starts and stops."""

    def __init__(self, b: Bench):
        self.b = b
        self.url: str | None = None
        self.bodies: list[bytes] = []
        self.started = False

    def ensure(self) -> str:
        if self.url is not None:
            return self.url
        from ...cluster.session import free_port
        from ...serving import serve_run

        run = self.b.served_run
        if run is None:
            raise RuntimeError("no finished run to serve: run scenario 1 in the same invocation or pass --serve-run")
        from ..loadgen import sample_pngs

        self.bodies = sample_pngs(run, n=32)
        port = free_port(0)
        t0 = time.time()
        self.started = True
        url = serve_run(run, "127.0.0.1", port, blocking=False, log=self.b.quiet, verbose=False, ensemble=0)
        wait_ready(url, self.bodies[0], 240.0)
        self.ready_s = round(time.time() - t0, 1)
        self.url = url
        self.b.log(f"  serving {run} at {url} (ready after {self.ready_s:.0f}s)")
        return url

    def stop(self) -> None:
        if self.started:
            from ...serving import stop_serve_and_ray

            with contextlib.suppress(Exception):
                stop_serve_and_ray()
            self.started = False
            self.url = None  # a later ensure() serves the run again


def fault_under_load(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    seconds: float,
    fault_at_s: float,
    inject: Callable[[], None],
    is_back: Callable[[dict[str, Any]], bool],
    back_within_s: float,
) -> tuple[Any, dict[str, Any], list[tuple[float, float, str]]]:
    """Load ``url``/predict for ``seconds`` at ``concurrency``; ``fault_at_s`` in, ``inject()`` the fault, then
    poll ``/info?detail=local`` until ``is_back(info)`` (at most ``back_within_s``).

    Returns the load level, the marks (``t_start``; ``kill_t``, the fault's time; ``back_info`` and
    ``replica_back_s`` once back; ``error`` if the injection failed) and every request's (start, end, status).
    """
    from ..loadgen import run_level

    client = TimelineClient(concurrency, 30.0)
    marks: dict[str, Any] = {}

    def inject_then_watch() -> None:
        time.sleep(max(0.0, marks["t_start"] + fault_at_s - time.time()))
        try:
            inject()
        except Exception as err:  # noqa: BLE001
            marks["error"] = repr(err)
            return
        marks["kill_t"] = time.time()
        deadline = marks["kill_t"] + back_within_s
        while time.time() < deadline:
            try:
                info = local_info(url)
                if is_back(info):
                    marks["back_info"] = info
                    marks["replica_back_s"] = round(time.time() - marks["kill_t"], 3)
                    return
            except Exception:  # noqa: BLE001 - the ingress answers 503 while no replica is up
                pass
            time.sleep(0.25)

    marks["t_start"] = time.time()
    watcher = threading.Thread(target=inject_then_watch, daemon=True, name="fault-injector")
    watcher.start()
    try:
        level = run_level(f"{url}/predict", bodies, concurrency, 1_000_000, seconds, timeout_s=30.0, client=client)  # type: ignore[arg-type]
    finally:
        client.close()
    watcher.join(timeout=back_within_s + 10.0)
    return level, marks, client.events


def scenario_replica_kill(b: Bench, server: Server, rec: dict[str, Any]) -> None:
    import ray

    url = server.ensure()
    seconds, kill_after, concurrency = (15.0, 3.0, 8) if b.quick else (24.0, 5.0, 8)
    before = local_info(url)
    old_actor, old_pid = before.get("actor"), before.get("pid")
    if not old_actor:
        from ray.util.state import list_actors

        alive = list_actors(filters=[("class_name", "=", "ServeReplica:default:Model"), ("state", "=", "ALIVE")])
        old_actor = alive[0].name if alive else None
    rec["details"].update(
        concurrency=concurrency,
        load_seconds=seconds,
        kill_at_s=kill_after,
        replica_before={"actor": old_actor, "pid": old_pid},
    )

    def is_new_replica(info: dict[str, Any]) -> bool:
        return bool(info.get("actor") and info["actor"] != old_actor and info.get("ready"))

    level, marks, events = fault_under_load(
        url,
        server.bodies,
        concurrency,
        seconds,
        kill_after,
        lambda: ray.kill(ray.get_actor(old_actor, namespace="serve")),
        is_new_replica,
        60.0,
    )
    t_start = marks["t_start"]
    rec["requests_sent"], rec["requests_failed"] = level.sent, level.sent - level.ok
    rec["p99_ms"] = level.latency_ms.get("p99")
    rec["details"]["load"] = {k: v for k, v in level.to_json().items() if k != "extra"}
    if "kill_t" in marks:
        rec["faults_injected"] = 1
        rec["injected"] = [
            {
                "what": "ray.kill of the Model replica actor",
                "actor": old_actor,
                "t_s": round(marks["kill_t"] - t_start, 2),
            }
        ]
        rec["details"]["recovery"] = recovery_time(events, marks["kill_t"])
        rec["recovery_s"] = rec["details"]["recovery"]["recovery_s"]
    back = marks.get("back_info") or {}
    rec["details"]["replica_after"] = {
        "actor": back.get("actor"),
        "pid": back.get("pid"),
        "replica_back_s": marks.get("replica_back_s"),
        "error": marks.get("error"),
    }
    failed_kinds = {k for k in level.errors}
    rec["checks"] = {
        "replica killed": "kill_t" in marks,
        "Serve brought a new replica back": bool(back.get("actor")),
        "requests succeed again": rec["recovery_s"] is not None,
        "failures are JSON 503/504 answers, never a hang or a 500": failed_kinds <= {"503", "504"}
        and level.unfinished == 0,
    }
    rec["faults_survived"] = 1 if (back.get("actor") and rec["recovery_s"] is not None) else 0


def scenario_soak(b: Bench, server: Server, rec: dict[str, Any]) -> None:
    from ..loadgen import run_level

    url = server.ensure()
    seconds, concurrency = (10.0, 32) if b.quick else (60.0, 32)
    info = local_info(url)
    pid = int(info["pid"])
    warm = run_level(f"{url}/predict", server.bodies, concurrency, 1_000_000, 3.0, timeout_s=30.0)
    start = rss_mb(pid)
    samples: list[tuple[float, float | None]] = []
    stop = threading.Event()

    def sample(t0: float) -> None:
        for _ in range(1000):
            if stop.wait(5.0):
                return
            samples.append((round(time.time() - t0, 1), rss_mb(pid)))

    t0 = time.time()
    sampler = threading.Thread(target=sample, args=(t0,), daemon=True, name="rss-sampler")
    sampler.start()
    try:
        level = run_level(f"{url}/predict", server.bodies, concurrency, 10_000_000, seconds, timeout_s=30.0)
    finally:
        stop.set()
        sampler.join(timeout=10)
    end = rss_mb(pid)
    after = local_info(url)
    rec["requests_sent"], rec["requests_failed"] = level.sent, level.sent - level.ok
    rec["p99_ms"] = level.latency_ms.get("p99")
    rec["replica_rss_start_mb"], rec["replica_rss_end_mb"] = start, end
    growth = (end / start - 1.0) if start and end else None
    rec["details"].update(
        concurrency=concurrency,
        seconds=seconds,
        replica_pid=pid,
        warmup={"sent": warm.sent, "ok": warm.ok},
        rss_growth_ratio=round(growth, 4) if growth is not None else None,
        rss_samples_mb=samples,
        load={k: v for k, v in level.to_json().items() if k != "extra"},
        same_replica_throughout=after.get("pid") == pid,
    )
    rec["checks"] = {
        "0 failed requests": level.sent > 0 and level.sent == level.ok,
        "replica RSS growth < 10%": growth is not None and growth < 0.10,
        "same replica throughout": after.get("pid") == pid,
    }
