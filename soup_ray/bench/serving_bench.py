"""The serving benchmark: the soup against one model and ensembles, over HTTP through Ray Serve.

The benchmark (``run_bench``, ``soup-ray bench``) deploys one Serve
application at a time on the same Ray, so the CPUs are never split between
applications:

- ``soup``: ``POST /predict`` served by the greedy soup;
- ``single``: ``POST /predict`` served by the best trial (held-out accuracy);
- ``ensemble_k``: ``POST /predict/ensemble`` over the top-K trials, K = the
  greedy soup's size (what the soup replaces at the same accuracy budget);
- ``ensemble_all``: ``POST /predict/ensemble`` over all candidates, at most
  ``ensemble_cap``, best first;

each at several concurrency levels, with the same CPU (and GPU) share per
model replica. It also measures the in-process ceiling: batched forward passes
of the same soup at the deployment's ``max_batch_size`` with the thread count
a replica really gets (probed in an actor with the replica's resources, and
checked against the replica's busy threads while it is loaded).
``write_bench`` writes ``bench.json`` (raw figures, ratios, machine,
settings) and ``bench.png``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cluster.session import ray_session
from ..run_dir import RunDir
from ..serving import (
    SOUP_MODEL,
    ensemble_members,
    load_image,
    load_model,
    resolve_run_dir,
    serve_run,
    sigterm_as_interrupt,
    stop_serve_and_ray,
    to_model_input,
)
from ..serving.launch import DEFAULT_THROUGHPUT_MODE, throughput_mode_env
from .host import (
    cpu_per_request,
    cpu_usage,
    machine_cpu_seconds,
    machine_info,
    process_cpu_seconds,
    thread_cpu_seconds,
    top_processes,
)
from .loadgen import run_level, sample_pngs

Log = Callable[[str], None]

TARGETS = ("soup", "soup_split", "one_hop", "single", "ensemble_k", "ensemble_all")
SOUP_OVER_ENSEMBLE_TARGET = 0.9
"""The served soup keeps at least this share of the K-fold saving over an ensemble of K (4.5 for K = 5)."""
APP_NAME = "bench"


# ---------------------------------------------------------------- the in-process ceiling


def forward_ceiling(
    classifier: Any,
    pngs: Sequence[bytes],
    image_size: int,
    batch_size: int,
    threads: int | None,
    max_seconds: float = 10.0,
    max_batches: int = 10_000,
    device: str = "cpu",
    warmup: int = 2,
) -> dict[str, Any]:
    """Images/s of batched forward passes (decoded test images, ``batch_size`` each) with ``threads`` torch threads.

    The images are decoded once, the way the server decodes them; each batch is
    moved to ``device``, run under ``inference_mode`` and its logits copied back
    to the CPU, as a replica does. Also reports the decoding rate (PNG to input,
    one thread) for comparison. Bounded by ``max_seconds`` and ``max_batches``.
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        t = time.perf_counter()
        decoded = [load_image(b, image_size) for b in pngs]
        decode_s = time.perf_counter() - t
        reps = math.ceil(batch_size / len(decoded))
        x = to_model_input((decoded * reps)[:batch_size])
        classifier = classifier.eval()

        def step() -> None:
            with torch.inference_mode():
                classifier(x.to(device)).float().cpu()

        for _ in range(max(0, warmup)):
            step()
        n, t0 = 0, time.perf_counter()
        while n < max_batches and (n == 0 or time.perf_counter() - t0 < max_seconds):
            step()
            n += 1
        secs = time.perf_counter() - t0
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    return {
        "images_per_s": round(n * batch_size / secs, 3),
        "batch_size": int(batch_size),
        "batches": n,
        "seconds": round(secs, 3),
        "ms_per_batch": round(1000 * secs / n, 3),
        "threads": used,
        "device": device,
        "decode_images_per_s": round(len(decoded) / max(decode_s, 1e-9), 1),
    }


# ---------------------------------------------------------------- settings


@dataclass
class BenchSettings:
    """Every knob of the serving benchmark (recorded in ``bench.json``)."""

    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    requests: int = 200
    seconds: float = 15.0
    ensemble_cap: int = 8
    host: str = "127.0.0.1"
    port: int = 8010
    only: list[str] = field(default_factory=lambda: list(TARGETS))
    ceiling: bool = True
    num_cpus: float | None = None  # per model replica; None: an equal share that fits the largest application
    num_gpus: float = 0.0
    ingress_cpus: float = 0.1
    ingress_replicas: int = 1
    model_replicas: int = 1  # replicas of the one model of the soup, single and one_hop targets
    throughput_mode: str = DEFAULT_THROUGHPUT_MODE  # Ray Serve's (off, replicas, full), for a Ray the bench starts
    topology: str = "fused"  # the served application's (fused, split); the soup_split target is always split
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    replica_threads: int | None = None  # OMP_NUM_THREADS for every Ray worker (only when the bench starts Ray)
    images: int = 64
    image_size: int | None = None
    warmup_requests: int = 32
    request_timeout_s: float = 30.0
    deploy_timeout_s: float = 300.0
    ceiling_seconds: float = 10.0
    time_budget_s: float | None = None  # the whole bench; later phases are shortened or skipped


# ---------------------------------------------------------------- the benchmark


def plan_targets(run_dir: Path | str, ensemble_cap: int, only: Sequence[str] = TARGETS) -> dict[str, dict[str, Any]]:
    """What each target deploys and where it is queried: model, ensemble members, route."""
    run_dir = Path(run_dir)
    paths = RunDir(run_dir)
    info = json.loads(paths.soup_info.read_text())
    k = len(info.get("ingredients") or [])
    has_trials = paths.results.is_file()
    ranked = ensemble_members(run_dir, 10**6) if has_trials else []
    unknown = [t for t in only if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown bench targets {unknown}; choose from {', '.join(TARGETS)}")
    plan: dict[str, dict[str, Any]] = {}
    for name in only:
        if name == "soup":
            plan[name] = {"model": SOUP_MODEL, "members": [], "route": "/predict"}
        elif name == "soup_split":  # the soup behind separate ingress replicas (topology split)
            plan[name] = {"model": SOUP_MODEL, "members": [], "route": "/predict", "topology": "split"}
        elif name == "one_hop":
            plan[name] = {"model": SOUP_MODEL, "members": [], "route": "/predict", "one_hop": True}
        elif not ranked:
            raise ValueError(f"target {name!r} needs completed trials in {run_dir}/results.jsonl")
        elif name == "single":
            plan[name] = {"model": ranked[0], "members": [], "route": "/predict"}
        elif name == "ensemble_k":
            plan[name] = {"model": SOUP_MODEL, "members": ranked[: max(1, k)], "route": "/predict/ensemble"}
        elif name == "ensemble_all":
            plan[name] = {"model": SOUP_MODEL, "members": ranked[: max(1, ensemble_cap)], "route": "/predict/ensemble"}
    return plan


def _replica_names(plan: dict[str, Any]) -> list[str]:
    if plan.get("one_hop"):
        return ["OneHop"]
    if not plan["members"] and plan.get("topology", "fused") == "fused":
        return ["Ingress"]
    return [f"Member{i}" for i in range(len(plan["members"]))] if plan["members"] else ["Model"]


def _replica_infos(names: Sequence[str], timeout_s: float = 10.0) -> dict[str, dict[str, Any]]:
    from ray import serve

    out = {}
    for name in names:
        try:
            handle = serve.get_deployment_handle(name, app_name=APP_NAME)
            method = handle.replica_info if name == "Ingress" else handle.info  # fused: the model in the ingress
            out[name] = method.remote().result(timeout_s=timeout_s)
        except Exception as err:  # noqa: BLE001 - statistics only; the load figures stand without them
            out[name] = {"error": f"{type(err).__name__}: {err}"}
    return out


def wait_ready(url: str, route: str, body: bytes, timeout_s: float, log: Log = lambda m: None) -> float:
    """Poll ``/healthz`` then the target route until they answer 200; returns the seconds waited."""
    import httpx

    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    last = "no answer yet"
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        for attempt in range(100_000):
            if time.perf_counter() >= deadline:
                break
            try:
                r = client.get(f"{url}/healthz")
                if r.status_code == 200:
                    r = client.post(f"{url}{route}", content=body, headers={"content-type": "image/png"})
                    if r.status_code == 200:
                        return time.perf_counter() - t0
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as err:
                last = f"{type(err).__name__}: {err}"
            if attempt % 20 == 19:
                log(f"  still waiting for {route} ({time.perf_counter() - t0:.0f}s): {last}")
            time.sleep(0.25)
    raise TimeoutError(f"{url}{route} did not answer 200 within {timeout_s:.0f}s (last: {last})")


def _replica_pids(infos: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Process ids of the replicas that run on this machine (a Serve replica's process title names it)."""
    out = {}
    for name, info in infos.items():
        pid = info.get("pid")
        try:
            with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
                title = f.read(200)
        except (OSError, TypeError, ValueError):
            continue
        if title.startswith(b"ray::ServeReplica"):
            out[name] = int(pid)
    return out


def _batch_stats(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], requests: int) -> dict[str, Any]:
    """Mean images per forward pass of each replica over a level (requests / batches run in it)."""
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        ba, bb = (a.get("batching") or {}), (b.get("batching") or {})
        n = (ba.get("batches") or 0) - (bb.get("batches") or 0)
        out[name] = {
            "batches": n,
            "mean_batch": round(requests / n, 2) if n > 0 else None,
            "largest_batch_so_far": ba.get("largest_batch"),
        }
    return out


def measure_target(
    name: str,
    plan: dict[str, Any],
    run_dir: Path,
    pngs: Sequence[bytes],
    settings: BenchSettings,
    share: float,
    log: Log,
    deadline: float | None = None,
    out: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Deploy one target as the ``bench`` application, load it at every concurrency level, delete it.

    The figures go into ``out`` (a new dict by default) level by level, so an
    interrupted caller keeps the levels already measured.
    """
    from ray import serve

    out = out if out is not None else {}
    out.update({"model": plan["model"], "members": list(plan["members"]), "route": plan["route"], "levels": []})
    t0 = time.perf_counter()
    ensemble: int | list[str] = list(plan["members"]) if plan["members"] else 0
    try:
        if plan.get("one_hop"):  # the bare peer gets the model replica's and the ingress's CPUs in one replica
            from .one_hop import deploy_one_hop

            url = deploy_one_hop(
                str(run_dir),
                share + settings.ingress_cpus * settings.ingress_replicas,
                settings.num_gpus,
                settings.max_batch_size,
                settings.batch_wait_timeout_s,
                APP_NAME,
                settings.host,
                settings.port,
                replicas=settings.model_replicas,
            )
        else:
            url = serve_run(
                run_dir,
                settings.host,
                settings.port,
                blocking=False,
                app_name=APP_NAME,
                route_prefix="/",
                log=lambda m: None,
                model=plan["model"],
                ensemble=ensemble,
                follow=False,
                num_cpus=share,
                num_gpus=settings.num_gpus,
                ingress_cpus=settings.ingress_cpus,
                ingress_replicas=settings.ingress_replicas,
                model_replicas=1 if plan["members"] else settings.model_replicas,
                topology=plan.get("topology", settings.topology),
                max_batch_size=settings.max_batch_size,
                batch_wait_timeout_s=settings.batch_wait_timeout_s,
            )
        out["deploy_s"] = round(time.perf_counter() - t0, 2)
        wait_s = settings.deploy_timeout_s
        if deadline is not None:
            wait_s = max(5.0, min(wait_s, deadline - time.perf_counter()))
        out["ready_s"] = round(wait_ready(url, plan["route"], pngs[0], wait_s, log), 2)
        log(f"  {name}: deployed in {out['deploy_s'] + out['ready_s']:.0f}s at {url}{plan['route']}")
        names = _replica_names(plan)
        target_url = f"{url}{plan['route']}"
        if settings.warmup_requests > 0:
            w = run_level(
                target_url,
                pngs,
                max(settings.concurrency),
                settings.warmup_requests,
                min(10.0, settings.seconds),
                timeout_s=settings.request_timeout_s,
            )
            out["warmup"] = {"sent": w.sent, "ok": w.ok, "errors": w.errors}
        for c in settings.concurrency:
            seconds = settings.seconds
            if deadline is not None:
                seconds = min(seconds, deadline - time.perf_counter() - settings.request_timeout_s)
                if seconds < 1.0:
                    log(f"  {name}: time budget spent; skipping concurrency {c} and above")
                    out["skipped_levels"] = [v for v in settings.concurrency if v >= c]
                    break
            infos = _replica_infos(names)
            pids = _replica_pids(infos)
            ticks = {n: thread_cpu_seconds(p) for n, p in pids.items()}
            machine0, procs0 = machine_cpu_seconds(), process_cpu_seconds()
            w0 = time.perf_counter()
            level = run_level(target_url, pngs, c, settings.requests, seconds, timeout_s=settings.request_timeout_s)
            wall = time.perf_counter() - w0
            machine1, procs1 = machine_cpu_seconds(), process_cpu_seconds()
            top = top_processes(procs0, procs1, wall)
            level.extra["cpu_ms_per_request"] = cpu_per_request(procs0, procs1, level.ok)
            level.extra["top_processes"] = top["processes"]
            level.extra["other_processes_cores"] = top["other_cores"]
            if top["other_cores"] > 0.25:
                log(f"  {name} c={c}: WARNING other processes used {top['other_cores']:.2f} cores meanwhile")
            after = _replica_infos(names)
            level.extra["replica_cpu"] = {n: cpu_usage(ticks[n], thread_cpu_seconds(p), wall) for n, p in pids.items()}
            level.extra["batching"] = _batch_stats(infos, after, level.ok)
            if machine1[1] > machine0[1]:
                level.extra["machine_busy_cores"] = round(
                    (machine1[0] - machine0[0]) / (machine1[1] - machine0[1]) * (os.cpu_count() or 1), 2
                )
            out["levels"].append(level.to_json())
            lat = level.latency_ms
            log(
                f"  {name} c={c}: {level.ok}/{level.sent} ok in {level.duration_s:.1f}s -> "
                f"{level.throughput_rps:.1f} req/s, p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms"
                + (f", errors {level.errors}" if level.errors else "")
            )
        infos = _replica_infos(names)
        out["replicas"] = {
            n: {k: i.get(k) for k in ("pid", "model", "batching", "error") if k in i} for n, i in infos.items()
        }
    finally:
        try:
            serve.delete(APP_NAME)  # blocks until its replicas are gone: the next target gets the CPUs back
        except Exception as err:  # noqa: BLE001 - Serve may not have started; the original error matters more
            log(f"  {name}: could not delete the {APP_NAME!r} application: {type(err).__name__}: {err}")
    out["total_s"] = round(time.perf_counter() - t0, 2)
    return out


def _replica_share(settings: BenchSettings, plan: dict[str, dict[str, Any]]) -> float:
    """CPUs per model replica: the override, or an equal share that fits the largest application on this Ray."""
    import ray

    if settings.num_cpus is not None:
        return float(settings.num_cpus)
    cpus = float(ray.available_resources().get("CPU", 0.0))
    # members + the Model deployment, or the model's replicas
    replicas = max(
        (len(p["members"]) + 1 if p["members"] else settings.model_replicas for p in plan.values()), default=1
    )
    has_ensemble = any(p["members"] for p in plan.values())
    free = cpus - settings.ingress_cpus * (settings.ingress_replicas + (1 if has_ensemble else 0))
    share = min(1.0, math.floor(100 * free / replicas) / 100)
    if share <= 0:
        raise ValueError(
            f"{cpus} free CPUs cannot hold {replicas} model replicas plus the ingress; "
            "lower --ensemble-cap or pass --num-cpus"
        )
    return share


def probe_replica_threads(num_cpus: float, num_gpus: float = 0.0) -> dict[str, Any]:
    """Torch threads and OMP_NUM_THREADS that an actor with a replica's resources gets (in a worker thread)."""
    import ray

    @ray.remote
    class ThreadProbe:
        async def probe(self) -> dict[str, Any]:
            import asyncio

            import torch

            def inner() -> tuple[int, str | None]:
                return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

            threads, omp = await asyncio.to_thread(inner)  # replicas run the forward in a worker thread too
            return {"torch_threads": threads, "omp_num_threads": omp, "pid": os.getpid()}

    actor = ThreadProbe.options(num_cpus=num_cpus, num_gpus=num_gpus).remote()
    try:
        return ray.get(actor.probe.remote(), timeout=120)
    finally:
        ray.kill(actor)


def start_ray(settings: BenchSettings, log: Log) -> bool:
    """Start an embedded local Ray for the bench unless one is initialised; returns whether it started one.

    ``settings.replica_threads`` becomes ``OMP_NUM_THREADS`` of every Ray
    worker, so it only applies to a Ray started here (the thread probe reports
    what replicas really get either way). ``RAY_ADDRESS`` joins a cluster.
    """
    env = {"OMP_NUM_THREADS": str(int(settings.replica_threads))} if settings.replica_threads else {}
    import ray

    if not ray.is_initialized():
        env.update(throughput_mode_env(settings.throughput_mode, log))
    return ray_session(None, log=log, env=env, num_cpus=os.cpu_count(), log_to_driver=False)


def run_bench(
    run_dir: Path | str, settings: BenchSettings | None = None, log: Log = print, figures: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Measure every target and the in-process ceiling; returns the figures (``compute_ratios`` adds ratios).

    ``figures``, when given, is filled in place as the bench goes, so a caller
    that is interrupted still holds what was measured.
    """
    import ray

    settings = settings or BenchSettings()
    started = time.perf_counter()
    deadline = started + settings.time_budget_s if settings.time_budget_s else None
    run_dir = resolve_run_dir(run_dir)
    paths = RunDir(run_dir)
    soup_info = json.loads(paths.soup_info.read_text())
    plan = plan_targets(run_dir, settings.ensemble_cap, settings.only)
    base = json.loads(paths.base_meta.read_text())
    pngs = sample_pngs(run_dir, settings.images, settings.image_size)
    log(
        f"bench of {run_dir}: soup of {len(soup_info.get('ingredients') or [])} ingredient(s); targets "
        + ", ".join(f"{n} ({len(p['members']) or 1} model(s))" for n, p in plan.items())
        + f"; {len(pngs)} test PNGs, concurrency {settings.concurrency}"
    )
    figures = figures if figures is not None else {}
    figures.update(
        {
            "run_dir": str(run_dir),
            "settings": asdict(settings),
            "machine": machine_info(),
            "soup": {
                "ingredients": list(soup_info.get("ingredients") or []),
                "version": soup_info.get("version"),
                "heldout_accuracy": soup_info.get("heldout_accuracy"),
                "image_size": int(base["image_size"]),
            },
            "request_bytes": {
                "mean": round(float(np.mean([len(b) for b in pngs])), 1),
                "image_size": settings.image_size or int(base["image_size"]),
            },
            "targets": {},
        }
    )
    own_ray = start_ray(settings, log)
    try:
        share = _replica_share(settings, plan)
        probe = probe_replica_threads(share, settings.num_gpus)
        if settings.replica_threads and int(probe["torch_threads"]) != int(settings.replica_threads):
            log(
                f"WARNING: {settings.replica_threads} thread(s) per replica were asked for, but replicas get "
                f"{probe['torch_threads']}: the running Ray was not started with OMP_NUM_THREADS set"
            )
        figures["replica"] = {
            "num_cpus": share,
            "num_gpus": settings.num_gpus,
            "ingress_cpus": settings.ingress_cpus,
            "max_batch_size": settings.max_batch_size,
            "batch_wait_timeout_s": settings.batch_wait_timeout_s,
            "probe": probe,
            "ray_cpus": ray.cluster_resources().get("CPU"),
        }
        log(
            f"each model replica: {share} CPU(s), {settings.num_gpus} GPU(s); an actor with those resources runs "
            f"torch with {probe['torch_threads']} thread(s) (OMP_NUM_THREADS={probe['omp_num_threads']})"
        )
        if settings.ceiling:
            device = "cuda" if settings.num_gpus > 0 else "cpu"
            loaded = load_model(run_dir, "soup", device=device)
            seconds = settings.ceiling_seconds
            if deadline is not None:
                seconds = max(1.0, min(seconds, (deadline - time.perf_counter()) / 10))
            figures["ceiling"] = forward_ceiling(
                loaded.classifier,
                pngs,
                loaded.image_size,
                settings.max_batch_size,
                int(probe["torch_threads"]),
                max_seconds=seconds,
                device=device,
            )
            del loaded
            c = figures["ceiling"]
            log(
                f"in-process ceiling: {c['images_per_s']:.1f} images/s (batch {c['batch_size']}, {c['threads']} "
                f"thread(s), {c['ms_per_batch']:.1f} ms/batch); decoding {c['decode_images_per_s']:.0f} images/s"
            )
        measured: dict[tuple, str] = {}
        for name, p in plan.items():
            key = (p["model"], tuple(p["members"]), p["route"], bool(p.get("one_hop")), p.get("topology"))
            if key in measured:  # e.g. ensemble_all == ensemble_k when there are only K candidates
                figures["targets"][name] = {**figures["targets"][measured[key]], "same_as": measured[key]}
                log(f"  {name}: same application as {measured[key]}; figures reused")
                continue
            if deadline is not None and deadline - time.perf_counter() < settings.request_timeout_s + 10:
                log(f"  {name}: skipped (time budget spent)")
                figures["targets"][name] = {"skipped": "time budget spent", **p, "levels": []}
                continue
            log(f"target {name}: {p['route']} with {len(p['members']) or 1} model replica(s)")
            figures["targets"][name] = {}
            try:
                measure_target(name, p, run_dir, pngs, settings, share, log, deadline, out=figures["targets"][name])
            except Exception as err:  # noqa: BLE001 - one failed target must not lose the others' figures
                log(f"  {name}: FAILED: {type(err).__name__}: {err}")
                entry = figures["targets"][name]
                entry.update({**p, **entry, "error": f"{type(err).__name__}: {err}"})
                entry.setdefault("levels", [])
                continue
            measured[key] = name
    finally:
        if own_ray:
            stop_serve_and_ray()
    figures["replica"]["observed"] = observed_threads(figures)
    figures["elapsed_s"] = round(time.perf_counter() - started, 1)
    figures["ratios"] = compute_ratios(figures)
    return figures


def observed_threads(figures: dict[str, Any]) -> dict[str, Any] | None:
    """What the soup replica really used at its busiest level: cores, busy threads, and whether the ceiling matched.

    The forward runs in one worker thread of the replica; with one torch
    thread that thread alone is busy (about one core when the model is the
    bottleneck), with more torch threads the OpenMP pool threads show up too.
    """
    levels = (figures.get("targets", {}).get("soup") or {}).get("levels") or []
    cpu = [
        next((c[n] for n in ("Model", "Ingress") if n in c), None)
        for c in ((lv.get("extra", {}).get("replica_cpu") or {}) for lv in levels)
    ]
    cpu = [c for c in cpu if c]
    if not cpu:
        return None
    busiest = max(cpu, key=lambda c: c["cores"])
    probe = (figures.get("replica") or {}).get("probe") or {}
    ceiling = figures.get("ceiling") or {}
    return {
        "soup_replica_cores": busiest["cores"],
        "soup_replica_busy_threads": busiest["busy_threads"],
        "soup_replica_busy_thread_cores": busiest["busy_thread_cores"],
        "probe_torch_threads": probe.get("torch_threads"),
        "ceiling_threads": ceiling.get("threads"),
        "ceiling_matches_probe": ceiling.get("threads") == probe.get("torch_threads") if ceiling else None,
    }


# ---------------------------------------------------------------- ratios, files, table


def _peak(target: dict[str, Any] | None) -> tuple[float | None, int | None]:
    levels = (target or {}).get("levels") or []
    best = max(levels, key=lambda lv: lv.get("throughput_rps") or 0.0, default=None)
    if best is None or not best.get("throughput_rps"):
        return None, None
    return float(best["throughput_rps"]), int(best["concurrency"])


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def compute_ratios(figures: dict[str, Any]) -> dict[str, Any]:
    """Soup throughput over each alternative (at the peak and per concurrency) and over the in-process ceiling."""
    targets = figures.get("targets") or {}
    peaks = {n: _peak(t) for n, t in targets.items()}
    soup = peaks.get("soup", (None, None))[0]
    k = len((figures.get("soup") or {}).get("ingredients") or []) or None
    members_k = len((targets.get("ensemble_k") or {}).get("members") or []) or k
    members_all = len((targets.get("ensemble_all") or {}).get("members") or []) or None
    ceiling = (figures.get("ceiling") or {}).get("images_per_s")
    target_k = round(SOUP_OVER_ENSEMBLE_TARGET * members_k, 4) if members_k else None
    soup_over_k = _div(soup, peaks.get("ensemble_k", (None,))[0])
    out: dict[str, Any] = {
        "basis": "peak throughput (successful requests/s) over the concurrency levels of each target",
        "peak_rps": {n: v for n, (v, _) in peaks.items()},
        "peak_at_concurrency": {n: c for n, (_, c) in peaks.items()},
        "soup_over_single": _div(soup, peaks.get("single", (None,))[0]),
        "soup_over_one_hop": _div(soup, peaks.get("one_hop", (None,))[0]),
        "ensemble_k": members_k,
        "soup_over_ensemble_k": soup_over_k,
        "target_soup_over_ensemble_k": target_k,
        "meets_target": None if soup_over_k is None or target_k is None else bool(soup_over_k >= target_k),
        "ensemble_all": members_all,
        "soup_over_ensemble_all": _div(soup, peaks.get("ensemble_all", (None,))[0]),
        "ceiling_images_per_s": ceiling,
        "served_soup_over_ceiling": _div(soup, ceiling),
    }
    by_c: dict[str, dict[str, float | None]] = {}
    rates = {
        n: {lv["concurrency"]: lv.get("throughput_rps") for lv in (t.get("levels") or [])} for n, t in targets.items()
    }
    for c, s in sorted((rates.get("soup") or {}).items()):
        by_c[str(c)] = {
            f"soup_over_{n}": _div(s, rates[n].get(c))
            for n in ("one_hop", "single", "ensemble_k", "ensemble_all")
            if n in rates
        }
        by_c[str(c)]["served_soup_over_ceiling"] = _div(s, ceiling)
    out["by_concurrency"] = by_c
    # per busy core: the same peaks divided by the cores the whole machine used at that level (replicas, Serve,
    # load generator), i.e. requests per CPU-second; it separates "cheaper" from "allowed to use more cores"
    per_core: dict[str, float | None] = {}
    for n, t in targets.items():
        c = peaks[n][1]
        lv = next((lv for lv in (t.get("levels") or []) if lv.get("concurrency") == c), None)
        busy = ((lv or {}).get("extra") or {}).get("machine_busy_cores")
        per_core[n] = round(peaks[n][0] / busy, 3) if peaks[n][0] and busy else None
    soup_pc = per_core.get("soup")
    out["per_busy_core"] = {
        "rps_per_core": per_core,
        **{
            f"soup_over_{n}": _div(soup_pc, per_core.get(n))
            for n in ("one_hop", "single", "ensemble_k", "ensemble_all")
        },
    }
    return out


COLORS = {
    "soup": "tab:green",
    "soup_split": "tab:olive",
    "one_hop": "tab:purple",
    "single": "tab:blue",
    "ensemble_k": "tab:orange",
    "ensemble_all": "tab:red",
}


def plot_bench(figures: dict[str, Any], path: Path | str) -> Path:
    """Two panels: throughput vs concurrency (with the in-process ceiling) and p50/p95/p99 latency vs concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(12, 4.8))
    targets = figures.get("targets") or {}
    ceiling = (figures.get("ceiling") or {}).get("images_per_s")
    aliases = {t["same_as"]: n for n, t in targets.items() if t.get("same_as")}
    top, xs_all = 0.0, set()
    for name, t in targets.items():
        levels = [lv for lv in (t.get("levels") or []) if lv.get("ok")]
        if not levels or t.get("same_as"):
            continue
        label = name + (f" = {aliases[name]}" if name in aliases else "")
        n = len(t.get("members") or [])
        label += f" ({n} model{'s' if n != 1 else ''})" if n else ""
        xs = [lv["concurrency"] for lv in levels]
        xs_all.update(xs)
        ys = [lv["throughput_rps"] for lv in levels]
        top = max(top, max(ys))
        color = COLORS.get(name)
        ax_t.plot(xs, ys, "o-", color=color, label=label)
        for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            ax_l.plot(xs, [lv["latency_ms"][q] for lv in levels], style, marker="o", color=color, label=f"{name} {q}")
    if ceiling:
        ax_t.axhline(ceiling, color="black", ls="--", lw=1, label=f"in-process soup ceiling ({ceiling:.1f}/s)")
        if top and ceiling / top > 4:
            ax_t.set_yscale("log")
    for ax in (ax_t, ax_l):
        ax.set_xscale("log", base=2)
        if xs_all:
            ax.set_xticks(sorted(xs_all))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax_l.set_yscale("log")
    ax_t.set_xlabel("concurrent clients")
    ax_t.set_ylabel("throughput (successful requests/s)")
    ax_t.set_title("throughput")
    ax_l.set_xlabel("concurrent clients")
    ax_l.set_ylabel("latency (ms)")
    ax_l.set_title("latency: p50 (solid), p95 (dashed), p99 (dotted)")
    for ax in (ax_t, ax_l):
        ax.grid(alpha=0.3, which="both")
    ax_t.legend(fontsize=8)
    ax_l.legend(fontsize=7, ncol=2)
    replica = figures.get("replica") or {}
    machine = figures.get("machine") or {}
    title = figures.get("title") or Path(figures.get("run_dir", "")).name
    fig.suptitle(
        f"soup-ray serving bench: {title}, "
        f"{machine.get('gpu') or str(machine.get('cpu_count')) + ' CPUs'}, "
        f"{replica.get('num_cpus')} CPU"
        + (f" + {replica['num_gpus']} GPU" if replica.get("num_gpus") else "")
        + f" per model replica, batch {replica.get('max_batch_size')}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_bench(figures: dict[str, Any], out: Path | str, plot: bool = True) -> dict[str, Path]:
    """Write ``figures`` (ratios recomputed) as JSON to ``out`` and the plot next to it (same name, ``.png``)."""
    out = Path(out)
    figures["ratios"] = compute_ratios(figures)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(figures, indent=2, default=str))
    tmp.replace(out)
    paths = {"json": out}
    if plot:
        paths["png"] = plot_bench(figures, out.with_suffix(".png"))
    return paths


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(figures: dict[str, Any]) -> str:
    """A short text table: one row per target and concurrency, then the ratios."""
    lines = [
        f"{'target':<14}{'models':>7}{'conc':>6}{'ok':>7}{'errors':>9}{'req/s':>10}"
        f"{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'other cpu':>11}"
    ]
    for name, t in (figures.get("targets") or {}).items():
        models = len(t.get("members") or []) or 1
        if not t.get("levels"):
            lines.append(f"{name:<14}{models:>7}  {t.get('error') or t.get('skipped') or 'no levels'}")
        for lv in t.get("levels") or []:
            lat = lv.get("latency_ms") or {}
            errs = sum((lv.get("errors") or {}).values())
            lines.append(
                f"{name:<14}{models:>7}{lv['concurrency']:>6}{lv['ok']:>7}{errs:>9}"
                f"{_fmt(lv['throughput_rps']):>10}{_fmt(lat.get('p50')):>10}{_fmt(lat.get('p95')):>10}"
                f"{_fmt(lat.get('p99')):>10}"
                f"{_fmt((lv.get('extra') or {}).get('other_processes_cores'), '.2f'):>11}"
            )
    r = figures.get("ratios") or compute_ratios(figures)
    c = figures.get("ceiling") or {}
    lines.append("(other cpu: cores used by processes outside this bench meanwhile; high values mean a noisy machine)")
    if c:
        lines.append(
            f"in-process ceiling: {_fmt(c.get('images_per_s'))} images/s "
            f"(batch {c.get('batch_size')}, {c.get('threads')} thread(s), {c.get('device')})"
        )
    verdict = {True: "met", False: "missed"}.get(r.get("meets_target"), "n/a")
    lines.append(
        f"soup/single {_fmt(r.get('soup_over_single'), '.2f')}   "
        f"soup/ensemble-of-{r.get('ensemble_k')} {_fmt(r.get('soup_over_ensemble_k'), '.2f')} "
        f"(target {_fmt(r.get('target_soup_over_ensemble_k'), '.2f')}: {verdict})   "
        f"soup/ensemble-of-{r.get('ensemble_all') or 'all'} {_fmt(r.get('soup_over_ensemble_all'), '.2f')}   "
        f"served soup/ceiling {_fmt(r.get('served_soup_over_ceiling'), '.3f')}"
    )
    pc = r.get("per_busy_core") or {}
    if any(v is not None for v in (pc.get("rps_per_core") or {}).values()):
        lines.append(
            f"per busy core: soup/single {_fmt(pc.get('soup_over_single'), '.2f')}   "
            f"soup/ensemble-of-{r.get('ensemble_k')} {_fmt(pc.get('soup_over_ensemble_k'), '.2f')}   "
            f"soup/ensemble-of-{r.get('ensemble_all') or 'all'} {_fmt(pc.get('soup_over_ensemble_all'), '.2f')}"
        )
    return "\n".join(lines)


def bench_main(
    run_dir: Path | str, settings: BenchSettings, out: Path | str | None = None, log: Log = print
) -> dict[str, Any]:
    """Run the bench, write ``bench.json`` + ``bench.png`` (default: in the run folder) and print the table."""
    run_dir = resolve_run_dir(run_dir)
    own_ray = start_ray(settings, log)
    sigterm_as_interrupt()  # after ray.init, which installs its own handler: SIGTERM now runs the finally below
    try:
        figures = run_bench(run_dir, settings, log)
    finally:
        if own_ray:
            stop_serve_and_ray()
    paths = write_bench(figures, Path(out) if out else run_dir / "bench.json")
    print(format_table(figures), flush=True)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return figures
