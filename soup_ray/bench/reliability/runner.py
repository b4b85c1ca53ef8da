"""The runner: the scenario registry, the arguments, the summary table and ``main``.

A scenario is a function ``(b, rec)`` (or ``(b, server, rec)`` when it serves)
that fills its record ``rec``; ``SCENARIOS`` maps its number to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import STANDIN_STEPS, Bench, tiny_config
from .driver_kill import scenario_driver_kill
from .node_loss import scenario_node_loss
from .serve_faults import Server, scenario_replica_kill, scenario_soak
from .soup_actor import scenario_soup_actor
from .trial_kill import scenario_trial_kill


@dataclass(frozen=True)
class Scenario:
    """One fault scenario: its name (in the JSON and the summary) and the function that runs it.

    ``bench_ray``: it runs on the benchmark's own embedded Ray (started once, kept
    for the next such scenario); the others find that Ray shut down (they start
    their own: in subprocesses, or a fresh one for Serve). ``serves``: it takes
    the ``Server`` (the run scenario 1 produced, or ``--serve-run``).
    """

    name: str
    run: Callable[..., None]
    bench_ray: bool = False
    serves: bool = False


SCENARIOS: dict[int, Scenario] = {
    1: Scenario("soup actor killed during a sweep", scenario_soup_actor, bench_ray=True),
    2: Scenario("trial killed mid-way and resumed", scenario_trial_kill, bench_ray=True),
    3: Scenario("driver killed mid-sweep, then --resume", scenario_driver_kill),
    4: Scenario("Serve model replica killed under load", scenario_replica_kill, serves=True),
    5: Scenario("soak at concurrency 32", scenario_soak, serves=True),
    6: Scenario("worker node lost during a sweep, then under serving load", scenario_node_loss),
}
SCENARIO_NAMES = {n: s.name for n, s in SCENARIOS.items()}
FIELDS = (
    "faults_injected",
    "faults_survived",
    "offers_sent",
    "offers_accounted_for",
    "requests_sent",
    "requests_failed",
    "p99_ms",
    "replica_rss_start_mb",
    "replica_rss_end_mb",
    "recovery_s",
)


def blank(n: int) -> dict[str, Any]:
    """A scenario's record with every summary field present (None where it does not apply)."""
    out: dict[str, Any] = {"scenario": n, "name": SCENARIO_NAMES[n], "ok": None, "seconds": None}
    out.update({k: None for k in FIELDS})
    out.update(faults_injected=0, faults_survived=0, injected=[], checks={}, details={}, error=None)
    return out


def parse_only(text: str | None) -> list[int]:
    if not text:
        return sorted(SCENARIO_NAMES)
    try:
        picked = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--only takes scenario numbers like 1,4 (got {text!r})") from None
    bad = [n for n in picked if n not in SCENARIO_NAMES]
    if bad or not picked:
        raise argparse.ArgumentTypeError(
            f"--only: scenarios are {min(SCENARIO_NAMES)}-{max(SCENARIO_NAMES)} (got {text!r})"
        )
    return picked


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    lines = "\n".join(f"  {n}. {name}" for n, name in SCENARIO_NAMES.items())
    ap = argparse.ArgumentParser(
        prog="bench/reliability.py",
        description="Fault scenarios on the embedded local Ray with the tiny offline stand-in CLIP "
        f"({STANDIN_STEPS} stand-in steps); writes bench/results/reliability-<date>.json.\n\n"
        f"Scenarios:\n{lines}\n\nScenarios 4 and 5 serve the run scenario 1 produced (or --serve-run); "
        "scenario 6 runs a head and two worker nodes of its own (Ray's cluster_utils).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smaller and shorter: 4 trials in scenario 1, 3 in scenario 3, 15 s of load in 4, a 10 s soak",
    )
    ap.add_argument(
        "--only",
        type=parse_only,
        default=parse_only(None),
        metavar="N,M",
        help="run only these scenarios (e.g. --only 1,4)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default bench/results/reliability-<YYYY-MM-DD>.json, -quick with --quick)",
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="stand-in cache (SOUP_RAY_CACHE) to reuse; default: a private folder under the work folder "
        "(the tiny stand-in is built once, about a minute or more)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="where the run folders go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (run folders, logs) afterwards")
    ap.add_argument(
        "--serve-run", default=None, help="a finished run folder for scenarios 4 and 5 (default: scenario 1's run)"
    )
    ap.add_argument("--verbose", action="store_true", help="show the sweeps' own progress lines")
    return ap.parse_args(argv)


def summary_table(scenarios: Sequence[dict[str, Any]]) -> str:
    cols = [
        ("#", "scenario"),
        ("ok", "ok"),
        ("faults", "faults"),
        ("offers", "offers"),
        ("requests", "requests"),
        ("p99 ms", "p99_ms"),
        ("rss MB", "rss"),
        ("recovery s", "recovery_s"),
        ("s", "seconds"),
    ]

    def cell(r: dict[str, Any], key: str) -> str:
        if key == "ok":
            return "error" if r.get("error") else ("yes" if r.get("ok") else "NO")
        if key == "faults":
            return f"{r['faults_survived']}/{r['faults_injected']} survived"
        if key == "offers":
            return "-" if r["offers_sent"] is None else f"{r['offers_accounted_for']}/{r['offers_sent']}"
        if key == "requests":
            return "-" if r["requests_sent"] is None else f"{r['requests_failed']} failed of {r['requests_sent']}"
        if key == "rss":
            s, e = r["replica_rss_start_mb"], r["replica_rss_end_mb"]
            return "-" if s is None else f"{s:.0f} -> {e:.0f}" if e is not None else f"{s:.0f} -> ?"
        v = r.get(key)
        return "-" if v is None else (f"{v:g}" if isinstance(v, (int, float)) else str(v))

    rows = [[h for h, _ in cols]] + [
        [f"{r['scenario']} {r['name']}" if k == "scenario" else cell(r, k) for _, k in cols] for r in scenarios
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    out = []
    for j, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    failed = [(r["scenario"], name) for r in scenarios for name, good in r["checks"].items() if not good]
    for n, name in failed:
        out.append(f"  scenario {n}: check failed: {name}")
    for r in scenarios:
        if r.get("error"):
            out.append(f"  scenario {r['scenario']}: {r['error']}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected scenarios, write the JSON, print the summary; 0 if every check held, 1 otherwise."""
    args = parse_args(argv)
    t_all = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_all:6.1f}s] {msg}", flush=True)

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.pop("RAY_ADDRESS", None)  # the embedded local Ray, never a cluster named in the environment
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soup-ray-reliability-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).resolve() if args.cache else work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    cache_had_standin = any(cache.glob("standin-*"))
    os.environ["SOUP_RAY_CACHE"] = str(cache)
    today = datetime.date.today().isoformat()
    out_path = args.out or Path("bench/results") / f"reliability-{today}{'-quick' if args.quick else ''}.json"
    b = Bench(args, work, log)
    from ..host import machine_info

    report: dict[str, Any] = {
        "benchmark": "reliability under faults (embedded local Ray, tiny offline stand-in)",
        "date": today,
        "command": "python bench/reliability.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
        "machine": machine_info(),
        "settings": {
            "quick": b.quick,
            "scenarios": args.only,
            "model": "soupray-digits-tiny (offline stand-in)",
            "standin_steps": STANDIN_STEPS,
            "standin_cache_reused": cache_had_standin,
            "data": "digits (sklearn), shifts rotate and noise",
            "trial_cpu": 0.875,
            "serve_ensemble": 0,
            "ray": "embedded local (address='local'), no dashboard",
            "bind": "127.0.0.1",
        },
        "scenarios": [],
    }
    log(f"reliability benchmark: scenarios {args.only}{' (quick)' if b.quick else ''}; work folder {work}")
    server = Server(b)
    own_ray = False
    try:
        for n in args.only:
            rec = blank(n)
            log(f"scenario {n}: {SCENARIO_NAMES[n]}")
            t0 = time.time()
            scenario = SCENARIOS[n]
            try:
                if scenario.bench_ray and not own_ray:
                    from ...cluster.session import ray_session
                    from ...config import parse_config

                    own_ray = ray_session(
                        "local", namespace=parse_config(tiny_config()).ray.namespace, log=b.quiet, verbose=False
                    )
                elif not scenario.bench_ray and own_ray:
                    # scenario 3 runs its own Ray in subprocesses, 4 and 5 a fresh one for Serve
                    import ray

                    ray.shutdown()
                    own_ray = False
                if not scenario.serves:
                    # the Serve (and its Ray) of scenarios 4 and 5 goes before a scenario that starts its own Ray:
                    # scenario 6 would otherwise find this process still joined to it, not to its own cluster
                    server.stop()
                scenario.run(*((b, server, rec) if scenario.serves else (b, rec)))
            except Exception as err:  # noqa: BLE001 - a benchmark records a failed scenario and goes on
                import traceback

                rec["error"] = f"{type(err).__name__}: {err}"
                rec["details"]["traceback"] = traceback.format_exc(limit=8)
            rec["seconds"] = round(time.time() - t0, 1)
            rec["ok"] = rec["error"] is None and bool(rec["checks"]) and all(rec["checks"].values())
            report["scenarios"].append(rec)
            log(
                f"scenario {n} {'ok' if rec['ok'] else 'NOT ok'} in {rec['seconds']:.0f}s: "
                + ", ".join(f"{k}={rec[k]}" for k in FIELDS if rec[k] is not None)
                + (f"; error: {rec['error']}" if rec["error"] else "")
            )
    finally:
        server.stop()
        if own_ray:
            import ray

            ray.shutdown()
        report["seconds"] = round(time.time() - t_all, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(summary_table(report["scenarios"]))
    print(f"\nwritten {out_path} in {report['seconds']:.0f}s" + (f"; work folder kept: {work}" if args.keep else ""))
    return 0 if all(r["ok"] for r in report["scenarios"]) else 1
