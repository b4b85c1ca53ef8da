"""The Ray Tune trainable: fine-tune the shared base with one hyperparameter draw.

Every trial loads the same saved base weights, trains with AdamW, a cosine
schedule with linear warm-up, gradient-norm clipping, label smoothing, mixup and
RandAugment, reports held-out accuracy after every epoch with
``ray.tune.report``, and ends with a safetensors checkpoint (carrying the base
fingerprint, the hyperparameters and the class names) plus cached logits on the
held-out, test and shift sets for the ensemble baselines. A trial whose loss
becomes NaN or inf reports ``status: diverged`` and ends without a checkpoint
instead of crashing the sweep.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import DataConfig, DigitsData, ImageFolderData
from .data import build_dataset, loader
from .evaluate import accuracy, correct_count, pick_device, predict_logits
from .model import CLIPClassifier, load_base
from .run_dir import BASE_META, CHECKPOINT_LOGITS, CHECKPOINT_METRICS
from .run_dir import WEIGHTS_FILE as CHECKPOINT_WEIGHTS
from .trial_state import restore_training_state, save_training_state

HYPERPARAMETERS = (
    "lr",
    "weight_decay",
    "epochs",
    "label_smoothing",
    "mixup_alpha",
    "randaug_n",
    "randaug_m",
    "batch_size",
    "warmup_steps",
    "grad_clip",
    "seed",
)


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its hyperparameters (small and picklable)."""

    base_dir: str
    data_json: str
    eval_batch_size: int = 256
    threads: int = 1
    precision: str = "fp32"
    gpus: float = 0.0  # GPUs Ray gave the trial; > 0 trains on CUDA when one is visible
    num_workers: int = 0  # data-loading processes (image folders on a cluster)
    checkpoint_interval_s: float = 0.0  # a resumable state after an epoch once this long since the last one
    rungs: tuple[int, ...] = ()  # epochs at which a scheduler may stop the trial: each reports a soup candidate
    soup_run_dir: str | None = None  # tune.scheduler soup: the run whose published soup a rung is scored against
    epochs_dir: str | None = None  # tune.keep_epoch_candidates: every epoch's candidate under epochs_dir/TRIAL/

    def data_config(self) -> DigitsData | ImageFolderData:
        from pydantic import TypeAdapter

        return TypeAdapter(DataConfig).validate_json(self.data_json)


@functools.lru_cache(maxsize=2)
def _base_cached(base_dir: str) -> tuple[CLIPClassifier, dict]:
    return load_base(Path(base_dir))


def fresh_base(base_dir: str) -> tuple[CLIPClassifier, dict]:
    """A new copy of the saved base classifier (loaded from disk once per process)."""
    import copy

    clf, meta = _base_cached(base_dir)
    return copy.deepcopy(clf), meta


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    warm = max(0, min(warmup_steps, total_steps - 1))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def randaugment(images: torch.Tensor, n: int, m: int, g: torch.Generator) -> torch.Tensor:
    """RandAugment (N ops of magnitude M out of 30) applied image by image; N=0 is off."""
    if n <= 0:
        return images
    from torchvision.transforms import v2

    aug = v2.RandAugment(num_ops=n, magnitude=m, num_magnitude_bins=31)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    torch.manual_seed(seed)  # torchvision draws from the global generator
    u8 = (images * 255).round().to(torch.uint8)
    out = torch.stack([aug(img) for img in u8])
    return out.float() / 255.0


def mixup(
    images: torch.Tensor, labels: torch.Tensor, alpha: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup: a convex mix of the batch with a permutation of itself, Beta(alpha, alpha) weight."""
    if alpha <= 0:
        return images, labels, labels, 1.0
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(images), generator=g)
    return lam * images + (1 - lam) * images[perm], labels, labels[perm], lam


def _hp(config: dict[str, Any]) -> dict[str, Any]:
    hp = {k: config[k] for k in HYPERPARAMETERS if k in config}
    hp["epochs"] = int(hp["epochs"])
    hp["batch_size"] = int(hp["batch_size"])
    hp["randaug_n"] = int(hp.get("randaug_n", 0))
    hp["randaug_m"] = int(hp.get("randaug_m", 0))
    hp["warmup_steps"] = int(hp.get("warmup_steps", 0))
    hp["seed"] = int(hp.get("seed", 0))
    return hp


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    hp: dict[str, Any],
    g: torch.Generator,
    autocast: Any,
    device: str = "cpu",
) -> torch.Tensor:
    """One optimisation step: RandAugment, mixup, forward, label-smoothed cross-entropy, clip, AdamW and schedule.

    Returns the (detached) loss. A non-finite loss is returned before any update:
    the weights stay as they were and the caller decides what diverging means.
    """
    x = randaugment(x, hp["randaug_n"], hp["randaug_m"], g)
    x, ya, yb, lam = mixup(x, y, float(hp.get("mixup_alpha", 0.0)), g)
    x, ya, yb = x.to(device, non_blocking=True), ya.to(device), yb.to(device)
    with autocast:
        logits = model(x).float()
    ls = float(hp.get("label_smoothing", 0.0))
    loss = lam * F.cross_entropy(logits, ya, label_smoothing=ls) + (1 - lam) * F.cross_entropy(
        logits, yb, label_smoothing=ls
    )
    if not torch.isfinite(loss):
        return loss.detach()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(hp.get("grad_clip", 1.0)))
    opt.step()
    sched.step()
    return loss.detach()


def fine_tune(
    config: dict[str, Any],
    ctx: TrialContext,
    report: Callable[[dict[str, Any], str | None], None],
    resume_from: str | Path | None = None,
    epoch_candidates: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune one model; ``report(metrics, checkpoint_dir)`` is called after every epoch.

    Every epoch but the last reports a resumable training state (``trial_state``);
    the last reports the soup candidate (weights, cached logits, metrics).
    A rung epoch (``ctx.rungs``, where a scheduler may stop the trial) reports
    both in one folder, with ``status: candidate`` and the candidate's scores
    (and, with ``ctx.soup_run_dir``, the :mod:`soup_view` signals), so a trial
    stopped there leaves a soup candidate like a finished one.
    ``epoch_candidates`` (a folder) keeps every epoch's candidate as ``eNNN/``.
    ``resume_from`` (a folder an earlier epoch reported) continues after that
    epoch and ends with the same weights as an uninterrupted run.
    Plain Python (no Ray): the Tune trainable and the tests both call it.
    Returns the final metrics.
    """
    torch.set_num_threads(max(1, ctx.threads))
    hp = _hp(config)
    torch.manual_seed(hp["seed"])
    g = torch.Generator().manual_seed(hp["seed"])
    bundle = build_dataset(ctx.data_config(), _image_size(ctx))
    model, meta = fresh_base(ctx.base_dir)
    device = pick_device(ctx.gpus)
    model.to(device)
    steps_per_epoch = math.ceil(len(bundle.train) / hp["batch_size"])
    total = steps_per_epoch * hp["epochs"]
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, hp["warmup_steps"]))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=ctx.precision == "bf16")
    t0 = time.time()
    metrics: dict[str, Any] = {}
    first_epoch = 1
    if resume_from is not None:
        resumed = restore_training_state(
            resume_from,
            model=model,
            optimizer=opt,
            scheduler=sched,
            generator=g,
            hyperparameters=hp,
            base_fingerprint=meta["fingerprint"],
        )
        first_epoch, metrics = resumed.epoch + 1, resumed.metrics
        t0 -= float(metrics.get("seconds", 0.0))
    last_checkpoint = time.time()

    def save_state(folder: Path, epoch: int, metrics: dict[str, Any]) -> None:
        save_training_state(
            folder,
            epoch=epoch,
            model=model,
            optimizer=opt,
            scheduler=sched,
            generator=g,
            hyperparameters=hp,
            base_fingerprint=meta["fingerprint"],
            metrics=metrics,
        )

    scored: tuple[torch.Tensor, torch.Tensor] | None = None  # this epoch's held-out logits and labels
    for epoch in range(first_epoch, hp["epochs"] + 1):
        model.train()
        losses = []
        batches = loader(
            bundle.train, hp["batch_size"], shuffle=True, seed=hp["seed"] * 1000 + epoch, num_workers=ctx.num_workers
        )
        for x, y in batches:
            loss = train_step(model, opt, sched, x, y, hp, g, autocast, device)
            if not torch.isfinite(loss):
                metrics = {
                    "epoch": epoch,
                    "heldout_acc": 0.0,
                    "train_loss": float("nan"),
                    "status": "diverged",
                    "diverged_at_step": len(losses) + (epoch - 1) * steps_per_epoch,
                    "seconds": time.time() - t0,
                }
                report(metrics, None)
                return metrics
            losses.append(float(loss))
        held_logits, held_labels = predict_logits(
            model, bundle.heldout, ctx.eval_batch_size, ctx.num_workers, ctx.precision
        )
        scored = (held_logits, held_labels)
        metrics = {
            "epoch": epoch,
            "heldout_acc": accuracy(held_logits, held_labels),
            "train_loss": sum(losses) / len(losses),
            "status": "running",
            "seconds": time.time() - t0,
            "resumed_from_epoch": first_epoch - 1,
        }
        rung = epoch < hp["epochs"] and epoch in ctx.rungs
        if epoch_candidates is not None and epoch < hp["epochs"]:
            # the weights and held-out count of this epoch, for replaying schedulers (the final epoch's whole
            # candidate is copied below)
            held = {**metrics, "heldout_correct": correct_count(held_logits, held_labels), "status": "candidate"}
            with tempfile.TemporaryDirectory(prefix="soup-ray-epoch-") as tmp:
                save_candidate_weights(Path(tmp), model, hp, meta, held)
                _keep_copy(Path(tmp), Path(epoch_candidates) / f"e{epoch:03d}")
        if rung:
            with tempfile.TemporaryDirectory(prefix="soup-ray-candidate-") as tmp:
                candidate = save_trial_checkpoint(
                    Path(tmp), model, bundle, ctx, hp, meta, metrics, status="candidate", heldout=scored
                )
                save_state(Path(tmp), epoch, metrics)
                candidate["rung"] = epoch
                if ctx.soup_run_dir:
                    from .soup_view import rung_signals

                    candidate.update(
                        rung_signals(model, Path(ctx.soup_run_dir), bundle.heldout, ctx.eval_batch_size, ctx.precision)
                    )
                last_checkpoint = time.time()
                report({**candidate, "seconds": time.time() - t0}, tmp)
                continue
        if epoch < hp["epochs"] and time.time() - last_checkpoint < ctx.checkpoint_interval_s:
            report(metrics, None)
        elif epoch < hp["epochs"]:
            last_checkpoint = time.time()
            with tempfile.TemporaryDirectory(prefix="soup-ray-epoch-") as tmp:
                save_state(Path(tmp), epoch, metrics)
                report(metrics, tmp)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        metrics.update(status="diverged", heldout_acc=0.0)
        report(metrics, None)
        return metrics
    with tempfile.TemporaryDirectory(prefix="soup-ray-ckpt-") as tmp:
        final = save_trial_checkpoint(Path(tmp), model, bundle, ctx, hp, meta, metrics, heldout=scored)
        if epoch_candidates is not None:
            _keep_copy(Path(tmp), Path(epoch_candidates) / f"e{int(final['epoch']):03d}")
        report(final, tmp)
    return final


def _keep_copy(src: Path, dst: Path) -> None:
    """Copy a candidate folder to ``dst`` whole (built aside, then renamed: a reader never sees half of it)."""
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def finished_result(folder: str | Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The final metrics a finished trial reported with the checkpoint in ``folder`` (what
    :func:`save_trial_checkpoint` returned), or None when ``folder`` holds no final checkpoint of a trial with
    these hyperparameters (a resumable state, another trial's checkpoint, an unreadable one)."""
    folder = Path(folder)
    try:
        saved = json.loads((folder / CHECKPOINT_METRICS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("status") != "completed" or not (folder / CHECKPOINT_WEIGHTS).is_file():
        return None
    if saved.get("hyperparameters") != _hp(config):
        return None
    return {k: v for k, v in saved.items() if k not in ("hyperparameters", "base_fingerprint")}


def save_trial_checkpoint(
    out: Path,
    model: CLIPClassifier,
    bundle,
    ctx: TrialContext,
    hp: dict,
    meta: dict,
    metrics: dict,
    status: str = "completed",
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """Write weights, cached logits and metrics of a soup candidate into ``out``; returns its metrics.

    ``status`` is ``completed`` for a finished trial, ``candidate`` for an epoch before the last (a rung).
    ``heldout`` is ``(logits, labels)`` of this model on held-out when the caller has just scored it (at
    ``ctx.precision``): the epoch's own scores, so held-out is not scored twice.
    """
    from safetensors.torch import save_file

    logits: dict[str, torch.Tensor] = {}
    final = dict(metrics, status=status)
    for name, ds in bundle.eval_sets().items():
        if name == "heldout" and heldout is not None:
            lg, lb = heldout
        else:
            # held-out at ctx.precision, as the soup keeper scores soups (evaluate.scoring_autocast): greedy compares them
            lg, lb = predict_logits(
                model, ds, ctx.eval_batch_size, ctx.num_workers, ctx.precision if name == "heldout" else "fp32"
            )
        logits[f"{name}"] = lg.contiguous()
        logits[f"{name}.labels"] = lb.contiguous()
        key = "heldout_acc" if name == "heldout" else ("test_acc" if name == "test" else f"shift_{name}_acc")
        final[key] = accuracy(lg, lb)
        if name == "heldout":
            final["heldout_correct"] = correct_count(lg, lb)
    shift_keys = [k for k in final if k.startswith("shift_")]
    final["shift_mean_acc"] = sum(final[k] for k in shift_keys) / len(shift_keys) if shift_keys else float("nan")
    save_file(logits, str(out / CHECKPOINT_LOGITS))
    save_candidate_weights(out, model, hp, meta, final)
    return final


def save_candidate_weights(out: Path, model: CLIPClassifier, hp: dict, meta: dict, metrics: dict) -> None:
    """The weights (safetensors, with the base fingerprint) and ``metrics.json`` of a soup candidate."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(
        state,
        str(out / CHECKPOINT_WEIGHTS),
        metadata={
            "base_fingerprint": meta["fingerprint"],
            "hyperparameters": json.dumps(hp),
            "classnames": json.dumps(meta["classnames"]),
        },
    )
    (out / CHECKPOINT_METRICS).write_text(
        json.dumps({"hyperparameters": hp, "base_fingerprint": meta["fingerprint"], **metrics}, indent=2)
    )


def _image_size(ctx: TrialContext) -> int:
    return int(json.loads((Path(ctx.base_dir) / BASE_META).read_text())["image_size"])
