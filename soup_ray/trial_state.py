"""A trial's resumable training state: weights, optimizer, schedule and random generators after an epoch.

Written into the per-epoch checkpoint folder Tune keeps for a trial, so a trial
killed after epoch k (a preempted node) resumes at epoch k+1 and ends with the
same weights as one that was never interrupted (same seed, on CPU). Tensors go
to ``training_state.safetensors``; the rest (epoch, optimizer groups, schedule
counters, hyperparameters, base fingerprint) to ``training_state.json``. Nothing
is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .run_dir import TRAINING_STATE_JSON, TRAINING_STATE_TENSORS

FORMAT_VERSION = 1


class TrainingStateError(ValueError):
    """A training-state checkpoint that cannot resume this trial (named reason)."""


@dataclass
class Resumed:
    """What a restored training state says about where the trial was."""

    epoch: int
    metrics: dict[str, Any]


def has_training_state(folder: Path | str) -> bool:
    """Whether ``folder`` holds a resumable training state."""
    folder = Path(folder)
    return (folder / TRAINING_STATE_JSON).is_file() and (folder / TRAINING_STATE_TENSORS).is_file()


def save_training_state(
    folder: Path,
    *,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    hyperparameters: dict[str, Any],
    base_fingerprint: str,
    metrics: dict[str, Any],
) -> None:
    """Write the state after ``epoch`` into ``folder`` (safetensors for tensors, JSON for the rest)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    opt_state = optimizer.state_dict()
    slots: dict[str, list[str]] = {}
    for idx, per_param in opt_state["state"].items():
        slots[str(idx)] = []
        for name, value in per_param.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            slots[str(idx)].append(name)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator.get_state()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / TRAINING_STATE_TENSORS))
    sched_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    doc = {
        "format": FORMAT_VERSION,
        "epoch": epoch,
        "optimizer_param_groups": opt_state["param_groups"],
        "optimizer_slots": slots,
        "scheduler": sched_state,
        "hyperparameters": hyperparameters,
        "base_fingerprint": base_fingerprint,
        "metrics": metrics,
    }
    (folder / TRAINING_STATE_JSON).write_text(json.dumps(doc, indent=1))


def restore_training_state(
    folder: Path | str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    hyperparameters: dict[str, Any],
    base_fingerprint: str,
) -> Resumed:
    """Load the state in ``folder`` into the given objects; raises ``TrainingStateError`` naming what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not has_training_state(folder):
        raise TrainingStateError(
            f"{folder} holds no training state ({TRAINING_STATE_JSON} and "
            f"{TRAINING_STATE_TENSORS}): it is not a per-epoch checkpoint of soup-ray"
        )
    try:
        doc = json.loads((folder / TRAINING_STATE_JSON).read_text())
    except ValueError as err:
        raise TrainingStateError(f"{folder / TRAINING_STATE_JSON} is not valid JSON ({err})") from None
    if doc.get("format") != FORMAT_VERSION:
        raise TrainingStateError(
            f"{folder} has training-state format {doc.get('format')!r}, this version reads "
            f"{FORMAT_VERSION}: start the trial afresh"
        )
    if doc.get("base_fingerprint") != base_fingerprint:
        raise TrainingStateError(
            f"{folder} was trained from another base ({doc.get('base_fingerprint')}, this run's "
            f"is {base_fingerprint}): resume it in the run folder it came from"
        )
    if doc.get("hyperparameters") != json.loads(json.dumps(hyperparameters)):
        raise TrainingStateError(
            f"{folder} was written with other hyperparameters ({doc.get('hyperparameters')}) "
            f"than this trial's ({hyperparameters})"
        )
    try:
        tensors = load_file(str(folder / TRAINING_STATE_TENSORS))
    except (SafetensorError, OSError) as err:
        raise TrainingStateError(
            f"{folder / TRAINING_STATE_TENSORS} cannot be read ({err}): the checkpoint is "
            "damaged; Tune falls back to an older one or restarts the trial"
        ) from None
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    missing = set(model.state_dict()) ^ set(weights)
    if missing:
        raise TrainingStateError(
            f"{folder} does not match this model: {len(missing)} key(s) differ, e.g. {sorted(missing)[:3]}"
        )
    model.load_state_dict(weights, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for idx, names in doc["optimizer_slots"].items():
        state[int(idx)] = {name: tensors[f"optim.{idx}.{name}"] for name in names}
    optimizer.load_state_dict({"state": state, "param_groups": doc["optimizer_param_groups"]})
    sched = scheduler.state_dict()
    sched.update(doc["scheduler"])
    scheduler.load_state_dict(sched)
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    return Resumed(epoch=int(doc["epoch"]), metrics=dict(doc.get("metrics") or {}))
