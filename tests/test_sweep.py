"""A short real sweep on an embedded local Ray: results.jsonl, checkpoints, a diverged trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from soup_ray.config import parse_config
from soup_ray.results import read_jsonl
from soup_ray.search_space import param_space
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow


def test_search_space_is_reproducible_and_in_range() -> None:
    from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: F401
    import numpy as np

    cfg = parse_config(tiny_config_dict(**{
        "search_space.label_smoothing": {"uniform": [0.05, 0.25], "p_off": 0.5},
        "search_space.epochs": {"randint": [2, 4]},
    }))
    space = param_space(cfg.search_space)
    draws = [space["label_smoothing"].sample(random_state=np.random.RandomState(s)) for s in range(200)]
    again = [space["label_smoothing"].sample(random_state=np.random.RandomState(s)) for s in range(200)]
    assert draws == again
    off = sum(d == 0.0 for d in draws)
    assert 60 < off < 140
    assert all(d == 0.0 or 0.05 <= d <= 0.25 for d in draws)
    epochs = {space["epochs"].sample(random_state=np.random.RandomState(s)) for s in range(100)}
    assert epochs == {2, 3, 4}


def test_short_real_sweep_on_local_ray(prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from soup_ray.sweep import prepare_run, run_sweep

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _, prep0 = prepared
    # one trial of three draws an absurd learning rate and must end as "diverged" without crashing the sweep
    cfg = parse_config(tiny_config_dict(**{
        "search_space.lr": {"choice": [1e-3, 1e30]},
        "search_space.epochs": 2,
        "tune.num_samples": 4,
        "tune.seed": 1,
    }))
    run_dir = tmp_path / "run"
    prep = prepare_run(cfg, run_dir, log=lambda m: None)
    assert prep.fingerprint == prep0.fingerprint, "the same recipe must give the same base"
    rows = run_sweep(cfg, run_dir, log=lambda m: None, prepared=prep)
    assert not ray.is_initialized(), "the sweep shuts down the Ray it started"
    on_disk = read_jsonl(run_dir / "results.jsonl")
    assert on_disk == json.loads(json.dumps(rows))
    assert len(on_disk) == 4
    statuses = {r["hyperparameters"]["lr"]: r["status"] for r in on_disk}
    assert set(statuses.values()) <= {"completed", "diverged"}
    assert any(r["status"] == "diverged" for r in on_disk) == (1e30 in statuses)
    completed = [r for r in on_disk if r["status"] == "completed"]
    assert completed
    for r in on_disk:
        assert {"model_name", "heldout", "test", "rotate", "noise", "hyperparameters", "status"} <= r.keys()
        assert r["hyperparameters"]["epochs"] == 2
    for r in completed:
        assert 0 <= r["heldout"] <= 1 and 0 <= r["test"] <= 1
        ckpt = run_dir / r["checkpoint"]
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            assert f.metadata()["base_fingerprint"] == prep.fingerprint
    for r in on_disk:
        if r["status"] == "diverged":
            assert r["heldout"] is None and r["checkpoint"] is None
    # every trial reported its held-out accuracy after each epoch
    progress = list((run_dir / "tune").glob("*/progress.csv"))
    assert len(progress) == 4
