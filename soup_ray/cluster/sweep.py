"""The sweep: run the Ray Tune trials on the prepared base with the live soup actor, write ``results.jsonl``."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import SweepConfig
from ..prepare import PreparedRun, prepare_run
from ..results import is_soup_candidate, stopped_early, trial_row, write_jsonl
from ..run_dir import TUNE_DIR, RunDir
from ..stages import RAY_START, SOUP, TRIALS, Stages, stopping
from ..train import TrialContext
from .actor import actor_name, start_soup_actor
from .callback import SoupCallback, trial_offer
from .scheduler import make_scheduler
from .search_space import param_space
from .session import ray_session
from .trainable import tune_trainable

Log = Callable[[str], None]


@dataclass
class SweepOutcome:
    """What a sweep produced: one row per finished trial, the soup actor's final state, whether it was stopped."""

    rows: list[dict[str, Any]]
    soup: dict[str, Any] | None
    interrupted: bool = False
    unfinished: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage: ray start, trials, soup


class NothingToResume(ValueError):
    """``--resume`` on a folder without a sweep Tune can restore."""


def resume_hint(run_dir: Path) -> str:
    """The command that resumes the sweep of ``run_dir``."""
    return f"soup-ray sweep --resume {run_dir}"


def can_resume(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a Tune experiment that ``Tuner.restore`` can continue."""
    from ray import tune

    return tune.Tuner.can_restore(str(RunDir(run_dir).tune))


def run_sweep(
    cfg: SweepConfig,
    run_dir: Path,
    log: Log = print,
    callbacks: list | None = None,
    prepared: PreparedRun | None = None,
    live_soup: bool = True,
    resume: bool = False,
    verbose: bool = False,
    stages: Stages | None = None,
) -> SweepOutcome:
    """Run the Tune sweep for ``cfg`` into ``run_dir`` with the live soup actor.

    ``resume`` continues the sweep already in ``run_dir`` through ``Tuner.restore``:
    finished trials are not trained again, unfinished ones go on from their last
    epoch checkpoint, the soup actor from its state on disk. Ctrl-C stops the
    sweep (Tune saves its state); the outcome says so and keeps what finished.
    Writes ``results.jsonl``; returns its rows and the soup actor's final status.

    ``stages`` (optional) names and times the stages as they start: Ray start, trials, finishing the soup.
    Tune's own Ctrl-C handler is in place only while ``Tuner.fit()`` runs; Python's is back as soon as it
    returns, so a Ctrl-C during the soup's last updates (or whatever the caller does next) stops at once.
    """
    import ray

    if resume and not can_resume(run_dir):
        raise NothingToResume(
            f"{run_dir} has no sweep to resume ({RunDir(run_dir).tune} holds no Tune experiment "
            "state): start it without --resume"
        )
    loggers = logger_callbacks(cfg.tune.loggers)  # a missing package fails here, before anything starts
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # exactly the loggers tune.loggers names
    if not verbose:
        # Tune's newer console output prints its experiment box even when silent; its classic reporter at
        # verbose=0 prints nothing, and SoupCallback prints one line per finished trial instead
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    stages = stages or Stages(log=lambda m: None)
    prep = prepared or prepare_run(cfg, run_dir, log, stages=stages)
    started = False
    actor = None
    try:
        with stages.stage(RAY_START):
            started = ray_session(
                cfg.resolved_address(),
                namespace=cfg.ray.namespace,
                log=log,
                dashboard=cfg.ray.dashboard,
                dashboard_port=cfg.ray.dashboard_port,
                verbose=verbose,
            )
            actor = _start_actor(cfg, prep, live_soup)
        return _sweep(cfg, prep, log, callbacks, actor, resume, verbose, loggers, stages)
    finally:
        if actor is not None:
            _retire_later(actor, cfg, prep.run_dir, log)  # also when the sweep failed: never hold a GPU forever
        if started:
            ray.shutdown()


def _start_actor(cfg: SweepConfig, prep: PreparedRun, live_soup: bool) -> Any:
    """The run's soup actor, started (or reattached) and checked; None without a live soup."""
    import ray

    if not live_soup:
        return None
    actor = start_soup_actor(
        prep.run_dir,
        tie=cfg.soup.tie,
        early_rejection=cfg.soup.early_rejection,
        cpu=cfg.soup.resources.cpu,
        gpu=cfg.soup.resources.gpu,
        resources=cfg.soup.resources.custom,
        detached=cfg.resolved_address() != "local",
    )
    check_actor(actor, actor_name(prep.run_dir))  # a broken one fails the sweep now, not after training
    # an actor kept from an earlier sweep of this run must not retire now
    ray.get(actor.keep_alive.remote(), timeout=ACTOR_CALL_TIMEOUT_S)
    return actor


def _sweep(
    cfg: SweepConfig,
    prep: PreparedRun,
    log: Log,
    callbacks: list | None,
    actor: Any,
    resume: bool,
    verbose: bool,
    loggers: list,
    stages: Stages,
) -> SweepOutcome:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    ctx = TrialContext(
        base_dir=str(prep.base_dir),
        data_json=cfg.data.model_dump_json(),
        eval_batch_size=cfg.eval_batch_size,
        threads=max(1, int(cfg.trial_resources.cpu)),
        precision=cfg.model.precision,
        gpus=cfg.trial_resources.gpu,
        num_workers=getattr(cfg.data, "num_workers", 0),
        checkpoint_interval_s=cfg.tune.checkpoint_interval_s,
        rungs=tuple(cfg.tune.rungs(cfg.search_space.max_epochs())),
        soup_run_dir=str(prep.run_dir) if cfg.tune.scheduler == "soup" and actor is not None else None,
        epochs_dir=str(RunDir(prep.run_dir).epochs) if cfg.tune.keep_epoch_candidates else None,
    )
    cbs = list(callbacks or [])
    if actor is not None:
        cbs.insert(
            0,
            SoupCallback(actor_name(prep.run_dir), cfg.ray.namespace, total=cfg.tune.num_samples, progress=not verbose),
        )
        log(
            f"soup actor {actor_name(prep.run_dir)!r} is keeping the greedy soup up to date "
            f"(watch it with: soup-ray status {prep.run_dir})"
        )
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, ctx=ctx),
        {"cpu": cfg.trial_resources.cpu, "gpu": cfg.trial_resources.gpu, **cfg.trial_resources.custom},
    )
    if resume:
        log(
            f"resuming the sweep in {RunDir(prep.run_dir).tune} (finished trials are kept, unfinished ones "
            "continue from their last epoch checkpoint)"
        )
        tuner = tune.Tuner.restore(
            str(RunDir(prep.run_dir).tune),
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            restart_errored=False,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg.search_space),
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric,
                mode="max",
                num_samples=cfg.tune.num_samples,
                search_alg=BasicVariantGenerator(random_state=cfg.tune.seed),
                scheduler=make_scheduler(cfg, RunDir(prep.run_dir).scheduler_log),
                max_concurrent_trials=cfg.tune.max_concurrent_trials,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=str(prep.run_dir),
                callbacks=cbs + loggers,
                verbose=1 if verbose else 0,  # quiet: one line per finished trial (SoupCallback) instead
                failure_config=tune.FailureConfig(max_failures=cfg.tune.resolved_max_failures(cfg.resolved_address())),
                # at most two checkpoints per trial on disk: the newest resumable state and the final weights.
                # Tune snapshots its experiment state once a trial has reported num_to_keep checkpoints since
                # the last snapshot; checkpoint_interval_s keeps short local trials at one checkpoint each
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    tune_dir = RunDir(prep.run_dir).tune
    log(
        f"trial folders: {tune_dir}"
        + (f"  (TensorBoard: tensorboard --logdir {tune_dir})" if "tensorboard" in cfg.tune.loggers else "")
    )
    with stages.stage(TRIALS):
        t0 = time.time()
        own = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
        try:
            grid = tuner.fit()
        finally:
            if own is not None:  # Tune leaves its handler installed: put back the one fit() found
                signal.signal(signal.SIGINT, own)
        unfinished = sum(1 for r in grid if not _finished(r))
        log(
            f"sweep {'stopped' if unfinished else 'finished'}: {len(grid) - unfinished} of {len(grid)} trials "
            f"finished in {time.time() - t0:.0f}s"
        )
        if unfinished:
            stopping()  # Tune's handler took the first Ctrl-C: the next one exits at once
            rows = collect_rows([r for r in grid if _finished(r)], prep.run_dir, list(prep.bundle.shifts))
            write_jsonl(RunDir(prep.run_dir).results, rows)
            log(f"sweep interrupted with {unfinished} trial(s) unfinished and {len(rows)} finished")
            return SweepOutcome(rows, None, interrupted=True, unfinished=unfinished, seconds=_own(stages.seconds))
        rows = collect_rows(grid, prep.run_dir, list(prep.bundle.shifts))
        write_jsonl(RunDir(prep.run_dir).results, rows)
    if actor is None:
        return SweepOutcome(rows, None, seconds=_own(stages.seconds))
    with stages.stage(SOUP):
        soup = finish_soup(prep.run_dir, rows, cfg, log)
    return SweepOutcome(rows, soup, seconds=_own(stages.seconds))


def _own(seconds: dict[str, float]) -> dict[str, float]:
    """The stages a sweep times itself."""
    return {k: v for k, v in seconds.items() if k in (RAY_START, TRIALS, SOUP)}


def _finished(result: Any) -> bool:
    """Whether a trial of the grid ended (completed, diverged or failed for good), not stopped half-way."""
    metrics = result.metrics or {}
    # done without completed: a scheduler stopped it (Ctrl-C leaves done unset, and the trial resumes). A trial
    # restored by Tuner.restore after it completed may come back without done: its status says it finished
    return (
        result.error is not None
        or metrics.get("status") in ("completed", "diverged")
        or stopped_early(metrics)
        or bool(metrics.get("done"))
    )


def logger_callbacks(names: list[str]) -> list[Any]:
    """Tune's own logger callbacks for ``tune.loggers``; a missing package is named with its install command."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    out: list[Any] = []
    for name in names:
        if name == "tensorboard":
            out.append(TBXLoggerCallback())
        elif name == "csv":
            out.append(CSVLoggerCallback())
        elif name == "json":
            out.append(JsonLoggerCallback())
        elif name == "mlflow":
            _need("mlflow", name)
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            out.append(MLflowLoggerCallback(experiment_name="soup-ray", save_artifact=False))
        elif name == "wandb":
            _need("wandb", name)
            from ray.air.integrations.wandb import WandbLoggerCallback

            out.append(WandbLoggerCallback(project="soup-ray"))
        else:
            raise ValueError(f"tune.loggers: unknown logger {name!r} (tensorboard, csv, json, mlflow, wandb)")
    return out


def _need(package: str, logger: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ValueError(
            f"tune.loggers names {logger!r}, but the {package!r} package is not installed: "
            f"pip install {package} (or remove {logger!r} from tune.loggers)"
        )


def _retire_later(actor: Any, cfg: SweepConfig, run_dir: Path, log: Log) -> None:
    """On a cluster, let the detached soup actor exit after ``soup.keep_alive_minutes`` of idleness."""
    import ray

    minutes = cfg.soup.keep_alive_minutes
    if cfg.resolved_address() == "local" or minutes is None:
        return
    try:
        ray.get(actor.retire_when_idle.remote(60.0 * minutes), timeout=60)
    except ray.exceptions.RayActorError:
        return  # gone already (check_actor stops one that could not start): nothing holds its resources
    except Exception as err:  # noqa: BLE001 - its state is on disk either way
        log(
            f"could not schedule the soup actor's exit ({type(err).__name__}: {err}); if the dashboard still "
            f"lists it, stop it with ray.kill(ray.get_actor({actor_name(run_dir)!r}, "
            f"namespace={cfg.ray.namespace!r}))"
        )
        return
    log(
        f"the soup actor stays up {minutes:g} more minute(s) while idle, then exits and frees its resources; "
        f"its state stays in {run_dir}"
    )


class SoupActorFailed(RuntimeError):
    """The soup actor cannot finish the run's soup; the message names the actor and its last error."""


ACTOR_CALL_TIMEOUT_S = 120.0
"""Longest wait for one answer of the soup actor (it answers status calls at once, even while evaluating)."""


def check_actor(actor: Any, name: str, timeout: float = ACTOR_CALL_TIMEOUT_S) -> dict[str, Any]:
    """The actor's status; raises ``SoupActorFailed`` if it does not answer or could not start.

    An actor that could not start is stopped first (for good): it would hold
    its CPU/GPU share with nothing to do, and a later ``start_soup_actor`` would
    reattach to it and its error instead of reading the fixed state again.
    """
    import ray

    try:
        status = ray.get(actor.status.remote(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise SoupActorFailed(
            f"the soup actor {name!r} did not answer within {timeout:.0f}s (see its log in the "
            "Ray dashboard, Actors tab)"
        ) from None
    if status.get("fatal_error"):
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        raise SoupActorFailed(
            f"the soup actor {name!r} could not start: {status['fatal_error']}. It was stopped; "
            "fix or move aside the run's soup_state/ and resume (trials and checkpoints are kept)"
        )
    return status


def finish_soup(
    run_dir: Path, rows: list[dict[str, Any]], cfg: SweepConfig, log: Log = print, timeout: float = 1800.0
) -> dict[str, Any]:
    """Re-offer every completed trial (idempotent), wait for the actor's queue to drain, return its status.

    Every wait is bounded: past ``timeout`` (or an actor that cannot start) it
    raises ``SoupActorFailed`` naming the actor and its last error; the offers
    are on disk in the run folder either way.
    """
    import ray

    name = actor_name(run_dir)
    deadline = time.time() + timeout
    status: dict[str, Any] = {}
    last_problem = "none"
    while True:
        left = deadline - time.time()
        if left <= 0:
            raise SoupActorFailed(
                f"the soup actor {name!r} did not finish its queue within {timeout:.0f}s; "
                f"its last error: {status.get('last_error') or last_problem}"
            )
        try:
            actor = ray.get_actor(name, namespace=cfg.ray.namespace)
            status = check_actor(actor, name, timeout=min(ACTOR_CALL_TIMEOUT_S, left))
            refs = [
                actor.offer.remote(trial_offer(r["trial_id"], str(run_dir / r["checkpoint"]), r))
                for r in rows
                if r["status"] == "completed" and r.get("checkpoint")
            ]
            ray.get(refs, timeout=min(ACTOR_CALL_TIMEOUT_S, left))
            if ray.get(actor.wait_idle.remote(min(60.0, left)), timeout=min(60.0, left) + ACTOR_CALL_TIMEOUT_S):
                status = ray.get(actor.status.remote(), timeout=ACTOR_CALL_TIMEOUT_S)
                if status.get("queued", 0) == 0 and not status.get("busy") and not status.get("publish_pending"):
                    break
            elif status.get("last_error"):
                last_problem = status["last_error"]
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError) as err:
            last_problem = f"{type(err).__name__}: {err}"
            log(f"soup actor unavailable ({type(err).__name__}); retrying")
            time.sleep(1.0)
    acc = status.get("heldout_accuracy")
    log(
        f"greedy soup v{status['version']}: {status['soup_size']} of {status['candidates_seen']} candidates, "
        f"held-out {100 * acc:.1f}%"
        if acc is not None
        else "greedy soup: no candidate yet"
    )
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
        if result.checkpoint is not None and is_soup_candidate(metrics):
            ckpt = os.path.relpath(result.checkpoint.path, run_dir)
        err = None
        if result.error is not None:
            err = f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:300]}"
        rows.append(trial_row(trial_id, metrics, dict(result.config or {}), ckpt, shifts, err))
    rows.sort(key=lambda r: r["trial_id"])
    return rows
