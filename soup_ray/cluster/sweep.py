"""The sweep: run the Ray Tune trials on the prepared base with the live soup actor, write ``results.jsonl``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import SweepConfig
from ..prepare import PreparedRun, prepare_run
from ..results import trial_row, write_jsonl
from ..run_dir import TUNE_DIR, RunDir
from ..train import TrialContext
from .actor import actor_name, start_soup_actor
from .callback import SoupCallback, trial_offer
from .search_space import param_space
from .session import ray_session
from .trainable import tune_trainable

Log = Callable[[str], None]


@dataclass
class SweepOutcome:
    """What a finished sweep produced: one row per trial and the soup actor's final state."""

    rows: list[dict[str, Any]]
    soup: dict[str, Any] | None


def run_sweep(cfg: SweepConfig, run_dir: Path, log: Log = print, callbacks: list | None = None,
              prepared: PreparedRun | None = None, live_soup: bool = True) -> SweepOutcome:
    """Run the Tune sweep for ``cfg`` into ``run_dir`` with the live soup actor.

    Writes ``results.jsonl``; returns its rows and the soup actor's final status.
    """
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    prep = prepared or prepare_run(cfg, run_dir, log)
    started = ray_session(cfg.resolved_address(), namespace=cfg.ray.namespace, log=log)
    actor = None
    try:
        ctx = TrialContext(
            base_dir=str(prep.base_dir),
            data_json=cfg.data.model_dump_json(),
            data_kind=cfg.data.kind,
            eval_batch_size=cfg.eval_batch_size,
            threads=max(1, int(cfg.trial_resources.cpu)),
            precision=cfg.model.precision,
            gpus=cfg.trial_resources.gpu,
            num_workers=getattr(cfg.data, "num_workers", 0),
        )
        cbs = list(callbacks or [])
        if live_soup:
            actor = start_soup_actor(
                prep.run_dir, tie=cfg.soup.tie, early_rejection=cfg.soup.early_rejection,
                cpu=cfg.soup.resources.cpu, gpu=cfg.soup.resources.gpu,
                detached=cfg.resolved_address() != "local",
            )
            ray.get(actor.keep_alive.remote())  # an actor kept from an earlier sweep of this run must not retire now
            cbs.insert(0, SoupCallback(actor_name(prep.run_dir), cfg.ray.namespace))
            log(f"soup actor {actor_name(prep.run_dir)!r} is keeping the greedy soup up to date "
                f"(watch it with: soup-ray status {prep.run_dir})")
        trainable = tune.with_resources(
            tune.with_parameters(tune_trainable, ctx=ctx),
            {"cpu": cfg.trial_resources.cpu, "gpu": cfg.trial_resources.gpu},
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg.search_space),
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric,
                mode="max",
                num_samples=cfg.tune.num_samples,
                search_alg=BasicVariantGenerator(random_state=cfg.tune.seed),
                max_concurrent_trials=cfg.tune.max_concurrent_trials,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=str(prep.run_dir),
                callbacks=cbs,
                verbose=1,
                # each trial reports one checkpoint, at its end: nothing to prune, and num_to_keep would force an
                # experiment-state snapshot after every trial (Tune's "snapshotting triggered multiple times" warning)
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            ),
        )
        t0 = time.time()
        grid = tuner.fit()
        log(f"sweep finished: {len(grid)} trials in {time.time() - t0:.0f}s")
        rows = collect_rows(grid, prep.run_dir, list(prep.bundle.shifts))
        write_jsonl(RunDir(prep.run_dir).results, rows)
        soup = finish_soup(prep.run_dir, rows, cfg, log) if live_soup else None
        return SweepOutcome(rows, soup)
    finally:
        if actor is not None:
            _retire_later(actor, cfg, prep.run_dir, log)  # also when the sweep failed: never hold a GPU forever
        if started:
            ray.shutdown()


def _retire_later(actor: Any, cfg: SweepConfig, run_dir: Path, log: Log) -> None:
    """On a cluster, let the detached soup actor exit after ``soup.keep_alive_minutes`` of idleness."""
    import ray

    minutes = cfg.soup.keep_alive_minutes
    if cfg.resolved_address() == "local" or minutes is None:
        return
    try:
        ray.get(actor.retire_when_idle.remote(60.0 * minutes), timeout=60)
    except Exception as err:  # noqa: BLE001 - the actor may already be gone; its state is on disk either way
        log(f"could not schedule the soup actor's exit ({type(err).__name__}: {err}); if the dashboard still "
            f"lists it, stop it with ray.kill(ray.get_actor({actor_name(run_dir)!r}, "
            f"namespace={cfg.ray.namespace!r}))")
        return
    log(f"the soup actor stays up {minutes:g} more minute(s) while idle, then exits and frees its resources; "
        f"its state stays in {run_dir}")


def finish_soup(run_dir: Path, rows: list[dict[str, Any]], cfg: SweepConfig, log: Log = print,
                timeout: float = 1800.0) -> dict[str, Any]:
    """Re-offer every completed trial (idempotent), wait for the actor's queue to drain, return its status."""
    import ray

    name = actor_name(run_dir)
    deadline = time.time() + timeout
    while True:
        try:
            actor = ray.get_actor(name, namespace=cfg.ray.namespace)
            refs = [actor.offer.remote(trial_offer(r["trial_id"], str(run_dir / r["checkpoint"]), r))
                    for r in rows if r["status"] == "completed" and r.get("checkpoint")]
            ray.get(refs)
            if ray.get(actor.wait_idle.remote(60.0)):
                status = ray.get(actor.status.remote())
                if status.get("queued", 0) == 0 and not status.get("busy"):
                    break
        except (ray.exceptions.RayActorError, ValueError) as err:
            log(f"soup actor unavailable ({type(err).__name__}); retrying")
            time.sleep(1.0)
        if time.time() > deadline:
            raise TimeoutError(f"the soup actor {name} did not finish its queue within {timeout:.0f}s")
    acc = status.get("heldout_accuracy")
    log(f"greedy soup v{status['version']}: {status['soup_size']} of {status['candidates_seen']} candidates, "
        f"held-out {100 * acc:.1f}%" if acc is not None else "greedy soup: no candidate yet")
    if status.get("rejected"):
        for tid, why in status["rejected"].items():
            log(f"  rejected {tid}: {why}")
    return status


def collect_rows(grid: Any, run_dir: Path, shifts: list[str]) -> list[dict[str, Any]]:
    """Rows for every trial of a finished Tune ``ResultGrid``, in trial order."""
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        ckpt = None
        if result.checkpoint is not None and metrics.get("status") == "completed":
            ckpt = os.path.relpath(result.checkpoint.path, run_dir)
        err = None
        if result.error is not None:
            err = f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:300]}"
        rows.append(trial_row(trial_id, metrics, dict(result.config or {}), ckpt, shifts, err))
    rows.sort(key=lambda r: r["trial_id"])
    return rows
