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
        "trial_resources": {"cpu": 1},
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
    from soup_ray.sweep import prepare_run

    cfg = parse_config(tiny_config_dict())
    run_dir = tmp_path_factory.mktemp("run")
    return cfg, prepare_run(cfg, run_dir, log=lambda m: None)
