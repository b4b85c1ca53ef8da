"""The trainable, called without Ray: per-epoch reports, checkpoint contents, divergence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from soup_ray.train import CHECKPOINT_LOGITS, CHECKPOINT_METRICS, CHECKPOINT_WEIGHTS, TrialContext, cosine_with_warmup, fine_tune


def ctx_for(cfg, prep) -> TrialContext:
    return TrialContext(base_dir=str(prep.base_dir), data_json=cfg.data.model_dump_json(), data_kind="digits", threads=1)


def hp(**kw):
    base = dict(lr=1e-3, weight_decay=0.1, epochs=2, label_smoothing=0.1, mixup_alpha=0.0, randaug_n=0,
                randaug_m=9, batch_size=64, warmup_steps=2, grad_clip=1.0, seed=0)
    base.update(kw)
    return base


def run_trial(cfg, prep, tmp_path: Path, **kw):
    reports = []

    def report(metrics, ckpt):
        saved = None
        if ckpt:
            saved = tmp_path / f"ckpt{len(reports)}"
            import shutil

            shutil.copytree(ckpt, saved)
        reports.append((dict(metrics), saved))

    final = fine_tune(hp(**kw), ctx_for(cfg, prep), report)
    return final, reports


@pytest.mark.parametrize("extra", [{}, {"mixup_alpha": 0.4, "randaug_n": 2, "randaug_m": 12, "seed": 3}])
def test_trial_reports_every_epoch_and_saves_a_checkpoint(prepared, tmp_path: Path, extra) -> None:
    cfg, prep = prepared
    final, reports = run_trial(cfg, prep, tmp_path, **extra)
    assert [r[0]["epoch"] for r in reports] == [1, 2]
    assert reports[0][1] is None and reports[-1][1] is not None
    assert final["status"] == "completed"
    for key in ("heldout_acc", "test_acc", "shift_rotate_acc", "shift_noise_acc", "shift_mean_acc"):
        assert 0.0 <= final[key] <= 1.0
    ckpt = reports[-1][1]
    with safe_open(str(ckpt / CHECKPOINT_WEIGHTS), "pt") as f:
        meta = f.metadata()
        weights = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["base_fingerprint"] == prep.fingerprint
    assert json.loads(meta["hyperparameters"])["lr"] == pytest.approx(1e-3)
    assert json.loads(meta["classnames"]) == prep.bundle.classnames
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    with safe_open(str(ckpt / CHECKPOINT_LOGITS), "pt") as f:
        keys = set(f.keys())
        test_logits = f.get_tensor("test")
        test_labels = f.get_tensor("test.labels")
    assert {"heldout", "test", "rotate", "noise", "heldout.labels"} <= keys
    assert test_logits.shape == (len(prep.bundle.test), 10)
    acc = (test_logits.argmax(1) == test_labels).float().mean().item()
    assert acc == pytest.approx(final["test_acc"])
    assert json.loads((ckpt / CHECKPOINT_METRICS).read_text())["heldout_correct"] == final["heldout_correct"]


def test_same_seed_same_model(prepared, tmp_path: Path) -> None:
    cfg, prep = prepared
    a, _ = run_trial(cfg, prep, tmp_path / "a", epochs=1)
    b, _ = run_trial(cfg, prep, tmp_path / "b", epochs=1)
    assert a["heldout_correct"] == b["heldout_correct"] and a["test_acc"] == b["test_acc"]


def test_diverged_trial_ends_cleanly_without_checkpoint(prepared, tmp_path: Path) -> None:
    cfg, prep = prepared
    final, reports = run_trial(cfg, prep, tmp_path, lr=1e30, warmup_steps=0, epochs=3)
    assert final["status"] == "diverged"
    assert final["heldout_acc"] == 0.0
    assert all(ckpt is None for _, ckpt in reports)
    assert reports[-1][0]["status"] == "diverged"


def test_cosine_schedule_warms_up_then_decays() -> None:
    f = cosine_with_warmup(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))
