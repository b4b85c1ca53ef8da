"""Replaying schedulers against a recorded sweep: made here without Ray from three real tiny trials."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soup_ray.bench.soup_aware import Lab, NotARecording, cid, load_recording, replay, rung_epochs
from soup_ray.results import trial_row, write_jsonl

pytestmark = pytest.mark.slow  # trains three small trials


@pytest.fixture(scope="module")
def recording(prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `tune.keep_epoch_candidates` leaves it: three trials of 3, 2 and 3 epochs, the middle one
    with a learning rate that wrecks it."""
    from soup_ray.train import TrialContext, fine_tune

    cfg, prep = prepared
    run = tmp_path_factory.mktemp("recording") / "run"
    shutil.copytree(prep.run_dir, run)
    data = cfg.data.model_copy(update={"train_size": 300})
    threads = torch.get_num_threads()
    ctx = TrialContext(base_dir=str(run / "base"), data_json=data.model_dump_json(), threads=threads)
    rows = []
    for i, (lr, epochs) in enumerate([(1e-3, 3), (0.5, 2), (2e-3, 3)]):
        hp = dict(lr=lr, weight_decay=0.1, epochs=epochs, batch_size=64, warmup_steps=2, grad_clip=1.0, seed=i)
        tid = f"t{i}"
        try:
            final = fine_tune(hp, ctx, lambda m, c: None, epoch_candidates=run / "epochs" / tid)
        finally:
            torch.set_num_threads(threads)
        rows.append(trial_row(tid, final, hp, None, ["rotate", "noise"]))
    write_jsonl(run / "results.jsonl", rows)
    return run


def test_fifo_replay_is_the_recorded_sweep(recording: Path) -> None:
    rec = load_recording(recording, slots=2)
    assert [t.trial_id for t in rec.tapes] == ["t0", "t1", "t2"] and [t.ran for t in rec.tapes] == [3, 2, 3]
    assert all(s > 0 for t in rec.tapes for s in t.seconds)
    lab = Lab(rec)
    out = replay(lab, "fifo")
    assert out["trial_epochs"] == 8 and out["stopped"] == 0 and out["soup_judgements"] == 0
    # the simulated wall: t0 and t1 start together, t2 takes the slot of whichever ends first (the recorded
    # epochs' seconds decide which: t1 has fewer epochs, but on a busy machine t0's can be shorter)
    t0, t1, t2 = (sum(t.seconds) for t in rec.tapes)
    assert out["simulated_wall_s"] == pytest.approx(round(max(t0, t1, min(t0, t1) + t2), 1))
    # its soup is the greedy soup of the final epochs, scored by the keeper's own evaluation
    assert set(out["soup"]) <= {cid("t0", 3), cid("t1", 2), cid("t2", 3)} and cid("t1", 2) not in out["soup"]
    assert 0 < out["test"] <= 1 and out["ingredients"] == len(out["soup"])


def test_soup_replay_stops_the_wrecked_trial_at_its_rung_with_that_epochs_weights(recording: Path) -> None:
    lab = Lab(load_recording(recording, slots=1))  # one at a time: t0's soup exists when t1 reaches epoch 1
    assert rung_epochs(3, 1, 2.0) == [1, 2]
    out = replay(lab, "soup", rf=2.0, margin=0)
    first = [d for d in out["decisions"] if d["trial_id"] == "t0"]
    assert first and all(d["decision"] == "CONTINUE" and d["soup_size"] == 0 for d in first)
    wrecked = [d for d in out["decisions"] if d["trial_id"] == "t1"]
    assert [(d["epoch"], d["decision"], d["soup_size"]) for d in wrecked] == [(1, "STOP", 1)]
    assert wrecked[0]["soup_gain"] < 0
    t2_stop = [d["epoch"] for d in out["decisions"] if d["trial_id"] == "t2" and d["decision"] == "STOP"]
    assert out["trial_epochs"] == 3 + 1 + (t2_stop[0] if t2_stop else 3)
    assert out["stopped"] == 1 + len(t2_stop) and out["soup_judgements"] == len(out["decisions"]) - len(first)
    # the stopped trial's candidate is exactly its recorded epoch-1 weights
    cand = lab.candidate(lab.rec.tapes[1], 1)
    kept = load_file(str(recording / "epochs" / "t1" / "e001" / "model.safetensors"))
    got = lab.kitchen.weights(cand.id)
    assert all(torch.equal(got[k], kept[k]) for k in kept)
    # ASHA at the same rungs runs as Tune's own scheduler decides, and FIFO never stops
    asha = replay(lab, "asha", rf=2.0)
    assert asha["trial_epochs"] <= 8 and replay(lab, "fifo")["stopped"] == 0
    assert lab.evaluations > 0


def test_a_run_without_kept_epochs_is_not_a_recording(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text(json.dumps({"trial_id": "a"}) + "\n")
    with pytest.raises(NotARecording, match="keep_epoch_candidates"):
        load_recording(tmp_path)
