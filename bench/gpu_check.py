"""GPU throughput check: ViT-B-32 (random init, 224 px, synthetic batches).

Measures fine-tuning images/s in fp32 (the reference code's setting) and with
bf16 autocast, and held-out evaluation images/s, with the same classifier
soup-ray fine-tunes (image tower + linear head). Writes
``bench/results/gpu-<date>.json``. Every phase is bounded in time, so the
whole check stays within a few minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def build(num_classes: int, device: str):
    import open_clip
    from torch import nn

    from soup_ray.model import CLIPClassifier

    clip = open_clip.create_model("ViT-B-32", pretrained=None)
    head = nn.Linear(512, num_classes)
    clf = CLIPClassifier(clip.visual, head, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, 224)
    return clf.to(device)


def timed_steps(fn, warmup: int, max_steps: int, max_seconds: float, device: str) -> tuple[int, float]:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--eval-batch-size", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=45.0, help="time budget of each measured phase")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in the reference code
    torch.backends.cudnn.allow_tf32 = False
    model = build(1000, device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.1)
    x = torch.rand(args.batch_size, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    results: dict = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": "ViT-B-32 (random init) + linear head, 224 px",
        "batch_size": args.batch_size,
    }

    def train_step(bf16: bool):
        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return step

    model.train()
    for name, bf16 in (("train_fp32", False), ("train_bf16_autocast", True)):
        n, secs = timed_steps(train_step(bf16), 3, 200, args.seconds, device)
        results[f"{name}_images_per_s"] = round(n * args.batch_size / secs, 1)
        print(f"{name}: {results[f'{name}_images_per_s']} images/s ({n} steps)", flush=True)
    model.eval()
    xe = torch.rand(args.eval_batch_size, 3, 224, 224, device=device)
    for name, bf16 in (("eval_fp32", False), ("eval_bf16_autocast", True)):
        def ev():
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                model(xe)
        n, secs = timed_steps(ev, 3, 400, args.seconds / 2, device)
        results[f"{name}_images_per_s"] = round(n * args.eval_batch_size / secs, 1)
        print(f"{name}: {results[f'{name}_images_per_s']} images/s ({n} batches)", flush=True)
    if device == "cuda":
        results["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out = Path(args.out or Path(__file__).parent / "results" / f"gpu-{results['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
