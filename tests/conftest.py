"""Shared fixtures: offline settings, a tiny stand-in CLIP and a saved base model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

TINY_STANDIN_STEPS = 20


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private stand-in cache for the test session (never the user's own cache)."""
    d = tmp_path_factory.mktemp("soup-ray-cache")
    os.environ["SOUP_RAY_CACHE"] = str(d)
    return d


def tiny_config_dict(**overrides) -> dict:
    """A small but complete sweep config: tiny stand-in, digits, few short trials."""
    cfg = {
        "name": "tiny",
        "model": {"name": "soupray-digits-tiny", "pretrained": "standin", "standin_steps": TINY_STANDIN_STEPS},
        "data": {"kind": "digits", "shifts": ["rotate", "noise"]},
        "search_space": {
            "lr": {"loguniform": [5e-4, 2e-3]},
            "weight_decay": 0.1,
            "epochs": 1,
            "batch_size": 64,
            "warmup_steps": 2,
        },
        "tune": {"num_samples": 2, "seed": 0},
        "trial_resources": {"cpu": 0.875},
        "ray": {"dashboard": False},  # one test turns it on (tests/cluster/test_sweep.py)
    }
    for k, v in overrides.items():
        node = cfg
        keys = k.split(".")
        for kk in keys[:-1]:
            node = node.setdefault(kk, {})
        node[keys[-1]] = v
    return cfg


@pytest.fixture(scope="session")
def prepared(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A run folder with the tiny stand-in's base model saved once for the whole session."""
    from soup_ray.config import parse_config
    from soup_ray.prepare import prepare_run

    cfg = parse_config(tiny_config_dict())
    run_dir = tmp_path_factory.mktemp("run")
    return cfg, prepare_run(cfg, run_dir, log=lambda m: None)


def make_trials(cfg, prep, out_dir: Path, lrs: list[float], epochs: int = 1) -> list[dict]:
    """Fine-tune a few real trials without Ray (plain ``fine_tune``) and write ``results.jsonl`` rows."""
    import shutil

    from soup_ray.results import trial_row, write_jsonl
    from soup_ray.train import TrialContext, fine_tune

    ctx = TrialContext(base_dir=str(prep.base_dir), data_json=cfg.data.model_dump_json(), data_kind="digits", threads=1)
    rows = []
    for i, lr in enumerate(lrs):
        hp = dict(lr=lr, weight_decay=0.1, epochs=epochs, label_smoothing=0.0, mixup_alpha=0.0, randaug_n=0,
                  randaug_m=9, batch_size=64, warmup_steps=2, grad_clip=1.0, seed=i)
        tid = f"t{i:03d}"
        dest = out_dir / "trials" / tid

        def report(metrics, ckpt, dest=dest):
            if ckpt and metrics.get("status") == "completed":
                shutil.copytree(ckpt, dest)

        final = fine_tune(hp, ctx, report)
        rows.append(trial_row(tid, final, hp, f"trials/{tid}" if dest.exists() else None, list(prep.bundle.shifts)))
    write_jsonl(out_dir / "results.jsonl", rows)
    return rows


@pytest.fixture(scope="session")
def small_run(prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run folder (base, five real 1-epoch trials, results.jsonl) to copy and use."""
    import shutil

    cfg, prep = prepared
    run = tmp_path_factory.mktemp("small-run") / "run"
    shutil.copytree(prep.run_dir, run)
    make_trials(cfg, prep, run, [3e-3, 2e-3, 1.5e-3, 1e-3, 2.5e-3])
    return run


@pytest.fixture
def run_copy(small_run: Path, tmp_path: Path) -> Path:
    """A private copy of ``small_run`` that a test may write into."""
    import shutil

    dest = tmp_path / small_run.name
    shutil.copytree(small_run, dest)
    return dest
