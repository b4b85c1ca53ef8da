"""Shared fixtures: offline settings, a tiny stand-in CLIP and a saved base model; the tiers' guard.

Two tiers: ``bash scripts/test.sh --quick`` runs the tests without the ``slow`` marker (no Ray, Serve,
subprocess sweep, browser or venv); ``bash scripts/test.sh`` runs all. So that the quick tier cannot rot,
a test (its fixtures included) that starts Ray (``ray.init``, ``ray.cluster_utils.Cluster``), Serve
(``serve.start``/``serve.run``), or a subprocess running the CLI, ``ray``, a browser or a new venv fails
unless it is marked ``slow``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

TINY_STANDIN_STEPS = 20

_current: list[pytest.Item] = []  # the test being set up, run or torn down


class UnmarkedSlowTest(AssertionError):
    """A test without the ``slow`` marker started Ray, Serve or a heavy subprocess."""


def _guard(what: str) -> None:
    item = _current[-1] if _current else None
    if item is not None and item.get_closest_marker("slow") is None:
        raise UnmarkedSlowTest(
            f"{item.nodeid} starts {what} but is not marked slow: add @pytest.mark.slow (or "
            "pytestmark = pytest.mark.slow) so `scripts/test.sh --quick` leaves it out"
        )


HEAVY_ARGS = ("soup_ray.cli", "soup-ray", "ray", "chromium", "venv", "gpu_check.sh")


def _heavy_command(args: object) -> str | None:
    argv = [str(a) for a in (args if isinstance(args, (list, tuple)) else [args])]
    for a in argv:
        name = Path(a).name
        if a in HEAVY_ARGS or name in HEAVY_ARGS or name.startswith("soup-ray") or a.endswith("gpu_check.sh"):
            return " ".join(argv)[:80]
    return None


def pytest_configure(config: pytest.Config) -> None:
    """Wrap what starts Ray, Serve and heavy subprocesses with the tier guard (for the whole session)."""
    import ray
    import ray.cluster_utils
    from ray import serve

    def wrap(owner: object, name: str, what: str) -> None:
        real = getattr(owner, name)

        def guarded(*args: object, **kwargs: object) -> object:
            _guard(what)
            return real(*args, **kwargs)

        guarded.__wrapped__ = real  # type: ignore[attr-defined]
        setattr(owner, name, guarded)

    wrap(ray, "init", "Ray (ray.init)")
    wrap(serve, "start", "Ray Serve (serve.start)")
    wrap(serve, "run", "Ray Serve (serve.run)")
    real_cluster_init = ray.cluster_utils.Cluster.__init__

    def cluster_init(self: object, *args: object, **kwargs: object) -> None:
        _guard("a multi-node Ray (cluster_utils.Cluster)")
        real_cluster_init(self, *args, **kwargs)

    ray.cluster_utils.Cluster.__init__ = cluster_init  # type: ignore[method-assign]
    real_popen_init = subprocess.Popen.__init__

    def popen_init(self: subprocess.Popen, args: object, *rest: object, **kwargs: object) -> None:
        heavy = _heavy_command(args)
        if heavy:
            _guard(f"a subprocess ({heavy})")
        real_popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _current.append(item)
    try:
        yield
    finally:
        _current.pop()


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

    import torch

    from soup_ray.results import trial_row, write_jsonl
    from soup_ray.train import TrialContext, fine_tune

    threads = torch.get_num_threads()  # fine_tune sets the process's torch threads: put them back afterwards
    ctx = TrialContext(base_dir=str(prep.base_dir), data_json=cfg.data.model_dump_json(), threads=threads)
    rows = []
    for i, lr in enumerate(lrs):
        hp = dict(
            lr=lr,
            weight_decay=0.1,
            epochs=epochs,
            label_smoothing=0.0,
            mixup_alpha=0.0,
            randaug_n=0,
            randaug_m=9,
            batch_size=64,
            warmup_steps=2,
            grad_clip=1.0,
            seed=i,
        )
        tid = f"t{i:03d}"
        dest = out_dir / "trials" / tid

        def report(metrics, ckpt, dest=dest):
            if ckpt and metrics.get("status") == "completed":
                shutil.copytree(ckpt, dest)

        try:
            final = fine_tune(hp, ctx, report)
        finally:
            torch.set_num_threads(threads)
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
