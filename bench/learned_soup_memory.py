#!/usr/bin/env python3
"""Peak memory of fitting the learned soup over N ingredients streamed from disk: flat in N.

    python bench/learned_soup_memory.py                    # N = 4, 8, 16 ingredients of ~100 MB each
    python bench/learned_soup_memory.py --mb 20 --ns 2 4   # smaller and quicker

Writes N random safetensors checkpoints of a synthetic two-layer classifier
(``--mb`` megabytes of fp32 weights each) near a shared start, then, for each
N in its own fresh process, fits ``soup_ray.soup.learned.fit_learned_soup``
(per model and per layer) with loaders that read each checkpoint from disk
when asked, on a fixed batch of synthetic held-out data. Each process reports
its peak RSS (``ru_maxrss``); the baseline is the reference implementation's
approach of holding all N models in memory at once, measured the same way.
Writes ``bench/results/learned_soup_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def shapes(mb: float) -> dict[str, tuple[int, ...]]:
    """A two-layer classifier with about ``mb`` megabytes of fp32 weights."""
    width = int(math.sqrt(mb * 2**20 / 4 / 2))
    return {
        "l1.weight": (width, width),
        "l1.bias": (width,),
        "l2.weight": (width, width),
        "l2.bias": (width,),
        "head.weight": (10, width),
        "head.bias": (10,),
    }


def write_checkpoints(folder: Path, n: int, mb: float) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    start = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes(mb).items()}
    paths = []
    for i in range(n):
        p = folder / f"m{i:02d}.safetensors"
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()}, str(p))
        paths.append(p)
    return paths


def child(paths: list[str], mode: str, by_layer: bool, epochs: int) -> dict:
    """Fit in this process and report the peak RSS (runs in a fresh interpreter per measurement)."""
    import torch
    from safetensors.torch import load_file

    from soup_ray.soup.learned import fit_learned_soup

    torch.manual_seed(0)
    first = load_file(paths[0])
    width = first["l1.weight"].shape[0]
    del first
    x, y = torch.randn(256, width), torch.randint(0, 10, (256,))

    def loss_and_grad(theta):
        p = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        h = torch.relu(x @ p["l1.weight"].T + p["l1.bias"])
        h = torch.relu(h @ p["l2.weight"].T + p["l2.bias"])
        loss = torch.nn.functional.cross_entropy(h @ p["head.weight"].T + p["head.bias"], y)
        loss.backward()
        return float(loss), {k: v.grad for k, v in p.items()}

    if mode == "streamed":
        ingredients = [lambda q=q: load_file(q) for q in paths]
    else:  # the reference approach: every model in memory before fitting
        ingredients = [load_file(q) for q in paths]
    t0 = time.perf_counter()
    result = fit_learned_soup(ingredients, loss_and_grad, by_layer=by_layer, epochs=epochs, lr=0.05)
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": round(time.perf_counter() - t0, 2),
        "final_loss": result.losses[-1] if result.losses else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[4, 8, 16], help="ingredient counts (default 4 8 16)")
    ap.add_argument("--mb", type=float, default=100.0, help="megabytes of weights per ingredient (default 100)")
    ap.add_argument("--epochs", type=int, default=3, help="fitting steps per measurement (default 3)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the all-models-in-memory baseline")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "learned_soup_memory.json")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, by_layer, epochs, *paths = args.child
        print(json.dumps(child(paths, mode, by_layer == "1", int(epochs))))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="soup-ray-learned-") as tmp:
        paths = write_checkpoints(Path(tmp), max(args.ns), args.mb)
        for n in args.ns:
            for by_layer in (False, True):
                for mode in ["streamed"] if args.no_baseline else ["streamed", "all_in_memory"]:
                    cmd = [
                        sys.executable,
                        __file__,
                        "--child",
                        mode,
                        "1" if by_layer else "0",
                        str(args.epochs),
                        *[str(p) for p in paths[:n]],
                    ]
                    out = subprocess.run(
                        cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                    )
                    fig = json.loads(out.stdout.strip().splitlines()[-1])
                    fig.update(n=n, by_layer=by_layer, mode=mode)
                    results.append(fig)
                    print(
                        f"N={n:3d} by_layer={by_layer!s:5s} {mode:14s} peak RSS {fig['peak_rss_mib']:8.1f} MiB "
                        f"{fig['seconds']:6.1f}s",
                        flush=True,
                    )
    streamed = [r for r in results if r["mode"] == "streamed"]
    flat = {}
    for by_layer in (False, True):
        rss = [r["peak_rss_mib"] for r in streamed if r["by_layer"] == by_layer]
        flat["by_layer" if by_layer else "per_model"] = {
            "max_over_min": round(max(rss) / min(rss), 3),
            "target": "<= 1.10",
            "ok": max(rss) / min(rss) <= 1.10,
        }
    report = {
        "ingredient_mb": args.mb,
        "epochs": args.epochs,
        "results": results,
        "flat_in_n": flat,
        "command": "python bench/learned_soup_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(flat, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
