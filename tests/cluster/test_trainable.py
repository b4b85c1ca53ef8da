"""The Tune trainable's entry point with a stand-in for ``ray.tune``: what it does with the checkpoint Tune restores."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from soup_ray.ingredients import trial_records_from_results
from soup_ray.train import TrialContext


class FakeCheckpoint:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)

    @classmethod
    def from_directory(cls, path: Path | str) -> FakeCheckpoint:
        return cls(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def fake_tune(restored: Path | None, reports: list) -> SimpleNamespace:
    return SimpleNamespace(
        get_checkpoint=lambda: FakeCheckpoint(restored) if restored else None,
        Checkpoint=FakeCheckpoint,
        report=lambda metrics, checkpoint=None: reports.append((dict(metrics), checkpoint)),
    )


def test_a_trial_restarted_after_its_final_checkpoint_reports_it_again_without_training(
    run_copy: Path, monkeypatch
) -> None:
    """Retraining from epoch 1 would waste the trial and let Tune delete the final checkpoint the soup uses."""
    from soup_ray.cluster import trainable

    folder = Path(trial_records_from_results(run_copy)[0].checkpoint)  # a finished trial's checkpoint
    saved = json.loads((folder / "metrics.json").read_text())
    reports: list = []
    monkeypatch.setattr(trainable, "tune", fake_tune(folder, reports))
    monkeypatch.setattr(trainable, "fine_tune", lambda *a, **k: pytest.fail("a finished trial was trained again"))
    ctx = TrialContext(base_dir=str(run_copy / "base"), data_json="{}")
    trainable.tune_trainable(dict(saved["hyperparameters"]), ctx)
    assert len(reports) == 1
    metrics, checkpoint = reports[0]
    assert metrics["status"] == "completed" and metrics["heldout_correct"] == saved["heldout_correct"]
    assert metrics["test_acc"] == saved["test_acc"] and "hyperparameters" not in metrics
    assert checkpoint is not None and Path(checkpoint.path) == folder


def test_a_final_checkpoint_of_other_hyperparameters_is_not_taken_for_this_trial(run_copy: Path, monkeypatch) -> None:
    from soup_ray.cluster import trainable

    folder = Path(trial_records_from_results(run_copy)[0].checkpoint)
    saved = json.loads((folder / "metrics.json").read_text())
    trained: list = []
    monkeypatch.setattr(trainable, "tune", fake_tune(folder, []))
    monkeypatch.setattr(trainable, "fine_tune", lambda config, ctx, report, **kw: trained.append(config))
    ctx = TrialContext(base_dir=str(run_copy / "base"), data_json="{}")
    other = {**saved["hyperparameters"], "lr": saved["hyperparameters"]["lr"] * 2}
    trainable.tune_trainable(other, ctx)
    assert trained == [other]  # nothing to resume: trained afresh, as before
