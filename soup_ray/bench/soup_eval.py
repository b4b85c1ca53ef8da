"""Held-out scoring speed of the soup keeper (``Kitchen``) against a plain evaluation loop of the same model and images.

Three ways of scoring the same weights on the whole held-out split, in one process, alternated:

- ``kitchen``: ``Kitchen.evaluate_weights`` (what the soup actor runs for every candidate soup:
  load the weights, score in the held-out order with early rejection off);
- ``plain``: the baseline, a bare loop over the decoded held-out tensor in batches of the same size
  under ``torch.inference_mode`` (``model(x[i:i+b]).argmax(1) == y``), the weights already loaded;
- ``previous``: the keeper's former path (the held-out set re-indexed into a new ``TensorDataset``
  per call, a ``DataLoader``, ``iter_logits`` under ``no_grad``), for the record.

All three must count the same correct images. Also timed: ``Kitchen.evaluate`` of a soup of
the run's ingredients (averaging + scoring), and an early-rejected evaluation.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def plain_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> int:
    """Correct count of a bare batched inference loop (the baseline)."""
    correct = 0
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(y), batch_size):
            xb = x[i : i + batch_size]
            xb = xb.float().div_(255) if xb.dtype == torch.uint8 else xb
            correct += int((model(xb).argmax(1) == y[i : i + batch_size]).sum())
    return correct


def previous_path(kitchen, model: torch.nn.Module) -> int:
    """The keeper's former scoring path, for the record."""
    from torch.utils.data import TensorDataset

    from ..evaluate import iter_logits
    from ..soup import early_rejection_evaluate

    order = kitchen.heldout_order().tolist()
    x, y = kitchen.heldout.tensors
    ds = TensorDataset(x[order], y[order])
    return early_rejection_evaluate(
        iter_logits(model, ds, kitchen.heldout_batch_size, kitchen.num_workers), None
    ).correct


def measure(
    run_dir: Path,
    repeats: int = 3,
    threads: int | None = None,
    with_previous: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score the run's first ingredient (or the base) every way ``repeats`` times; medians and the ratio."""
    from torch.utils.data import TensorDataset

    from ..ingredients import Kitchen, trial_records_from_results

    kitchen = Kitchen(Path(run_dir), threads=threads)
    records = trial_records_from_results(run_dir)
    ids: list[str] = []
    for r in records:
        kitchen.admit(r)
        ids.append(r.trial_id)
    state = {k: v.clone() for k, v in (kitchen.weights(ids[0]) if ids else kitchen.model.state_dict()).items()}
    x, y = kitchen.heldout_tensors()
    n, bs = len(y), kitchen.heldout_batch_size
    model = kitchen.model

    def t_kitchen() -> int:
        return kitchen.evaluate_weights(state).correct

    def t_plain() -> int:
        model.load_state_dict(state)
        return plain_loop(model, x, y, bs)

    def t_previous() -> int:
        model.load_state_dict(state)
        return previous_path(kitchen, model)

    modes: dict[str, Callable[[], int]] = {"kitchen": t_kitchen, "plain": t_plain}
    if with_previous and isinstance(kitchen.heldout, TensorDataset):
        modes["previous"] = t_previous
    for fn in modes.values():  # warm-up: first-call costs (allocations, decoding) out of the timings
        fn()
    secs: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    correct: dict[str, int] = {}
    for _ in range(repeats):
        for m, fn in modes.items():
            t0, c0 = time.perf_counter(), time.process_time()
            correct[m] = fn()
            secs[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    if len(set(correct.values())) != 1:
        raise AssertionError(f"the scorings disagree: {correct}")
    out: dict[str, Any] = {
        "heldout_images": n,
        "batch_size": bs,
        "device": kitchen.device,
        "image_size": int(x.shape[-1]),
        "correct": correct["kitchen"],
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
    }
    for m, ss in secs.items():
        out[m] = {
            "seconds": round(statistics.median(ss), 4),
            "seconds_all": [round(s, 4) for s in ss],
            "images_per_s": round(n / statistics.median(ss), 2),
            "cpu_seconds": round(statistics.median(cpu[m]), 4),
        }
    out["kitchen_over_plain_speed"] = round(out["kitchen"]["images_per_s"] / out["plain"]["images_per_s"], 3)
    out["kitchen_over_plain_speed_best"] = round(min(secs["plain"]) / min(secs["kitchen"]), 3)
    out["kitchen_over_plain_speed_cpu"] = round(out["plain"]["cpu_seconds"] / out["kitchen"]["cpu_seconds"], 3)
    if "previous" in out:
        out["kitchen_over_previous_speed"] = round(out["kitchen"]["images_per_s"] / out["previous"]["images_per_s"], 3)
    if ids:
        t0 = time.perf_counter()
        full = kitchen.evaluate(ids, None)
        out["soup_of_all_evaluate_s"] = round(time.perf_counter() - t0, 3)
        out["soup_ingredients"] = len(ids)
        t0 = time.perf_counter()
        early = kitchen.evaluate(ids, max(0, full.wrong // 4))
        out["early_rejection"] = {
            "max_wrong": max(0, full.wrong // 4),
            "evaluated": early.evaluated,
            "complete": early.complete,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    log(
        f"held-out {n} images, batch {bs}: kitchen {out['kitchen']['images_per_s']} img/s, plain "
        f"{out['plain']['images_per_s']} img/s, ratio {out['kitchen_over_plain_speed']}"
        + (f", previous {out['previous']['images_per_s']} img/s" if "previous" in out else "")
    )
    return out
