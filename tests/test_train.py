"""The trainable, called without Ray: per-epoch reports, checkpoint contents, divergence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from soup_ray.train import (
    CHECKPOINT_LOGITS,
    CHECKPOINT_METRICS,
    CHECKPOINT_WEIGHTS,
    TrialContext,
    cosine_with_warmup,
    fine_tune,
)
from soup_ray.trial_state import TrainingStateError, has_training_state

THREADS = torch.get_num_threads()  # the trials here train on the process's torch threads


TRAIN_SIZE = 300  # of the tiny config's ~900 train images: these tests check what a trial writes, not how well


def data_json(cfg) -> str:
    return cfg.data.model_copy(update={"train_size": TRAIN_SIZE}).model_dump_json()


def ctx_for(cfg, prep) -> TrialContext:
    return TrialContext(base_dir=str(prep.base_dir), data_json=data_json(cfg), threads=THREADS)


def hp(**kw):
    base = dict(
        lr=1e-3,
        weight_decay=0.1,
        epochs=2,
        label_smoothing=0.1,
        mixup_alpha=0.0,
        randaug_n=0,
        randaug_m=9,
        batch_size=64,
        warmup_steps=2,
        grad_clip=1.0,
        seed=0,
    )
    base.update(kw)
    return base


class Preempted(Exception):
    """Stands for the node going away right after a report."""


def recorder(tmp_path: Path, stop_after_epoch: int | None = None):
    """``(reports, report)``: a ``report`` callback that keeps each report's metrics and a copy of its folder."""
    reports = []

    def report(metrics, ckpt):
        saved = None
        if ckpt:
            saved = tmp_path / f"ckpt{len(reports)}"
            import shutil

            shutil.copytree(ckpt, saved)
        reports.append((dict(metrics), saved))
        if stop_after_epoch is not None and metrics["epoch"] == stop_after_epoch:
            raise Preempted

    return reports, report


def run_trial(cfg, prep, tmp_path: Path, resume_from=None, stop_after_epoch: int | None = None, **kw):
    reports, report = recorder(tmp_path, stop_after_epoch)

    try:
        final = fine_tune(hp(**kw), ctx_for(cfg, prep), report, resume_from=resume_from)
    finally:
        torch.set_num_threads(THREADS)  # fine_tune sets the process's torch threads: put them back
    return final, reports


@pytest.mark.parametrize("extra", [{}, {"mixup_alpha": 0.4, "randaug_n": 2, "randaug_m": 12, "seed": 3}])
def test_trial_reports_every_epoch_and_saves_a_checkpoint(prepared, tmp_path: Path, extra) -> None:
    cfg, prep = prepared
    final, reports = run_trial(cfg, prep, tmp_path, **extra)
    assert [r[0]["epoch"] for r in reports] == [1, 2]
    assert has_training_state(reports[0][1]) and not (reports[0][1] / CHECKPOINT_WEIGHTS).exists()
    assert reports[-1][1] is not None and (reports[-1][1] / CHECKPOINT_WEIGHTS).is_file()
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


def test_a_trial_scores_held_out_once_per_epoch_and_every_other_set_once(prepared, tmp_path: Path, monkeypatch) -> None:
    """The last epoch's held-out scores are the checkpoint's: the model is not scored on held-out again to save it."""
    import collections

    import soup_ray.train as train

    cfg, prep = prepared
    calls: collections.Counter[int] = collections.Counter()
    sizes: dict[int, int] = {}
    scored = train.predict_logits

    def counting(model, ds, *args, **kwargs):
        calls[id(ds)] += 1
        sizes[id(ds)] = len(ds)
        return scored(model, ds, *args, **kwargs)

    monkeypatch.setattr(train, "predict_logits", counting)
    final, _ = run_trial(cfg, prep, tmp_path, epochs=2)
    n_shifts = len(cfg.data.shifts)
    assert sorted(calls.values()) == [1] * (1 + n_shifts) + [2], calls  # test and each shift once, held-out twice
    heldout = next(k for k, n in calls.items() if n == 2)
    assert sizes[heldout] == len(prep.bundle.heldout)
    assert final["heldout_correct"] == round(final["heldout_acc"] * len(prep.bundle.heldout))


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
    assert not any(ckpt is not None and (ckpt / CHECKPOINT_WEIGHTS).exists() for _, ckpt in reports)
    assert reports[-1][0]["status"] == "diverged"


def test_cosine_schedule_warms_up_then_decays() -> None:
    f = cosine_with_warmup(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / CHECKPOINT_WEIGHTS), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow  # runs long on its own: the full suite only
def test_trial_killed_after_an_epoch_resumes_to_the_same_weights(prepared, tmp_path: Path) -> None:
    cfg, prep = prepared
    extra = {"mixup_alpha": 0.4, "randaug_n": 2, "randaug_m": 12, "seed": 3}  # every random draw of a step
    final, reports = run_trial(cfg, prep, tmp_path / "whole", epochs=2, **extra)
    with pytest.raises(Preempted):
        run_trial(cfg, prep, tmp_path / "cut", epochs=2, stop_after_epoch=1, **extra)
    epoch1 = tmp_path / "cut" / "ckpt0"
    assert has_training_state(epoch1)
    resumed, reports_cut = run_trial(cfg, prep, tmp_path / "resumed", resume_from=epoch1, epochs=2, **extra)
    assert [m["epoch"] for m, _ in reports_cut] == [2]  # epoch 1 is not trained again
    assert reports_cut[0][0]["resumed_from_epoch"] == 1
    a, b = load_weights(reports[-1][1]), load_weights(reports_cut[-1][1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["heldout_correct"] == final["heldout_correct"]


def test_resume_refuses_a_state_of_other_hyperparameters_or_a_damaged_one(prepared, tmp_path: Path) -> None:
    cfg, prep = prepared
    with pytest.raises(Preempted):
        run_trial(cfg, prep, tmp_path / "cut", epochs=2, stop_after_epoch=1)
    state = tmp_path / "cut" / "ckpt0"
    with pytest.raises(TrainingStateError, match="other hyperparameters"):
        run_trial(cfg, prep, tmp_path / "x", resume_from=state, epochs=2, lr=5e-3)
    tensors = state / "training_state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    with pytest.raises(TrainingStateError, match="cannot be read"):
        run_trial(cfg, prep, tmp_path / "y", resume_from=state, epochs=2)
    with pytest.raises(TrainingStateError, match="holds no training state"):
        run_trial(cfg, prep, tmp_path / "z", resume_from=tmp_path, epochs=2)


def test_a_trials_heldout_count_is_what_the_soup_keeper_scores_for_that_model(run_copy: Path, monkeypatch) -> None:
    """The greedy soup starts from a candidate's own held-out count and compares soup scores with it: both must
    be scored under the same precision. On a GPU a bf16 run scores both in bf16; here the one function that
    decides it is made to answer as on a GPU (bf16 on the CPU)."""
    from soup_ray import evaluate, ingredients
    from soup_ray.data import build_dataset
    from soup_ray.ingredients import Kitchen, trial_records_from_results
    from soup_ray.run_dir import RunDir
    from soup_ray.train import fresh_base, save_trial_checkpoint

    assert ingredients.scoring_autocast is evaluate.scoring_autocast  # one decision for trials and the keeper
    calls = []

    def as_on_a_gpu(device, precision):
        calls.append(precision)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    monkeypatch.setattr(evaluate, "scoring_autocast", as_on_a_gpu)
    monkeypatch.setattr(ingredients, "scoring_autocast", as_on_a_gpu)
    cfg = json.loads(RunDir(run_copy).config.read_text())
    cfg["model"]["precision"] = "bf16"
    RunDir(run_copy).config.write_text(json.dumps(cfg))
    record = trial_records_from_results(run_copy)[0]
    kitchen = Kitchen(run_copy)
    kitchen.admit(record)
    keeper_count = kitchen.evaluate([record.trial_id], None).correct
    assert calls == ["bf16"] * len(calls) and calls
    ctx = TrialContext(
        base_dir=str(RunDir(run_copy).base),
        data_json=kitchen.config.data.model_dump_json(),
        threads=1,
        precision="bf16",
    )
    model, meta = fresh_base(ctx.base_dir)
    model.load_state_dict(kitchen.weights(record.trial_id))
    bundle = build_dataset(kitchen.config.data, int(meta["image_size"]))
    calls.clear()
    (run_copy / "again").mkdir()
    final = save_trial_checkpoint(run_copy / "again", model, bundle, ctx, {"seed": 0}, meta, {})
    assert "bf16" in calls  # the trial's held-out score went through the same decision
    assert final["heldout_correct"] == keeper_count


def test_a_rung_reports_a_resumable_soup_candidate_scored_against_the_published_soup(
    prepared, run_copy: Path, tmp_path: Path
) -> None:
    """At a rung the trial reports one folder that is both a soup candidate and a resumable state, with the
    soup signals checked here against the published soup by plain tensor arithmetic and a plain forward loop;
    the rungs and the kept epochs change nothing in the training (a replay of the recording is exact)."""
    from soup_ray.export import export_soup
    from soup_ray.ingredients import trial_records_from_results
    from soup_ray.model import load_base
    from soup_ray.run_dir import RunDir

    cfg, prep = prepared
    paths = RunDir(run_copy)
    ids = [r.trial_id for r in trial_records_from_results(run_copy)][:2]
    parts = [load_weights(run_copy / "trials" / t) for t in ids]
    soup = {k: (parts[0][k] + parts[1][k]) / 2 if parts[0][k].is_floating_point() else parts[0][k] for k in parts[0]}
    info = {"version": 1, "ingredients": ids}
    export_soup(paths.base, soup, paths.version(1), info)
    export_soup(paths.base, soup, paths.soup, info)

    reports, report = recorder(tmp_path)
    ctx = TrialContext(
        base_dir=str(prep.base_dir),
        data_json=data_json(cfg),
        threads=THREADS,
        rungs=(1, 3),  # 3 is past the trial's last epoch: never a rung
        soup_run_dir=str(run_copy),
    )
    try:
        final = fine_tune(hp(epochs=2, lr=3e-3), ctx, report, epoch_candidates=tmp_path / "kept")
    finally:
        torch.set_num_threads(THREADS)
    (rung, folder), (last, last_folder) = reports
    assert rung["status"] == "candidate" and rung["rung"] == 1 and rung["epoch"] == 1
    assert has_training_state(folder) and (folder / "logits.safetensors").is_file()
    assert {"test_acc", "shift_mean_acc", "heldout_correct"} <= set(rung)
    assert last["status"] == "completed" and "rung" not in last and final["epoch"] == 2

    # the oracle: the soup and the soup plus the rung weights, scored by a plain loop over the held-out images
    clf, _ = load_base(prep.base_dir)
    cand = load_weights(folder)
    mixed = {k: soup[k] * (1 - 1 / 3) + cand[k] * (1 / 3) if soup[k].is_floating_point() else soup[k] for k in soup}
    heldout = prep.bundle.heldout

    def correct(state) -> int:
        clf.load_state_dict(state)
        clf.eval()
        hits = 0
        with torch.no_grad():
            for i in range(0, len(heldout), 100):
                xs, ys = zip(*(heldout[j] for j in range(i, min(i + 100, len(heldout)))), strict=True)
                hits += int((clf(torch.stack(xs)).argmax(1) == torch.as_tensor(ys)).sum())
        return hits

    assert rung["soup_size"] == 2 and rung["soup_version"] == 1
    assert rung["soup_heldout_correct"] == correct(soup)
    assert rung["soup_with_trial_correct"] == correct(mixed)
    assert rung["soup_gain"] == rung["soup_with_trial_correct"] - rung["soup_heldout_correct"]

    # every epoch kept: epoch 1's weights (and its held-out count), epoch 2's whole candidate
    kept1, kept2 = tmp_path / "kept" / "e001", tmp_path / "kept" / "e002"
    w1 = load_weights(kept1)
    assert all(torch.equal(w1[k], cand[k]) for k in cand)
    assert json.loads((kept1 / "metrics.json").read_text())["heldout_correct"] == rung["heldout_correct"]
    assert (kept2 / "logits.safetensors").is_file()
    # the same trial without rungs or kept epochs ends with the same weights
    _, plain = run_trial(cfg, prep, tmp_path / "plain", epochs=2, lr=3e-3)
    a, b, c = load_weights(plain[-1][1]), load_weights(last_folder), load_weights(kept2)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_a_rung_without_a_published_soup_says_so_and_goes_on(prepared, tmp_path: Path) -> None:
    from soup_ray.soup_view import rung_signals
    from soup_ray.train import fresh_base

    cfg, prep = prepared
    model, _ = fresh_base(str(prep.base_dir))
    assert rung_signals(model, tmp_path, prep.bundle.heldout) == {"soup_size": 0}
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "soup.json").write_text(json.dumps({"version": 3, "ingredients": ["a"]}))
    broken = rung_signals(model, tmp_path, prep.bundle.heldout)
    assert broken["soup_size"] == 0 and broken["soup_error"]
