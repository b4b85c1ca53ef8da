"""The project's load generator against locust (library mode) on one endpoint and one concurrency level.

Serves a run's soup once on a local Ray (as ``soup-ray bench`` does), then
loads ``POST /predict`` with the same PNG bodies and the same number of
concurrent closed-loop clients (no think time), alternating the two
generators ``--rounds`` times:

- ``soup_ray.bench.loadgen.run_level``: threads sharing one ``httpx.Client``;
- locust's ``FastHttpUser`` in library mode (``Environment`` + local runner),
  run in a child process, since locust monkey-patches the standard library with
  gevent and must not share a process with Ray.

Both report successful requests per second and latency percentiles; the
client's own CPU time is recorded for each, since generator and server share
the machine. Written to ``bench/results/loadgen_vs_locust.json``.

    python bench/loadgen_vs_locust.py RUN_DIR [--concurrency 4] [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "loadgen_vs_locust.json"

LOCUST_CHILD = r"""
import json, sys, time, resource
from pathlib import Path
import gevent
from locust import FastHttpUser, constant, task
from locust.env import Environment

url, folder, users, seconds, max_requests = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
bodies = [p.read_bytes() for p in sorted(folder.glob("*.png"))]
counter = {"i": 0}

class Predict(FastHttpUser):
    host = url
    wait_time = constant(0)
    network_timeout = 30.0
    connection_timeout = 30.0

    @task
    def predict(self):
        body = bodies[counter["i"] % len(bodies)]
        counter["i"] += 1
        self.client.post("/predict", data=body, headers={"content-type": "image/png"})

env = Environment(user_classes=[Predict])
runner = env.create_local_runner()
cpu0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
runner.start(users, spawn_rate=users * 100)
deadline = t0 + seconds
while time.perf_counter() < deadline and env.stats.total.num_requests < max_requests:
    gevent.sleep(0.05)
runner.quit()
elapsed = time.perf_counter() - t0
cpu1 = resource.getrusage(resource.RUSAGE_SELF)
total = env.stats.total
ok = total.num_requests - total.num_failures
print(json.dumps({
    "sent": total.num_requests, "ok": ok, "failures": total.num_failures,
    "errors": {str(k): v.occurrences for k, v in env.stats.errors.items()},
    "duration_s": round(elapsed, 4),
    "throughput_rps": round(ok / elapsed, 3),
    "locust_total_rps": round(total.total_rps, 3),
    "latency_ms": {"p50": total.get_response_time_percentile(0.5), "p90": total.get_response_time_percentile(0.9),
                   "p99": total.get_response_time_percentile(0.99), "mean": round(total.avg_response_time, 2),
                   "max": total.max_response_time},
    "client_cpu_s": round((cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime), 3),
}))
"""


def run_locust(url: str, folder: Path, users: int, seconds: float, max_requests: int) -> dict:
    """One locust level in a child process; its JSON line."""
    done = subprocess.run(
        [sys.executable, "-c", LOCUST_CHILD, url, str(folder), str(users), str(seconds), str(max_requests)],
        capture_output=True,
        text=True,
        timeout=seconds + 90,
    )
    if done.returncode != 0:
        raise RuntimeError(f"locust child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_ready(url: str, body: bytes, timeout_s: float = 300.0) -> float:
    """Seconds until ``/predict`` answers 200 (bounded by ``timeout_s``)."""
    import httpx

    t0 = time.perf_counter()
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        while time.perf_counter() - t0 < timeout_s:
            try:
                if (
                    client.post(f"{url}/predict", content=body, headers={"content-type": "image/png"}).status_code
                    == 200
                ):
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"{url}/predict did not answer 200 within {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run folder with a published soup")
    ap.add_argument("--concurrency", type=int, default=4, help="concurrent closed-loop clients (default 4)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each measured level (default 10)")
    ap.add_argument("--requests", type=int, default=2000, help="request cap of each level (default 2000)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two generators (default 2)")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    import psutil

    from soup_ray.bench.loadgen import run_level, sample_pngs
    from soup_ray.bench.serving_bench import BenchSettings, start_ray
    from soup_ray.serving import serve_run, stop_serve_and_ray

    pngs = sample_pngs(args.run_dir, 64)
    settings = BenchSettings()
    t_start = time.perf_counter()
    started = start_ray(settings, print)
    rows: list[dict] = []
    try:
        url = serve_run(
            args.run_dir,
            "127.0.0.1",
            args.port,
            blocking=False,
            log=lambda m: None,
            ensemble=0,
            follow=False,
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=settings.batch_wait_timeout_s,
            ingress_cpus=settings.ingress_cpus,
        )
        ready = wait_ready(url, pngs[0])
        print(f"serving {url}/predict (ready after {ready:.1f}s)")
        run_level(f"{url}/predict", pngs, args.concurrency, 64, 10.0)  # warm-up, not recorded
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for i, b in enumerate(pngs):
                (folder / f"{i:03d}.png").write_bytes(b)
            for r in range(args.rounds):
                ours = run_level(f"{url}/predict", pngs, args.concurrency, args.requests, args.seconds).to_json()
                rows.append({"round": r, "generator": "soup_ray.bench.loadgen", **ours})
                print(
                    f"round {r} loadgen: {ours['throughput_rps']:.1f} req/s, p50 {ours['latency_ms'].get('p50')} ms, "
                    f"client CPU {ours['client_cpu_s']:.1f}s"
                )
                theirs = run_locust(url, folder, args.concurrency, args.seconds, args.requests)
                rows.append({"round": r, "generator": "locust FastHttpUser", **theirs})
                print(
                    f"round {r} locust:  {theirs['throughput_rps']:.1f} req/s, p50 {theirs['latency_ms']['p50']} ms, "
                    f"client CPU {theirs['client_cpu_s']:.1f}s"
                )
    finally:
        if started:
            stop_serve_and_ray()

    from importlib.metadata import version  # not `import locust`: it monkey-patches ssl once loaded

    def mean(gen: str, key: str, sub: str | None = None) -> float | None:
        vals = [(r[key][sub] if sub else r[key]) for r in rows if r["generator"] == gen]
        vals = [v for v in vals if isinstance(v, (int, float))]
        return round(sum(vals) / len(vals), 3) if vals else None

    summary = {
        g: {
            "throughput_rps": mean(g, "throughput_rps"),
            "p50_ms": mean(g, "latency_ms", "p50"),
            "p99_ms": mean(g, "latency_ms", "p99"),
            "client_cpu_s": mean(g, "client_cpu_s"),
        }
        for g in ("soup_ray.bench.loadgen", "locust FastHttpUser")
    }
    a, b = summary["soup_ray.bench.loadgen"]["throughput_rps"], summary["locust FastHttpUser"]["throughput_rps"]
    out = {
        "title": "soup_ray.bench.loadgen vs locust on POST /predict (the soup), one concurrency level",
        "run_dir": Path(args.run_dir).name,
        "endpoint": "/predict (soup, follow off, one model replica)",
        "concurrency": args.concurrency,
        "seconds_per_level": args.seconds,
        "rounds": args.rounds,
        "request_bytes_mean": round(sum(map(len, pngs)) / len(pngs), 1),
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(), "locust": version("locust")},
        "levels": rows,
        "summary": summary,
        "throughput_ratio_loadgen_over_locust": round(a / b, 3) if a and b else None,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        "command": "python bench/loadgen_vs_locust.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
