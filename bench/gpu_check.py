"""GPU check: ViT-B-32 (random init, 224 px) training/evaluation throughput, then serving the soup vs an ensemble.

Part 1 (throughput, synthetic batches): fine-tuning images/s in fp32 (the
reference code's setting) and with bf16 autocast, and evaluation images/s, with
the same classifier soup-ray fine-tunes (image tower + linear head). With
``--train-compile`` (the shell wrapper's default) a third training figure: the
model under ``torch.compile``, fused AdamW, channels-last model and inputs and
bf16 autocast, its compile warm-up timed apart from the steady state and set
against the plain bf16 figure of the same run; for ViT-B-32 on a known GPU,
both bf16 figures also as a fraction of the GPU's dense bf16 peak.

Part 2 (serving, over HTTP on one local Ray): a synthetic run folder with a
random-init ViT-B-32 base, its "soup" and ``--members`` fake trials of the same
weights (``soup_ray.bench.synthetic_run.build_vit_run``) is served with Ray Serve,
one application at a time: the soup on ``POST /predict`` and an ensemble of
``--members`` replicas on ``POST /predict/ensemble``, each model replica holding
``--num-gpus`` of the GPU; plus the in-process ceiling (batched forward of the
same soup on the GPU at the deployment's batch size).

Part 3 (averaging): 8 ViT-B-32-sized checkpoints averaged with the streaming
``soup_ray.checkpoint_average.average_checkpoint_files`` against a plain read
of the same files (page cache warmed by one read of every file first).

``--dry-run`` runs every part's code on a CPU-only machine at tiny sizes (the
stand-in model config, a few steps, tiny checkpoints; no Serve unless
``--serve`` is given): the test suite runs it so the script cannot rot.

Writes ``bench/results/gpu-<date>.json`` after every phase. Every phase is
bounded in time and the whole check by ``--budget`` seconds (the shell wrapper
kills it at 360 s), so a late phase is shortened or skipped, never overrun.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from soup_ray.bench.gpu_figures import (
    COMPILE_WARMUP_MAX_S,
    DRY_RUN_COMPILE_BACKEND,
    SERVE_MIN_LEFT_S,
    TRAIN_FLOP_PER_IMAGE,
    bf16_peak_tflops,
    compile_spare_s,
    later_phases_reserve_s,
    peak_fraction,
)
from soup_ray.serving import sigterm_as_interrupt

HERE = Path(__file__).resolve().parent

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def build(num_classes: int, device: str, model_name: str = "ViT-B-32"):
    import open_clip
    from torch import nn

    from soup_ray.model import CLIPClassifier
    from soup_ray.standin import register_model_configs

    register_model_configs()  # the package's own configs (the dry run's tiny model)
    clip = open_clip.create_model(model_name, pretrained=None)
    size = clip.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    head = nn.Linear(clip.visual.output_dim, num_classes)
    clf = CLIPClassifier(clip.visual, head, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, size)
    clf.image_size_px = size
    return clf.to(device)


def timed_steps(
    fn: Callable[[], None], warmup: int, max_steps: int, max_seconds: float, device: str
) -> tuple[int, float]:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while n < max_steps and time.perf_counter() - t0 < max_seconds:
        fn()
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return n, time.perf_counter() - t0


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 means fp32 while training is timed, as in the reference code; the library defaults afterwards."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True  # serving runs with the library defaults again
        torch.backends.cudnn.allow_tf32 = True


def train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, bf16: bool, device: str
) -> Callable[[], None]:
    """One fine-tuning step on a fixed batch: forward (bf16 autocast or not), backward, clipping, AdamW."""

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def save(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    results["elapsed_s"] = round(elapsed(), 1)
    out.write_text(json.dumps(results, indent=2, default=str))


def throughput_phase(args: argparse.Namespace, results: dict[str, Any], device: str) -> None:
    """Fine-tuning (fp32, bf16 autocast) and evaluation images/s on synthetic batches."""
    with strict_fp32():
        _throughput(args, results, device)


def _throughput(args: argparse.Namespace, results: dict[str, Any], device: str) -> None:
    model = build(1000, device, args.model)
    px = model.image_size_px
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.1)
    x = torch.rand(args.batch_size, 3, px, px, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    model.train()
    for name, bf16 in (("train_fp32", False), ("train_bf16_autocast", True)):
        n, secs = timed_steps(
            train_step(model, opt, x, y, bf16, device), args.warmup, args.max_steps, args.seconds, device
        )
        results[f"{name}_images_per_s"] = round(n * args.batch_size / secs, 1)
        print(f"{name}: {results[f'{name}_images_per_s']} images/s ({n} steps)", flush=True)
    results["train_flop_per_image"] = TRAIN_FLOP_PER_IMAGE.get(args.model)
    results["bf16_peak_tflops"] = bf16_peak_tflops(results["device"]) if device == "cuda" else None
    results["train_bf16_autocast_peak_fraction"] = peak_fraction(
        results["train_bf16_autocast_images_per_s"], args.model, results["bf16_peak_tflops"]
    )
    model.eval()
    xe = torch.rand(args.eval_batch_size, 3, px, px, device=device)
    for name, bf16 in (("eval_fp32", False), ("eval_bf16_autocast", True)):

        def ev(bf16: bool = bf16) -> None:
            with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                model(xe)

        n, secs = timed_steps(ev, args.warmup, 2 * args.max_steps, args.seconds / 2, device)
        results[f"{name}_images_per_s"] = round(n * args.eval_batch_size / secs, 1)
        print(f"{name}: {results[f'{name}_images_per_s']} images/s ({n} batches)", flush=True)
    if device == "cuda":
        results["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    model = opt = x = y = xe = None  # drop the references (the closures above hold the names)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def compiled_train_phase(args: argparse.Namespace, results: dict[str, Any], device: str) -> None:
    """Fine-tuning images/s with torch.compile, fused AdamW, channels-last and bf16 autocast; compile timed apart.

    Runs after the plain figures (a fresh model: the plain one stays as it was measured) and only when the
    compile warm-up fits the budget beyond what the later phases need; the timed steps are shortened to what
    is left after the warm-up. A failure is recorded, not raised: the rest of the check still runs.
    """
    spare = args.budget - elapsed() - later_phases_reserve_s(args.no_average, args.no_serve)
    if compile_spare_s(args.budget - elapsed(), args.no_average, args.no_serve) is None:
        results["train_bf16_compiled"] = {
            "skipped": f"{spare:.0f}s spare of the budget, the compile needs {COMPILE_WARMUP_MAX_S:.0f}s"
        }
        print(f"train_bf16_compiled: skipped, {spare:.0f}s spare", flush=True)
        return
    backend = args.compile_backend or (DRY_RUN_COMPILE_BACKEND if args.dry_run else "inductor")
    # Inductor's "default" mode: on an H100/H200 the bulk of what compiling a ViT training step gains is fusing
    # the layer norms, GELU, bias and residual adds around the cuBLAS matmuls and the SDPA attention kernel,
    # which default mode does. "max-autotune(-no-cudagraphs)" also benchmarks Triton matmul templates per
    # shape (typically minutes more of compile for a forward and backward, which this bounded check cannot
    # spare, for little at these large bf16 shapes, where cuBLAS is near peak already), and CUDA graphs
    # ("reduce-overhead", "max-autotune") pay off for launch-bound small batches, not for a batch of 256 whose
    # step is tens of milliseconds of GPU work. The mode is Inductor's: other backends take none.
    mode = "default" if backend == "inductor" else None
    fused = device == "cuda"  # the fused AdamW kernel here is CUDA's; on CPU the default implementation
    fig: dict[str, Any] = {
        "compile_backend": backend,
        "compile_mode": mode,
        "fused_adamw": fused,
        "channels_last": True,
        "autocast": "bf16",
    }
    if args.dry_run and not args.compile_backend:
        fig["note"] = (
            f"dry run: backend {DRY_RUN_COMPILE_BACKEND} (Dynamo + AOTAutograd, no Inductor code "
            "generation; a cold Inductor compile of the stand-in takes ~50 s on a 2-core CPU)"
        )
    if not fused:
        fig["optimizer_note"] = "AdamW default implementation: fused=True is used on CUDA only"
    results["train_bf16_compiled"] = fig
    model = compiled = opt = x = y = None
    try:
        with strict_fp32():  # the same matmul settings as the plain bf16 figure it is set against
            # channels-last: for a ViT it only changes the patch-embedding convolution's layout (and the input's)
            model = build(1000, device, args.model).to(memory_format=torch.channels_last)
            model.train()
            px = model.image_size_px
            opt = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.1, fused=fused)
            x = torch.rand(args.batch_size, 3, px, px, device=device).to(memory_format=torch.channels_last)
            y = torch.randint(0, 1000, (args.batch_size,), device=device)
            compiled = torch.compile(model, backend=backend, mode=mode)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step = train_step(compiled, opt, x, y, True, device)
            # the --warmup steps compile forward and backward (and any recompile): timed apart from the steady state
            n_warm, warm_s = timed_steps(step, 0, max(1, args.warmup), float("inf"), device)
            fig["compile_warmup_s"], fig["compile_warmup_steps"] = round(warm_s, 2), n_warm
            seconds = min(
                args.seconds, args.budget - elapsed() - later_phases_reserve_s(args.no_average, args.no_serve)
            )
            if seconds < 1.0:
                fig["skipped"] = f"compiled in {warm_s:.0f}s, leaving no time of the budget for the timed steps"
                print(f"train_bf16_compiled: {fig['skipped']}", flush=True)
                return
            n, secs = timed_steps(step, 0, args.max_steps, seconds, device)
        fig["steps"], fig["seconds"] = n, round(secs, 2)
        if device == "cuda":
            fig["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        ips = round(n * args.batch_size / secs, 1)
        results["train_bf16_compiled_images_per_s"] = ips
        plain = results.get("train_bf16_autocast_images_per_s")
        results["train_compiled_over_bf16"] = round(ips / plain, 3) if plain else None
        results["train_bf16_compiled_peak_fraction"] = peak_fraction(ips, args.model, results.get("bf16_peak_tflops"))
        print(
            f"train_bf16_compiled: {ips} images/s ({n} steps; compile warm-up {warm_s:.1f}s, "
            f"{results['train_compiled_over_bf16']}x plain bf16)",
            flush=True,
        )
    except Exception as e:  # noqa: BLE001 - a compiler failure is a finding of the check, not the end of it
        fig["error"] = f"{type(e).__name__}: {e}"[:2000]
        print(f"train_bf16_compiled: failed: {fig['error'][:300]}", flush=True)
    finally:
        del model, compiled, opt, x, y
        torch._dynamo.reset()  # the compiled graphs and their caches go with the model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def averaging_phase(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """8 checkpoints averaged by the streaming function against a plain read of the same files."""
    from soup_ray.bench.averaging import read_files, resident_model, tiny_shapes, vit_shapes, write_checkpoints
    from soup_ray.checkpoint_average import average_checkpoint_files, average_checkpoints

    tmp = Path(tempfile.mkdtemp(prefix="soup-ray-gpu-avg-"))
    try:
        shapes = tiny_shapes() if args.dry_run else vit_shapes(args.model)
        paths = write_checkpoints(tmp, args.average_n, shapes, log=lambda m: print(m, flush=True))
        read_files(paths)  # page cache equalised: every file read once before both
        fig: dict[str, Any] = {
            "n": len(paths),
            "file_mb": round(paths[0].stat().st_size / 2**20, 1),
            "page_cache": "warmed: every file read once before the timings",
        }
        model = resident_model(paths[0])  # the keeper's model, allocated off the clock
        for name, fn in (
            ("read", lambda: read_files(paths)),
            ("stream", lambda: average_checkpoint_files(paths, tmp / "soup.safetensors")),
            ("stream_into_model", lambda: average_checkpoints(paths, into=model)),
            ("stream_in_memory", lambda: average_checkpoints(paths)),
        ):
            t0 = time.perf_counter()
            fn()
            fig[f"{name}_s"] = round(time.perf_counter() - t0, 6)
        fig["stream_over_read"] = round(fig["stream_s"] / max(fig["read_s"], 1e-9), 3)
        fig["stream_into_model_over_read"] = round(fig["stream_into_model_s"] / max(fig["read_s"], 1e-9), 3)
        fig["stream_in_memory_over_read"] = round(fig["stream_in_memory_s"] / max(fig["read_s"], 1e-9), 3)
        results["averaging"] = fig
        print(f"averaging {len(paths)} checkpoints: {fig}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def serve_phase(args: argparse.Namespace, results: dict[str, Any], device: str, out: Path) -> None:
    """Served soup vs an ensemble of ``--members`` ViT-B-32 replicas over HTTP, plus the in-process ceiling."""
    from soup_ray.bench.loadgen import parse_concurrency
    from soup_ray.bench.serving_bench import BenchSettings, format_table, run_bench, start_ray, write_bench
    from soup_ray.bench.synthetic_run import build_vit_run
    from soup_ray.serving import stop_serve_and_ray

    left = args.budget - elapsed()
    if left < SERVE_MIN_LEFT_S:
        results["serving_vitb32"] = {"skipped": f"only {left:.0f}s of the budget left"}
        print(f"serving: skipped, only {left:.0f}s left", flush=True)
        return
    tmp = Path(tempfile.mkdtemp(prefix="soup-ray-gpu-serve-"))
    try:
        run_dir = build_vit_run(
            tmp / "run", members=args.members, model_name=args.model, log=lambda m: print(m, flush=True)
        )
        gpu = device == "cuda"
        settings = BenchSettings(
            concurrency=parse_concurrency(args.serve_concurrency),
            requests=args.serve_requests,
            seconds=args.serve_seconds,
            ensemble_cap=args.members,
            port=args.port,
            only=["soup", "ensemble_k"],
            num_cpus=args.replica_cpus if gpu else None,
            num_gpus=args.num_gpus if gpu else 0.0,
            ingress_cpus=1.0 if gpu else 0.1,
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_timeout_s,
            images=64,
            warmup_requests=64,
            request_timeout_s=20.0,
            deploy_timeout_s=120.0,
            ceiling_seconds=5.0,
            time_budget_s=max(30.0, args.budget - elapsed() - 10),
        )
        log = lambda m: print(f"[serve] {m}", flush=True)  # noqa: E731
        own_ray = start_ray(settings, log)
        sigterm_as_interrupt()  # ray.init installed its own SIGTERM handler: unwind instead
        figures: dict[str, Any] = {}
        try:
            run_bench(run_dir, settings, log=log, figures=figures)
        except KeyboardInterrupt:
            results["serving_vitb32"] = {
                "interrupted": True,
                "ceiling": figures.get("ceiling"),
                "replica": figures.get("replica"),
                "targets": figures.get("targets"),
            }
            raise
        finally:
            if own_ray:
                stop_serve_and_ray()
        paths = write_bench(figures, out.with_name(out.stem + "-serve.json"))
        results["serving_vitb32"] = {
            "ratios": figures["ratios"],
            "ceiling": figures.get("ceiling"),
            "replica": figures.get("replica"),
            "figures_file": str(paths["json"]),
            "targets": figures["targets"],
        }
        print(format_table(figures), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=256, help="training batch (default: 256)")
    ap.add_argument("--eval-batch-size", type=int, default=512, help="evaluation batch (default: 512)")
    ap.add_argument("--seconds", type=float, default=25.0, help="time budget of each measured training phase")
    ap.add_argument("--budget", type=float, default=340.0, help="bound on the whole check in seconds")
    ap.add_argument("--no-throughput", action="store_true", help="skip part 1")
    ap.add_argument(
        "--train-compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="part 1: also time training with torch.compile, fused AdamW, channels-last and bf16 "
        "autocast (the shell wrapper turns it on; skipped when the budget is short)",
    )
    ap.add_argument(
        "--compile-backend",
        default=None,
        help=f"torch.compile backend for --train-compile (default: inductor; {DRY_RUN_COMPILE_BACKEND} with --dry-run)",
    )
    ap.add_argument("--no-serve", action="store_true", help="skip part 2")
    ap.add_argument("--no-average", action="store_true", help="skip part 3")
    ap.add_argument("--average-n", type=int, default=8, help="checkpoints averaged in part 3 (default: 8)")
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model name (default: ViT-B-32)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    ap.add_argument("--max-steps", type=int, default=200, help="most timed training steps per setting")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny sizes for a CPU-only machine (the test suite's check): stand-in model, batch 4, "
        "a few steps, tiny checkpoints, no Serve unless --serve",
    )
    ap.add_argument("--serve", action="store_true", help="with --dry-run: run part 2 too")
    ap.add_argument("--members", type=int, default=5, help="ensemble size compared with the soup (default: 5)")
    ap.add_argument("--num-gpus", type=float, default=0.15, help="GPU fraction per model replica (default: 0.15)")
    ap.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per model replica on the GPU machine")
    ap.add_argument("--max-batch-size", type=int, default=32, help="dynamic batching of the replicas (default: 32)")
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.005, help="dynamic batching: longest wait")
    ap.add_argument("--serve-concurrency", default="1,16,64", help="HTTP concurrency levels (default: 1,16,64)")
    ap.add_argument("--serve-requests", type=int, default=4000, help="most requests per level")
    ap.add_argument("--serve-seconds", type=float, default=10.0, help="longest time per level")
    ap.add_argument("--port", type=int, default=8012, help="HTTP port of the served application (loopback)")
    ap.add_argument("--out", default=None, help="output JSON (default: bench/results/gpu-<date>.json)")
    args = ap.parse_args()
    if args.dry_run:
        args.model = "soupray-digits-tiny" if args.model == "ViT-B-32" else args.model
        args.batch_size, args.eval_batch_size, args.seconds = 4, 8, min(args.seconds, 2.0)
        args.warmup, args.max_steps, args.members = 1, 3, min(args.members, 2)
        args.serve_requests, args.serve_seconds, args.serve_concurrency = 20, 2.0, "1,2"
        args.no_serve = args.no_serve or not args.serve

    sigterm_as_interrupt()  # `timeout` sends SIGTERM: unwind so Serve and Ray are stopped and results written
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": f"{args.model} (random init) + linear head",
        "dry_run": bool(args.dry_run),
        "batch_size": args.batch_size,
    }
    out = Path(args.out or HERE / "results" / f"gpu-{results['date']}.json")
    try:
        if not args.no_throughput:
            throughput_phase(args, results, device)
            save(results, out)
            if args.train_compile:
                compiled_train_phase(args, results, device)
                save(results, out)
        if not args.no_average:
            averaging_phase(args, results)
            save(results, out)
        if not args.no_serve:
            serve_phase(args, results, device, out)
        elif args.dry_run:
            results["serving_vitb32"] = {"skipped": "dry run without --serve (the serving tests cover the app)"}
    except KeyboardInterrupt:
        results["interrupted_at_s"] = round(elapsed(), 1)
        print("interrupted: writing what was measured", flush=True)
    finally:
        save(results, out)
        print(f"wrote {out} ({elapsed():.0f}s)", flush=True)


if __name__ == "__main__":
    main()
