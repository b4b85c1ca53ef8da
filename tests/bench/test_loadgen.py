"""The bounded load generator, the bench's ratios and files, and one tiny end-to-end bench on a local Ray."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from soup_ray.bench.loadgen import latency_summary, parse_concurrency, run_level
from soup_ray.bench.serving_bench import TARGETS, BenchSettings, compute_ratios, format_table, plan_targets, write_bench
from soup_ray.bench.stats import percentile

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")


# ---------------------------------------------------------------- a tiny local HTTP server


class _Handler(BaseHTTPRequestHandler):
    """200 after ``delay`` seconds; 400 for bodies starting with b'bad'; bodies starting with b'slow' sleep longer."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stalls

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.inflight += 1  # type: ignore[attr-defined]
            self.server.peak = max(self.server.peak, self.server.inflight)  # type: ignore[attr-defined]
        time.sleep(self.server.slow_delay if body.startswith(b"slow") else self.server.delay)  # type: ignore[attr-defined]
        status = 400 if body.startswith(b"bad") else 200
        payload = json.dumps({"ok": status == 200}).encode()
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.hits += 1  # type: ignore[attr-defined]
            self.server.inflight -= 1  # type: ignore[attr-defined]
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout test)
            self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def tiny_server() -> Iterator[ThreadingHTTPServer]:
    """A threaded HTTP server on a free loopback port; ``server.delay``/``slow_delay`` set the answer times."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.delay, server.slow_delay, server.hits, server.lock = 0.01, 2.0, 0, threading.Lock()  # type: ignore[attr-defined]
    server.inflight, server.peak = 0, 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/predict"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- the load generator


def test_percentiles_are_linear_interpolation_and_empty_is_none() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([], 50) is None
    s = latency_summary([0.010, 0.020, 0.030])
    assert s["p50"] == pytest.approx(20.0) and s["min"] == pytest.approx(10.0) and s["max"] == pytest.approx(30.0)
    assert latency_summary([])["p99"] is None
    assert parse_concurrency("16,1,4,4") == [1, 4, 16]
    with pytest.raises(ValueError):
        parse_concurrency("0,2")


def test_level_counts_successes_errors_and_percentiles(tiny_server: ThreadingHTTPServer) -> None:
    tiny_server.delay = 0.02  # type: ignore[attr-defined]
    bodies = [b"bad request", b"png-1", b"png-2", b"png-3"]  # cycled: exactly one in four is refused
    lv = run_level(_url(tiny_server), bodies, concurrency=4, max_requests=40, max_seconds=20.0, timeout_s=5.0)
    assert lv.sent == 40 and lv.ok == 30 and lv.errors == {"400": 10} and lv.unfinished == 0
    assert lv.stopped_by == "count" and lv.server_errors == 0
    assert tiny_server.hits == 40  # type: ignore[attr-defined]
    lat = lv.latency_ms
    assert lat["min"] >= 20.0 and lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert lv.throughput_rps == pytest.approx(lv.ok / lv.duration_s, rel=1e-3)
    # the 4 clients really overlap (a server-side count, not a wall-clock figure that a loaded machine skews)
    assert 2 <= tiny_server.peak <= 4  # type: ignore[attr-defined]
    assert json.loads(json.dumps(lv.to_json()))["errors"] == {"400": 10}


def test_level_stops_at_its_time_limit(tiny_server: ThreadingHTTPServer) -> None:
    tiny_server.delay = 0.05  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    lv = run_level(_url(tiny_server), [b"png"], concurrency=2, max_requests=100_000, max_seconds=0.6, timeout_s=5.0)
    wall = time.perf_counter() - t0
    assert lv.stopped_by == "time" and lv.sent < 100_000
    assert wall < 0.6 + 0.05 + 3.0  # the last requests in flight finish, nothing new starts (margin: a busy machine)
    assert lv.sent <= 2 * (0.6 / 0.05 + 2) and lv.ok == lv.sent and lv.errors == {}


def test_timeouts_and_refused_connections_are_counted_and_bounded(tiny_server: ThreadingHTTPServer) -> None:
    t0 = time.perf_counter()
    lv = run_level(_url(tiny_server), [b"slow"], concurrency=2, max_requests=50, max_seconds=0.5, timeout_s=0.3)
    assert time.perf_counter() - t0 < 0.5 + 0.3 + 3.0
    assert lv.ok == 0 and set(lv.errors) == {"exc:ReadTimeout"} and sum(lv.errors.values()) == lv.sent >= 2
    assert lv.latency_ms["p50"] is None and lv.throughput_rps == 0.0

    closed = f"http://127.0.0.1:{free_port()}/predict"
    t0 = time.perf_counter()
    lv = run_level(closed, [b"png"], concurrency=2, max_requests=30, max_seconds=2.0, timeout_s=1.0)
    assert time.perf_counter() - t0 < 5.0
    assert lv.ok == 0 and lv.errors == {"exc:ConnectError": 30} and lv.stopped_by == "count"


def test_level_refuses_meaningless_bounds() -> None:
    with pytest.raises(ValueError):
        run_level("http://127.0.0.1:1/x", [], 1, 1, 1.0)
    with pytest.raises(ValueError):
        run_level("http://127.0.0.1:1/x", [b"x"], 1, 1, 0.0)


# ---------------------------------------------------------------- ratios, JSON and plot


def _level(c: int, rps: float, p50: float, busy: float = 2.0) -> dict[str, Any]:
    return {
        "concurrency": c,
        "max_requests": 100,
        "max_seconds": 5.0,
        "sent": 100,
        "ok": 100,
        "errors": {},
        "unfinished": 0,
        "stopped_by": "count",
        "duration_s": 100 / rps,
        "throughput_rps": rps,
        "latency_ms": {"p50": p50, "p95": 1.5 * p50, "p99": 2 * p50, "mean": p50, "min": p50 / 2, "max": 3 * p50},
        "client_cpu_s": 0.1,
        "extra": {"machine_busy_cores": busy, "other_processes_cores": 0.01},
    }


def synthetic_figures() -> dict[str, Any]:
    return {
        "run_dir": "runs/example",
        "settings": {"concurrency": [1, 4]},
        "machine": {"cpu_count": 2},
        "soup": {"ingredients": ["a", "b", "c"]},
        "replica": {"num_cpus": 0.2, "max_batch_size": 16},
        "ceiling": {"images_per_s": 1000.0, "batch_size": 16, "threads": 1, "device": "cpu"},
        "targets": {
            "soup": {"members": [], "levels": [_level(1, 30.0, 30.0), _level(4, 80.0, 50.0, busy=1.0)]},
            "single": {"members": [], "levels": [_level(1, 30.0, 30.0), _level(4, 100.0, 40.0)]},
            "ensemble_k": {"members": ["a", "b", "c"], "levels": [_level(1, 20.0, 45.0), _level(4, 25.0, 150.0)]},
            "ensemble_all": {"members": list("abcdefgh"), "levels": [_level(1, 10.0, 90.0), _level(4, 10.0, 400.0)]},
        },
    }


def test_ratios_json_and_plot_from_synthetic_figures(tmp_path: Path) -> None:
    from PIL import Image

    figures = synthetic_figures()
    r = compute_ratios(figures)
    assert r["soup_over_single"] == pytest.approx(0.8)
    assert r["soup_over_ensemble_k"] == pytest.approx(3.2) and r["ensemble_k"] == 3
    assert r["target_soup_over_ensemble_k"] == pytest.approx(2.7) and r["meets_target"] is True
    assert r["soup_over_ensemble_all"] == pytest.approx(8.0) and r["ensemble_all"] == 8
    assert r["served_soup_over_ceiling"] == pytest.approx(0.08)
    assert r["by_concurrency"]["1"]["soup_over_ensemble_k"] == pytest.approx(1.5)
    assert r["peak_at_concurrency"] == {"soup": 4, "single": 4, "ensemble_k": 4, "ensemble_all": 1}
    # per busy core: the soup used 1 core for 80/s, the K ensemble 2 cores for 25/s
    assert r["per_busy_core"]["rps_per_core"]["soup"] == pytest.approx(80.0)
    assert r["per_busy_core"]["soup_over_ensemble_k"] == pytest.approx(80.0 / 12.5)

    paths = write_bench(figures, tmp_path / "out" / "bench.json")
    data = json.loads(paths["json"].read_text())
    assert {"targets", "ratios", "ceiling", "machine", "settings", "soup", "replica"} <= set(data)
    for key in (
        "soup_over_single",
        "soup_over_ensemble_k",
        "target_soup_over_ensemble_k",
        "meets_target",
        "soup_over_ensemble_all",
        "served_soup_over_ceiling",
        "by_concurrency",
    ):
        assert key in data["ratios"]
    assert paths["png"] == tmp_path / "out" / "bench.png"
    with Image.open(paths["png"]) as img:
        img.verify()
    with Image.open(paths["png"]) as img:
        assert img.format == "PNG" and img.size[0] > 600 and img.size[1] > 300
    table = format_table(data)
    assert "ensemble_all" in table and "soup/ensemble-of-3 3.20 (target 2.70: met)" in table
    assert "per busy core: soup/single 1.60   soup/ensemble-of-3 6.40" in table

    missing = synthetic_figures()
    del missing["targets"]["single"], missing["ceiling"]
    r = compute_ratios(missing)
    assert r["soup_over_single"] is None and r["served_soup_over_ceiling"] is None
    write_bench(missing, tmp_path / "partial.json")  # a partial bench still writes both files
    assert (tmp_path / "partial.png").is_file()


# ---------------------------------------------------------------- one real, tiny bench


@pytest.mark.slow
def test_bench_end_to_end_on_a_tiny_run(run_copy: Path) -> None:
    import ray
    from ray import serve

    from soup_ray.bench.serving_bench import run_bench
    from soup_ray.cluster.keeper import SoupKeeper
    from soup_ray.ingredients import trial_records_from_results

    keeper = SoupKeeper(str(run_copy), tie=">")  # the strict rule keeps the soup (and the K ensemble) small
    for rec in trial_records_from_results(run_copy):
        keeper.offer(rec.to_json())
    keeper.process_inbox()
    k = len(keeper.status()["ingredients"])
    assert (run_copy / "soup" / "soup.json").is_file() and k >= 1

    assert not ray.is_initialized()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
        log_to_driver=False,
    )
    plan = plan_targets(run_copy, ensemble_cap=2)  # all four targets, planned without Ray
    assert list(plan) == list(TARGETS)
    assert plan["soup"]["members"] == [] and plan["single"]["model"] not in ("soup", None)
    assert len(plan["ensemble_k"]["members"]) == k and len(plan["ensemble_all"]["members"]) == 2
    assert plan["ensemble_k"]["route"] == plan["ensemble_all"]["route"] == "/predict/ensemble"
    with pytest.raises(ValueError, match="unknown bench targets"):
        plan_targets(run_copy, 2, only=["soup", "everything"])

    # one of the four targets deployed (each is a Serve deployment of its own, tens of seconds on two cores):
    # the soup; the ensembles are served in tests/serving, and the ratios over them are checked on synthetic
    # figures above
    settings = BenchSettings(
        concurrency=[2],
        requests=12,
        seconds=2.0,
        ensemble_cap=2,
        port=free_port(),
        images=8,
        warmup_requests=2,
        request_timeout_s=20.0,
        deploy_timeout_s=120.0,
        ceiling_seconds=0.5,
        only=["soup"],
    )
    try:
        figures = run_bench(run_copy, settings, log=lambda m: None)
    finally:
        serve.shutdown()
        ray.shutdown()

    paths = write_bench(figures, run_copy / "bench.json")
    data = json.loads(paths["json"].read_text())
    assert set(data["targets"]) == {"soup"}
    for name, t in data["targets"].items():
        assert [lv["concurrency"] for lv in t["levels"]] == [2], name
        for lv in t["levels"]:
            assert lv["ok"] > 0 and lv["sent"] <= 12, (name, lv)
            assert not any(key.isdigit() and int(key) >= 500 for key in lv["errors"]), (name, lv["errors"])
            assert lv["latency_ms"]["p50"] <= lv["latency_ms"]["p99"]
    r = data["ratios"]
    assert isinstance(r["served_soup_over_ceiling"], float) and r["served_soup_over_ceiling"] > 0
    assert r["target_soup_over_ensemble_k"] == pytest.approx(0.9 * k)  # K from the soup, known without measuring
    for key in ("soup_over_single", "soup_over_ensemble_k", "soup_over_ensemble_all"):
        assert r[key] is None, key  # not measured: no figure made up
    assert r["meets_target"] is None
    # fractional-CPU replicas: Ray gives them one torch thread, and the ceiling used the same
    assert data["replica"]["probe"]["torch_threads"] == 1 and data["ceiling"]["threads"] == 1
    assert data["ceiling"]["batch_size"] == data["replica"]["max_batch_size"] == 16
    soup_procs = [p for lv in data["targets"]["soup"]["levels"] for p in lv["extra"]["top_processes"]]
    assert any(p["ours"] and p["name"].startswith("ray::ServeReplica:bench:") for p in soup_procs), soup_procs
    observed = data["replica"]["observed"]
    assert observed["ceiling_matches_probe"] is True and observed["soup_replica_cores"] > 0
    assert paths["png"].is_file() and paths["png"].stat().st_size > 10_000
