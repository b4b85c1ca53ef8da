"""Steady-state images/s of soup-ray's trial code against a bare PyTorch loop of the same model, data and augmentation.

Both sides train the same base (a random-init ViT-B-32 classifier saved like a
real run's base) on the same tiny image-folder dataset (digits drawn as PNG
files, decoded and resized to 224 px by the project's loader), same batch,
RandAugment and mixup (``soup_ray.train.randaugment`` / ``mixup``):

- ``trial``: ``soup_ray.train.fine_tune`` with a report callback that records when each epoch
  ends; the steady state is epochs 2 to E-1 together (their training steps, held-out
  evaluations, reports and the resumable checkpoints written every ``checkpoint_interval_s``,
  30 s by default), the first epoch (warm-up) and the last one (the soup candidate's checkpoint
  and final scoring) are reported apart;
- ``bare``: a plain loop (DataLoader, augmentation, forward, label-smoothed loss, backward,
  clipping, AdamW, schedule) over the same batches, timed on its epochs 2 to E-1.

Also measured: RandAugment alone on one batch, as a share of a training step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def write_digit_folders(root: Path, train_per_class: int, test_per_class: int, size: int = 32) -> tuple[Path, Path]:
    """scikit-learn digits saved as ``root/{train,test}/<digit>/<i>.png`` (grey, ``size`` px)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from ..data import DIGIT_NAMES

    d = load_digits()
    for split, count, skip in (("train", train_per_class, 0), ("test", test_per_class, train_per_class)):
        for c, name in enumerate(DIGIT_NAMES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            idx = np.flatnonzero(d.target == c)[skip : skip + count]
            for i in idx:
                im = Image.fromarray((d.images[i] * 255 / 16).astype("uint8")).resize((size, size))
                im.save(folder / f"{i}.png")
    return root / "train", root / "test"


def bare_loop(
    model: torch.nn.Module, train, hp: dict[str, Any], epochs: int, threads: int
) -> list[tuple[float, float]]:
    """The baseline: (wall, process CPU) seconds of each epoch of a plain training loop with the same augmentation."""
    from ..data import loader
    from ..train import cosine_with_warmup, mixup, randaugment

    torch.set_num_threads(threads)
    torch.manual_seed(hp["seed"])
    g = torch.Generator().manual_seed(hp["seed"])
    steps = math.ceil(len(train) / hp["batch_size"]) * epochs
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(steps, hp["warmup_steps"]))
    times = []
    model.train()
    for epoch in range(1, epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        for x, y in loader(train, hp["batch_size"], shuffle=True, seed=hp["seed"] * 1000 + epoch):
            x = randaugment(x, hp["randaug_n"], hp["randaug_m"], g)
            x, ya, yb, lam = mixup(x, y, hp["mixup_alpha"], g)
            logits = model(x)
            ls = hp["label_smoothing"]
            loss = lam * F.cross_entropy(logits, ya, label_smoothing=ls) + (1 - lam) * F.cross_entropy(
                logits, yb, label_smoothing=ls
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
            opt.step()
            sched.step()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def randaugment_share(train, hp: dict[str, Any], step_seconds: float, repeats: int = 3) -> dict[str, float]:
    """CPU seconds of RandAugment on one batch, and its share of one training step's CPU seconds."""
    from ..data import loader
    from ..train import randaugment

    x, _ = next(iter(loader(train, hp["batch_size"])))
    g = torch.Generator().manual_seed(0)
    randaugment(x, hp["randaug_n"], hp["randaug_m"], g)
    t0 = time.process_time()
    for _ in range(repeats):
        randaugment(x, hp["randaug_n"], hp["randaug_m"], g)
    secs = (time.process_time() - t0) / repeats
    return {"seconds_per_batch": round(secs, 4), "share_of_step": round(secs / step_seconds, 4)}


def measure(
    work: Path,
    batch_size: int = 16,
    train_per_class: int = 7,
    threads: int = 2,
    model_name: str = "ViT-B-32",
    epochs: int = 6,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the base and the folders under ``work``, run the trial and the bare loop, return the figures."""
    from ..config import ImageFolderData, ModelConfig, TuneSettings
    from ..data import DIGIT_NAMES, DIGIT_TEMPLATES, build_dataset
    from ..model import build_base, save_base
    from ..train import TrialContext, fine_tune, fresh_base

    work = Path(work)
    train_dir, test_dir = write_digit_folders(work / "data", train_per_class, 1)
    torch.manual_seed(0)
    names = sorted(DIGIT_NAMES)  # the image folders' class order
    base = build_base(ModelConfig(name=model_name, pretrained=None), names, DIGIT_TEMPLATES)
    save_base(base, work / "base")
    image_size = int(json.loads((work / "base" / "base.json").read_text())["image_size"])
    data = ImageFolderData(
        kind="imagefolder", train_dir=train_dir, test_dir=test_dir, heldout_fraction=0.15, classnames=names
    )
    bundle = build_dataset(data, image_size)
    if epochs < 3:
        raise ValueError("epochs must be at least 3: a warm-up epoch, a steady one and the last one")
    hp = dict(
        lr=1e-5,
        weight_decay=0.1,
        epochs=epochs,
        label_smoothing=0.1,
        mixup_alpha=0.2,
        randaug_n=2,
        randaug_m=9,
        batch_size=batch_size,
        warmup_steps=1,
        grad_clip=1.0,
        seed=0,
    )
    ctx = TrialContext(
        base_dir=str(work / "base"),
        data_json=data.model_dump_json(),
        threads=threads,
        eval_batch_size=64,
        checkpoint_interval_s=TuneSettings().checkpoint_interval_s,
    )  # what a sweep uses
    n_train, n_held = len(bundle.train), len(bundle.heldout)
    log(f"{model_name} at {image_size} px, {n_train} train / {n_held} held-out images, batch {batch_size}")

    marks: list[tuple[float, float]] = []
    checkpointed: list[bool] = []

    def on_report(metrics: dict, ckpt: str | None) -> None:
        marks.append((time.perf_counter(), time.process_time()))
        checkpointed.append(ckpt is not None)

    t_start, c_start = time.perf_counter(), time.process_time()
    fine_tune(hp, ctx, on_report)
    trial_total = time.perf_counter() - t_start
    starts = [(t_start, c_start)] + marks[:-1]
    epochs_trial = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(starts, marks, strict=True)]
    log(f"trial epochs: {', '.join(f'{w:.1f}s' for w, _ in epochs_trial)}")
    model, _ = fresh_base(ctx.base_dir)
    bare = bare_loop(model, bundle.train, hp, epochs - 1, threads)
    steady = slice(1, epochs - 1)  # epochs 2 .. E-1 of both
    n_steady = epochs - 2
    steady_trial = sum(w for w, _ in epochs_trial[steady])
    steady_trial_cpu = sum(c for _, c in epochs_trial[steady])
    steady_bare = sum(w for w, _ in bare[steady])
    steady_bare_cpu = sum(c for _, c in bare[steady])
    steps = math.ceil(n_train / batch_size)
    out = {
        "model": model_name,
        "image_size": image_size,
        "batch_size": batch_size,
        "threads": threads,
        "train_images": n_train,
        "heldout_images": n_held,
        "steps_per_epoch": steps,
        "hyperparameters": hp,
        "trial_epoch_seconds": [round(s[0], 3) for s in epochs_trial],
        "trial_epoch_cpu_seconds": [round(s[1], 3) for s in epochs_trial],
        "trial_total_seconds": round(trial_total, 3),
        "bare_epoch_seconds": [round(s[0], 3) for s in bare],
        "bare_epoch_cpu_seconds": [round(s[1], 3) for s in bare],
        "trial_epoch_checkpointed": checkpointed,
        "checkpoint_interval_s": ctx.checkpoint_interval_s,
        "steady_epochs": f"2..{epochs - 1}",
        "trial_steady_images_per_s": round(n_steady * n_train / steady_trial, 3),
        "bare_steady_images_per_s": round(n_steady * n_train / steady_bare, 3),
        "overhead_wall": round(steady_trial / steady_bare - 1, 4),
        "overhead": round(steady_trial_cpu / steady_bare_cpu - 1, 4),
        "overhead_measure": "process CPU seconds of the steady epoch (all threads), which other processes on a "
        "shared machine disturb far less than wall time; overhead_wall is the wall-clock one",
        "randaugment": randaugment_share(bundle.train, hp, steady_bare_cpu / (steps * n_steady)),
    }
    log(
        f"trial {out['trial_steady_images_per_s']} img/s, bare {out['bare_steady_images_per_s']} img/s (wall), "
        f"overhead {out['overhead']:.1%} (CPU seconds), {out['overhead_wall']:.1%} (wall); RandAugment {out['randaugment']['share_of_step']:.1%} of a step"
    )
    return out
