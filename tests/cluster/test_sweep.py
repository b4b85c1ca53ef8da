"""A short real sweep on an embedded local Ray: results.jsonl, checkpoints, a diverged trial."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from soup_ray.cluster.search_space import param_space
from soup_ray.config import parse_config
from soup_ray.results import read_jsonl
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow


def test_search_space_is_reproducible_and_in_range() -> None:
    import numpy as np
    from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: F401

    cfg = parse_config(
        tiny_config_dict(
            **{
                "search_space.label_smoothing": {"uniform": [0.05, 0.25], "p_off": 0.5},
                "search_space.epochs": {"randint": [2, 4]},
            }
        )
    )
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

    from soup_ray.cluster.sweep import run_sweep
    from soup_ray.prepare import prepare_run

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _, prep0 = prepared
    # one trial of three draws an absurd learning rate and must end as "diverged" without crashing the sweep
    cfg = parse_config(
        tiny_config_dict(
            **{
                "search_space.lr": {"choice": [1e-3, 1e30]},
                "search_space.epochs": 2,
                "data.train_size": 300,  # cheap epochs: this test checks what a sweep writes, not accuracy
                "tune.num_samples": 4,
                "tune.seed": 1,
                "ray.dashboard": True,
            }
        )
    )
    run_dir = tmp_path / "run"
    prep = prepare_run(cfg, run_dir, log=lambda m: None)
    assert prep.fingerprint == prep0.fingerprint, "the same recipe must give the same base"
    from soup_ray.cluster.actor import actor_name

    lines: list[str] = []
    probe = DashboardProbe(lines)
    killer = KillSoupActor(actor_name(prep.run_dir), cfg.ray.namespace, {1, 3})  # Ray restarts it each time
    import signal

    before = signal.getsignal(signal.SIGINT)
    outcome = run_sweep(cfg, run_dir, log=lines.append, prepared=prep, callbacks=[probe, killer])
    rows = outcome.rows
    # Tune installs its own SIGINT handler during fit() and leaves it behind: the sweep puts back the one it
    # found, so a Ctrl-C after the sweep (the report, serving, a benchmark's next phase) is not swallowed
    assert signal.getsignal(signal.SIGINT) is before
    assert not ray.is_initialized(), "the sweep shuts down the Ray it started"
    assert killer.kills == 2
    check_live_soup_survived(outcome, prep)
    # the dashboard came up on loopback, its URL printed first thing, and its REST API listed the live actors
    assert lines[1].startswith("Ray dashboard: http://127.0.0.1:"), lines[:3]
    classes = {a.get("class_name") for a in probe.actors}
    assert "SoupActor" in classes, classes
    assert any("ImplicitFunc" in str(c) or "tune_trainable" in str(c) for c in classes), classes
    assert probe.metrics_has_soup_size, "the metrics endpoint never reported soup_size"
    # Tune's own TensorBoard logger wrote event files that TensorBoard's reader reads back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((run_dir / "tune").glob("*/events.out.tfevents.*"))
    assert len(events) == 4
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "ray/tune/heldout_acc" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("ray/tune/heldout_acc")][:1] == [1]
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


class DashboardProbe:
    """A Tune callback that asks the dashboard's REST API for the actors while trials run, and the metrics
    endpoint for the soup actor's gauge at the end (both over loopback HTTP, bounded in time)."""

    def __new__(cls, lines: list[str]):
        from ray import tune

        class _Probe(tune.Callback):
            def __init__(self) -> None:
                self.actors: list[dict] = []
                self.metrics_has_soup_size = False

            def _url(self, prefix: str) -> str:
                line = next(x for x in lines if x.startswith(prefix))
                return line.split(": ", 1)[1].split()[0]

            def on_trial_complete(self, iteration, trials, trial, **info):
                import httpx

                if self.actors:
                    return
                from soup_ray.cluster.session import dashboard_auth_headers

                r = httpx.get(
                    f"{self._url('Ray dashboard')}/api/v0/actors",
                    params={"limit": 200},
                    timeout=20,
                    headers=dashboard_auth_headers(),
                )
                r.raise_for_status()
                self.actors = r.json()["data"]["result"]["result"]

            def on_experiment_end(self, trials, **info):
                import httpx

                url = next((x.split(": ", 1)[1] for x in lines if x.startswith("Ray metrics")), None)
                deadline = time.time() + 40
                while url and time.time() < deadline and not self.metrics_has_soup_size:
                    try:
                        self.metrics_has_soup_size = "soup_size" in httpx.get(url, timeout=5).text
                    except httpx.HTTPError:
                        pass
                    time.sleep(1.0)

        return _Probe()


class KillSoupActor:
    """A Tune callback that kills the soup actor (Ray restarts it) after given trial completions."""

    def __new__(cls, *a, **k):
        from ray import tune

        class _Kill(tune.Callback):
            def __init__(self, name: str, namespace: str, at: set[int]):
                self.name, self.namespace, self.at, self.seen, self.kills = name, namespace, at, 0, 0

            def on_trial_complete(self, iteration, trials, trial, **info):
                import ray

                self.seen += 1
                if self.seen in self.at:
                    ray.kill(ray.get_actor(self.name, namespace=self.namespace), no_restart=False)
                    self.kills += 1

        return _Kill(*a, **k)


def check_live_soup_survived(out, prep) -> None:
    """After soup-actor kills: every completed trial counted once, soup identical to an undisturbed computation."""
    from safetensors.torch import load_file

    from soup_ray.ingredients import Kitchen, trial_records_from_results
    from soup_ray.soup import greedy_soup

    completed = {r["trial_id"] for r in out.rows if r["status"] == "completed"}
    soup = out.soup
    assert soup is not None and completed
    # no finished trial is missing, none was counted twice
    assert soup["candidates_seen"] == len(completed) and not soup["rejected"]
    kit = Kitchen(prep.run_dir)
    cands = [kit.admit(r) for r in trial_records_from_results(prep.run_dir)]
    undisturbed = greedy_soup(cands, kit.evaluate, heldout_size=kit.heldout_size)
    assert soup["ingredients"] == undisturbed.ingredients
    assert soup["heldout_accuracy"] == pytest.approx(undisturbed.correct / kit.heldout_size)
    published = load_file(str(prep.run_dir / "soup" / "classifier_head.safetensors"))
    expected = kit.soup_weights(undisturbed.ingredients)
    assert torch.equal(published["weight"], expected["head.weight"])
    assert torch.equal(published["bias"], expected["head.bias"])


def test_tune_loggers_are_tunes_own_callbacks_and_a_missing_package_is_named(monkeypatch) -> None:
    import importlib.util

    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    from soup_ray.cluster.sweep import logger_callbacks

    got = logger_callbacks(["tensorboard", "csv", "json"])
    assert [type(c) for c in got] == [TBXLoggerCallback, CSVLoggerCallback, JsonLoggerCallback]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"'wandb' package is not installed: pip install wandb"):
        logger_callbacks(["tensorboard", "wandb"])
