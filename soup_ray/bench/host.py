"""What the host did while a benchmark ran: CPU seconds per process and per thread (psutil), and the machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import psutil

ProcessSample = dict[int, tuple[str, float, int]]
"""pid -> (name, user + system CPU seconds, parent pid)."""


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds of every thread of ``pid``; empty when it cannot be read."""
    try:
        return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    except (psutil.Error, OSError):
        return {}


def _display_name(proc: psutil.Process, cmdline: list[str] | None, name: str | None) -> str:
    """Ray's process title (``ray::<actor>``, without the method running now) when set, else the process name."""
    cmd = " ".join(cmdline or []).strip()
    if proc.pid == os.getpid():
        return "this process (load generator)"
    if cmd.startswith("ray::"):
        return cmd.split("  ")[0].strip().split(".")[0][:80]
    return (name or cmd or str(proc.pid))[:80]


def process_cpu_seconds() -> ProcessSample:
    """(name, CPU seconds, parent pid) of every process on the machine."""
    out: ProcessSample = {}
    for proc in psutil.process_iter(["name", "cmdline", "ppid", "cpu_times"]):
        info = proc.info
        times = info.get("cpu_times")
        if times is None:
            continue
        out[proc.pid] = (
            _display_name(proc, info.get("cmdline"), info.get("name")),
            times.user + times.system,
            int(info.get("ppid") or 0),
        )
    return out


def _descendants(sample: ProcessSample, root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (_, _, ppid) in sample.items():
        children.setdefault(ppid, []).append(pid)
    seen, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def top_processes(
    before: ProcessSample, after: ProcessSample, wall_s: float, min_cores: float = 0.03, limit: int = 12
) -> dict[str, Any]:
    """The processes that used the most CPU between two ``process_cpu_seconds`` samples, busiest first.

    ``ours`` marks this process and its descendants (the embedded Ray it
    started: raylet, Serve's proxy, controller and replicas); ``other_cores``
    is what every other process on the machine used meanwhile, a measure of
    how much the figures were disturbed by foreign load.
    """
    ours = _descendants(after, os.getpid())
    rows, other = [], 0.0
    for pid, (name, seconds, _) in after.items():
        prev = before.get(pid)
        cores = (seconds - (prev[1] if prev else 0.0)) / max(wall_s, 1e-9)
        if pid not in ours:
            other += cores
        if cores >= min_cores:
            rows.append({"name": name, "pid": pid, "cores": round(cores, 3), "ours": pid in ours})
    rows.sort(key=lambda r: -r["cores"])
    return {"processes": rows[:limit], "other_cores": round(other, 3)}


SERVE_ROLES = (("ServeReplica:", None), ("ProxyActor", "proxy"), ("ServeController", "controller"))


def serve_role(name: str) -> str | None:
    """The Serve role of one of our processes from its title: ``ingress``, ``model``, ``member``, ``ensemble``,
    ``one_hop``, ``proxy``, ``controller``, ``client`` (this process); None for anything else."""
    if name.startswith("this process"):
        return "client"
    for marker, role in SERVE_ROLES:
        if marker in name:
            if role is not None:
                return role
            deployment = name.split(marker, 1)[1].split(":")[-1].split()[0]
            return {"Ingress": "ingress", "Model": "model", "Ensemble": "ensemble", "OneHop": "one_hop"}.get(
                deployment, "member" if deployment.startswith("Member") else deployment.lower()
            )
    return None


def cpu_per_request(before: ProcessSample, after: ProcessSample, requests: int) -> dict[str, float]:
    """CPU milliseconds per request of each Serve role of this process's Ray (``serve_role``) between two
    ``process_cpu_seconds`` samples; ``ray`` is the rest of that Ray (raylet, GCS, workers), ``total`` all of it."""
    if requests <= 0:
        return {}
    ours = _descendants(after, os.getpid())
    out: dict[str, float] = {}
    for pid in ours:
        name, seconds, _ = after[pid]
        prev = before.get(pid)
        used = seconds - (prev[1] if prev else 0.0)
        if used <= 0:
            continue
        role = serve_role(name) or "ray"
        out[role] = out.get(role, 0.0) + used
    out["total"] = sum(out.values())
    return {k: round(1000 * v / requests, 3) for k, v in sorted(out.items())}


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all CPUs since boot."""
    t = psutil.cpu_times()
    total = sum(t)
    idle = t.idle + getattr(t, "iowait", 0.0)
    return total - idle, total


def cpu_usage(
    before: dict[int, float], after: dict[int, float], wall_s: float, busy_fraction: float = 0.05
) -> dict[str, Any]:
    """Cores used by a process between two ``thread_cpu_seconds`` samples and how many threads were busy."""
    per_thread = {tid: (after[tid] - before.get(tid, 0.0)) / max(wall_s, 1e-9) for tid in after}
    busy = sorted((round(v, 3) for v in per_thread.values() if v >= busy_fraction), reverse=True)
    return {"cores": round(sum(per_thread.values()), 3), "busy_threads": len(busy), "busy_thread_cores": busy}


def machine_info() -> dict[str, Any]:
    """CPU, memory, GPU and library versions of this machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }
    try:
        info["load_average_at_start"] = [round(v, 2) for v in psutil.getloadavg()]
        info["cpu_affinity"] = len(psutil.Process().cpu_affinity())
    except (AttributeError, OSError, psutil.Error):
        pass
    try:
        for line in open("/proc/cpuinfo").read().splitlines():  # psutil does not name the CPU model
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for mod in ("torch", "ray", "open_clip", "httpx"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing library is only missing from the report
            info[mod] = None
    try:
        import torch

        info["torch_default_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return info


def write_bench_json(
    out: Path | str, report: dict[str, Any], *, script: str, argv: list[str] | None, started: float, note: str
) -> dict[str, Any]:
    """Add the machine, the note, the command line, the date and the seconds since ``started`` (perf_counter) to a
    benchmark's ``report`` and write it as JSON to ``out``; returns the full report."""
    import json
    import sys
    import time

    full = {
        **report,
        "machine": machine_info(),
        "note": note,
        "command": f"python {script} " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(full, indent=2))
    return full
