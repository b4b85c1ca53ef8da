"""Averaging N safetensors checkpoints: seconds and peak RSS against a plain sequential read of the same files.

Used by ``bench/averaging.py`` (N = 2, 8, 32 ViT-B-32-sized checkpoints) and by
``bench/gpu_check.py`` (8 checkpoints). Every measurement runs in a fresh
interpreter (``python -m soup_ray.bench.averaging MODE FILES...``) that prints
one JSON line with its seconds, its peak RSS (``VmHWM`` of ``/proc/self/status``:
the high-water mark of this process's own memory; ``ru_maxrss`` would also
count the parent's memory copied at ``fork``) and its RSS before the work
started (the interpreter with torch imported).

Modes:

- ``read``: the baseline, a plain sequential read of every file (64 KiB ``readinto``: on the
  measured machine larger chunks into a fresh buffer slow the first pass of a fresh process
  down by about a second, which would flatter every ratio);
- ``read_write``: the same read, then one file of the soup's size written from a resident
  buffer: the least I/O a file-to-file average can do (the baseline for ``stream``'s file);
- ``stream``: :func:`soup_ray.checkpoint_average.average_checkpoint_files` (tensor by tensor,
  reused buffers), writing the soup to ``--out``;
- ``stream_into_model``: :func:`soup_ray.checkpoint_average.average_checkpoints` with ``into=``
  a resident state dict of the model's shapes (allocated before the clock starts): what the soup
  keeper does, averaging straight into its model's weights;
- ``stream_in_memory``: the same into a new state dict (every mean copied into fresh memory);
- ``mmap``: ``safe_open`` memory maps, one file at a time, every tensor added into fp32 sums
  (the whole sum in fresh memory), written with ``save_file``;
- ``loaded``: ``soup.average_state_dicts`` over ``load_file`` loaders (one whole model
  loaded at a time), the soup keeper's previous way, written the same way.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CHUNK = 64 * 2**10
MODES = ("read", "read_write", "stream", "stream_into_model", "stream_in_memory", "mmap", "loaded")


def rss_mb() -> float:
    """Peak RSS of this process's memory so far, in MiB (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def vit_shapes(model_name: str = "ViT-B-32", num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the classifier soup-ray fine-tunes (image tower + linear head), no weights downloaded."""
    import open_clip

    clip = open_clip.create_model(model_name, pretrained=None)
    shapes = {f"visual.{k}": tuple(v.shape) for k, v in clip.visual.state_dict().items()}
    width = clip.visual.output_dim
    shapes.update({"head.weight": (num_classes, width), "head.bias": (num_classes,)})
    return shapes


def tiny_shapes() -> dict[str, tuple[int, ...]]:
    """A few small tensors for dry runs."""
    return {
        "visual.conv1.weight": (64, 3, 8, 8),
        "visual.proj": (64, 32),
        "visual.ln.weight": (64,),
        "head.weight": (10, 32),
        "head.bias": (10,),
    }


def write_checkpoints(
    folder: Path, n: int, shapes: dict[str, tuple[int, ...]], seed: int = 0, log: Callable[[str], None] = print
) -> list[Path]:
    """``n`` random fp32 checkpoints with ``shapes`` (a shared start plus noise, like fine-tuned models)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    start = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    paths = []
    t0 = time.perf_counter()
    for i in range(n):
        p = folder / f"ckpt{i:02d}.safetensors"
        save_file({k: v + 0.001 * torch.randn(v.shape, generator=g) for k, v in start.items()}, str(p))
        paths.append(p)
    if hasattr(os, "sync"):
        os.sync()  # no writeback of these files while the measurements run
    log(f"wrote {n} checkpoints of {paths[0].stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f}s")
    return paths


def resident_model(path: str | Path) -> dict:
    """A state dict of fp32 ones with the shapes of the checkpoint at ``path``, its pages already touched
    (the soup keeper's model, which exists before it averages into it)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: torch.ones(f.get_slice(k).get_shape(), dtype=torch.float32) for k in f.keys()}


def read_files(paths: list[Path]) -> int:
    """Read every file sequentially (the baseline, and the page-cache warm-up); returns the bytes read."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total


def write_like(model: Path, out: Path) -> int:
    """Write ``out`` with as many bytes as ``model`` holds, from one resident chunk (the write half of a copy)."""
    buf = memoryview(bytearray(CHUNK))
    left = model.stat().st_size
    with open(out, "wb", buffering=0) as f:
        while left > 0:
            left -= f.write(buf[: min(CHUNK, left)])
    return model.stat().st_size


def child(mode: str, paths: list[str], out: str | None) -> dict:
    """One measurement in this process (run through ``python -m soup_ray.bench.averaging``)."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from soup_ray.checkpoint_average import average_checkpoint_files, average_checkpoints
    from soup_ray.soup import average_state_dicts

    model = None
    if mode == "stream_into_model":  # the keeper's model exists before it averages: allocated off the clock
        model = resident_model(paths[0])
    before = current_rss_mb()
    t0 = time.perf_counter()
    if mode == "read":
        read_files([Path(p) for p in paths])
    elif mode == "read_write":
        read_files([Path(p) for p in paths])
        write_like(Path(paths[0]), Path(out))
    elif mode == "stream":
        average_checkpoint_files(paths, out)
    elif mode == "stream_into_model":
        average_checkpoints(paths, into=model)
    elif mode == "stream_in_memory":
        soup = average_checkpoints(paths)
    elif mode == "mmap":
        sums: dict = {}
        for p in paths:
            with safe_open(p, framework="pt") as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    if k in sums:
                        sums[k].add_(t)
                    else:
                        sums[k] = t.to(torch.float32, copy=True)
        save_file({k: v.div_(len(paths)) for k, v in sums.items()}, out)
    elif mode == "loaded":
        soup = average_state_dicts([lambda q=q: load_file(q) for q in paths])
        save_file(soup, out)
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - t0
    return {"mode": mode, "n": len(paths), "seconds": seconds, "peak_rss_mb": rss_mb(), "rss_before_mb": before}


def measure(mode: str, paths: list[Path], out: Path | None = None, timeout: float = 900) -> dict:
    """Run one ``child`` in a fresh interpreter and return its JSON line."""
    cmd = [sys.executable, "-m", "soup_ray.bench.averaging", mode, *map(str, paths)]
    if out is not None:
        cmd += ["--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} over {len(paths)} files failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(
    paths: list[Path], out: Path, repeats: int = 2, modes: tuple[str, ...] = MODES, log: Callable[[str], None] = print
) -> dict:
    """Warm the page cache with every file once, then alternate the modes ``repeats`` times; medians reported."""
    read_files(paths)  # equalised page cache: every file read once before any measurement
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            r = measure(m, paths, out if m != "read" else None)
            runs[m].append(r)
            if out.exists():
                out.unlink()
    case: dict = {
        "n": len(paths),
        "file_mb": round(paths[0].stat().st_size / 2**20, 1),
        "total_mb": round(sum(p.stat().st_size for p in paths) / 2**20, 1),
    }
    for m, rs in runs.items():
        case[m] = {
            "seconds": round(statistics.median(r["seconds"] for r in rs), 4),
            "seconds_all": [round(r["seconds"], 4) for r in rs],
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1),
            "rss_before_mb": round(statistics.median(r["rss_before_mb"] for r in rs), 1),
        }
    if "read" in case:
        base = max(case["read"]["seconds"], 1e-6)
        for m in modes:
            if m != "read":
                case[f"{m}_over_read"] = round(case[m]["seconds"] / base, 3)
                case[f"{m}_over_read_best"] = round(
                    min(rs_["seconds"] for rs_ in runs[m]) / max(min(r["seconds"] for r in runs["read"]), 1e-6), 3
                )
        case["read_mb_per_s"] = round(case["total_mb"] / base, 1)
    if "read_write" in case and "stream" in case:
        case["stream_over_read_write"] = round(case["stream"]["seconds"] / max(case["read_write"]["seconds"], 1e-6), 3)
    log(
        f"N={len(paths)}: "
        + ", ".join(f"{m} {case[m]['seconds']:.2f}s / {case[m]['peak_rss_mb']:.0f} MiB" for m in modes)
    )
    return case


def summarise(cases: list[dict]) -> dict:
    """Targets: streamed peak RSS flat in N (within 10 %), streamed time / raw read <= 1.5 at every N.

    The ratio is given four ways: the soup written to a file against the plain read (which
    writes nothing), the same against read + one file written (the I/O a file-to-file average
    cannot avoid), the soup averaged into an existing model's weights (what the soup keeper
    does) and into a new state dict, both against the plain read.
    """
    peaks = [c["stream"]["peak_rss_mb"] for c in cases]
    spread = (max(peaks) - min(peaks)) / min(peaks)
    out: dict = {"stream_peak_rss_spread": round(spread, 3), "stream_peak_rss_flat_within_10pct": spread <= 0.10}
    for key in (
        "stream_over_read",
        "stream_over_read_write",
        "stream_into_model_over_read",
        "stream_in_memory_over_read",
    ):
        ratios = {c["n"]: c[key] for c in cases if key in c}
        if ratios:
            out[f"{key}_by_n"] = ratios
            out[f"{key}_max"] = max(ratios.values())
            out[f"{key}_at_most_1_5"] = max(ratios.values()) <= 1.5
    return out


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=list(MODES))
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    print(json.dumps(child(a.mode, a.paths, a.out)))


if __name__ == "__main__":
    _main()
