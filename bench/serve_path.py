"""Where a served request's time and CPU go: the served soup against a bare one-hop peer, in each throughput mode.

For each of Ray Serve's throughput modes (``off``: Serve's defaults; ``replicas``: gRPC between
throughput-optimized replicas behind the Python proxy, soup-ray's default; ``full``: HAProxy in front as well)
this runs ``soup-ray bench RUN_DIR --only soup,one_hop`` in a fresh process (the mode is fixed when Ray
starts) and collects, per mode: the peak throughput of the served soup and of the one-hop peer (a bare
FastAPI deployment that decodes and runs the same model in one replica) measured in the same run, their
ratio, the CPU milliseconds per request of every Serve process, and the server's own Server-Timing
breakdown (body read, decode, hops, batch wait, forward). Writes ``bench/results/serve_path.json`` and
``serve_path.png``.

    python bench/serve_path.py RUN_DIR                    # a finished local run, e.g. runs/local-...
    python bench/serve_path.py RUN_DIR --modes off,replicas
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from soup_ray.bench.host import machine_info

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "serve_path.json"


TARGETS = ("soup", "soup_split", "one_hop")


def _peak(target: dict[str, Any]) -> dict[str, Any] | None:
    levels = [lv for lv in target.get("levels") or [] if lv.get("ok")]
    return max(levels, key=lambda lv: lv["throughput_rps"], default=None)


def summarise(figures: dict[str, Any]) -> dict[str, Any]:
    """Per target of one run: peak rps, CPU ms per request and Server-Timing at the peak, and at c=1; the ratios
    of the soup (fused and split) to the one-hop peer measured in that run."""
    out: dict[str, Any] = {}
    for name in TARGETS:
        target = (figures.get("targets") or {}).get(name) or {}
        best = _peak(target)
        if best is None:
            out[name] = {"error": target.get("error") or "no level measured"}
            continue
        extra = best.get("extra") or {}
        out[name] = {
            "peak_rps": best["throughput_rps"],
            "at_concurrency": best["concurrency"],
            "latency_ms": best["latency_ms"],
            "cpu_ms_per_request": extra.get("cpu_ms_per_request"),
            "server_timing_ms": extra.get("server_timing_ms"),
            "other_processes_cores": extra.get("other_processes_cores"),
            "levels": {lv["concurrency"]: lv["throughput_rps"] for lv in target.get("levels") or []},
        }
        c1 = next((lv for lv in target.get("levels") or [] if lv["concurrency"] == 1), None)
        if c1 is not None:
            out[name]["at_c1"] = {
                "latency_ms": c1["latency_ms"],
                "server_timing_ms": (c1.get("extra") or {}).get("server_timing_ms"),
                "cpu_ms_per_request": (c1.get("extra") or {}).get("cpu_ms_per_request"),
            }
    peer = out.get("one_hop", {}).get("peak_rps")
    for name in ("soup", "soup_split"):
        mine = out.get(name, {}).get("peak_rps")
        out[f"{name}_over_one_hop"] = round(mine / peer, 3) if mine and peer else None
    return out


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds of each target's peak rps and CPU ms per request, and of the same-run ratios."""
    import statistics

    out: dict[str, Any] = {}
    for name in TARGETS:
        peaks = [r[name]["peak_rps"] for r in rounds if r.get(name, {}).get("peak_rps")]
        cpus = [r[name]["cpu_ms_per_request"] for r in rounds if r.get(name, {}).get("cpu_ms_per_request")]
        if peaks:
            roles = sorted({k for c in cpus for k in c})
            out[name] = {
                "peak_rps": round(statistics.median(peaks), 1),
                "peak_rps_range": [min(peaks), max(peaks)],
                "cpu_ms_per_request": {k: round(statistics.median([c.get(k, 0.0) for c in cpus]), 3) for k in roles},
            }
    for key in ("soup_over_one_hop", "soup_split_over_one_hop"):
        ratios = [r[key] for r in rounds if r.get(key)]
        if ratios:
            out[key] = round(statistics.median(ratios), 3)
            out[key + "_range"] = [min(ratios), max(ratios)]
    return out


def plot(results: dict[str, Any], path: Path) -> Path:
    """Left: peak req/s of soup and one-hop per mode. Right: CPU ms per request of the soup by Serve process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = {m: r["median"] for m, r in results["modes"].items() if "soup" in (r.get("median") or {})}
    modes = list(medians)
    shown = [t for t in TARGETS if any((medians[m].get(t) or {}).get("peak_rps") for m in modes)]  # measured ones
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    width = 0.8 / max(1, len(shown))
    names = {"soup": "served soup (fused)", "soup_split": "served soup (split)", "one_hop": "bare one-hop peer"}
    bar_colors = {"soup": "tab:green", "soup_split": "tab:olive", "one_hop": "tab:purple"}
    for k, name in enumerate(shown):
        color = bar_colors[name]
        ys = [(medians[m].get(name) or {}).get("peak_rps") or 0 for m in modes]
        xs = [i + (k - (len(shown) - 1) / 2) * width for i in range(len(modes))]
        ax.bar(xs, ys, width, color=color, label=names[name])
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.0f}", (x, y), ha="center", va="bottom", fontsize=8)
    for i, m in enumerate(modes):
        r = medians[m].get("soup_over_one_hop")
        if r:
            ax.annotate(
                f"fused/peer {r:.2f}x", (i, 0), xytext=(0, -28), textcoords="offset points", ha="center", fontsize=8
            )
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("peak throughput (req/s)")
    ax.set_title(f"served soup vs one-hop peer (median of {results['rounds']} rounds)")
    ax.legend(fontsize=8)
    roles = ["proxy", "ingress", "model", "one_hop", "controller", "ray", "client"]
    colors = dict(
        zip(roles, ["tab:red", "tab:blue", "tab:green", "tab:purple", "0.6", "0.8", "tab:orange"], strict=True)
    )
    labels = []
    for i, m in enumerate(modes):
        for j, name in enumerate(shown):
            cpu = (medians[m].get(name) or {}).get("cpu_ms_per_request") or {}
            bottom, x = 0.0, len(labels)
            for role in roles:
                v = cpu.get(role) or 0.0
                if v:
                    ax2.bar(
                        x,
                        v,
                        0.7,
                        bottom=bottom,
                        color=colors[role],
                        label=role if (i, j) == (0, 0) or role == "one_hop" and i == 0 else None,
                    )
                    bottom += v
            labels.append(f"{m}\n{ {'soup': 'fused', 'soup_split': 'split', 'one_hop': 'peer'}[name] }")
    ax2.set_xticks(range(len(labels)), labels, fontsize=8)
    ax2.set_ylabel("CPU ms per request (at the peak)")
    ax2.set_title("where the CPU goes, by Serve process")
    handles, names = ax2.get_legend_handles_labels()
    seen = dict(zip(names, handles, strict=True))
    ax2.legend(seen.values(), seen.keys(), fontsize=7)
    for a in (ax, ax2):
        a.grid(alpha=0.3, axis="y")
    m = results["machine"]
    fig.suptitle(f"soup-ray request path: {Path(results['run_dir']).name}, {m.get('cpu_count')} CPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a finished run folder (soup/ and results.jsonl)")
    ap.add_argument("--modes", default="off,replicas,full", help="throughput modes, in order (default: all three)")
    ap.add_argument("--concurrency", default="1,8,32", help="concurrency levels (default: 1,8,32)")
    ap.add_argument("--requests", type=int, default=800, help="most requests per level (default: 800)")
    ap.add_argument("--seconds", type=float, default=12.0, help="longest time per level (default: 12)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over every mode, alternated (default: 2)")
    ap.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"targets measured in each run (default: {','.join(TARGETS)}); every other round measures them in "
        "the reverse order, so a drift of the machine's speed during a run favours none of them",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output JSON (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or "one_hop" not in targets:
        ap.error(f"--targets: choose among {', '.join(TARGETS)}, one_hop included (the peer); got {args.targets!r}")
    started = time.perf_counter()
    results: dict[str, Any] = {
        "run_dir": str(args.run_dir),
        "machine": machine_info(),
        "modes": {},
        "command": "python bench/serve_path.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "targets": targets,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="soup-ray-serve-path-") as tmp:
        for k in range(args.rounds):
            order = targets if k % 2 == 0 else targets[::-1]  # A B, then B A: a linear drift cancels out
            for mode in modes:
                out = Path(tmp) / f"{mode}-{k}.json"
                cmd = [
                    sys.executable,
                    "-m",
                    "soup_ray.cli",
                    "bench",
                    str(args.run_dir),
                    "--only",
                    ",".join(order),
                    "--no-ceiling",
                    "--throughput-mode",
                    mode,
                    "--concurrency",
                    args.concurrency,
                    "--requests",
                    str(args.requests),
                    "--seconds",
                    str(args.seconds),
                    "--out",
                    str(out),
                ]
                print(f"[serve_path] round {k + 1}, mode {mode}: {' '.join(cmd[2:])}", flush=True)
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                entry = results["modes"].setdefault(mode, {"rounds": []})
                if proc.returncode != 0 or not out.is_file():
                    entry["rounds"].append({"error": f"exit {proc.returncode}: {proc.stderr[-800:]}"})
                    continue
                s = summarise(json.loads(out.read_text()))
                entry["rounds"].append(s)
                print(
                    f"[serve_path]   fused {s['soup'].get('peak_rps')}, split {s['soup_split'].get('peak_rps')}, "
                    f"one-hop {s['one_hop'].get('peak_rps')} req/s: fused/peer {s['soup_over_one_hop']}x, "
                    f"split/peer {s['soup_split_over_one_hop']}x",
                    flush=True,
                )
    for entry in results["modes"].values():
        entry["median"] = median_of([r for r in entry["rounds"] if "error" not in r])
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    png = plot(results, args.out.with_suffix(".png"))
    print(f"[serve_path] wrote {args.out} and {png}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
