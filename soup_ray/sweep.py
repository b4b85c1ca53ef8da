"""The sweep: prepare the shared base once, run the Ray Tune trials, write ``results.jsonl``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import SweepConfig
from .data import DatasetBundle, build_dataset
from .evaluate import accuracy, predict_logits
from .model import build_base, save_base
from .results import RESULTS_FILE, format_table, trial_row, write_jsonl
from .train import TrialContext, tune_trainable

Log = Callable[[str], None]


@dataclass
class SweepOutcome:
    """What a finished sweep produced: one row per trial and the soup actor's final state."""

    rows: list[dict[str, Any]]
    soup: dict[str, Any] | None


@dataclass
class PreparedRun:
    """A run folder with its saved base model and the dataset it was built for."""

    run_dir: Path
    base_dir: Path
    fingerprint: str
    bundle: DatasetBundle
    zero_shot: dict[str, float]


def default_run_dir(cfg: SweepConfig) -> Path:
    """``<storage>/<name>-<timestamp>`` for a new run."""
    return Path(cfg.storage) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run(cfg: SweepConfig, run_dir: Path, log: Log = print) -> PreparedRun:
    """Build (or reuse) the base model ONCE and save it with its fingerprint under ``run_dir/base``."""
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    base_dir = run_dir / "base"
    if (base_dir / "base.json").is_file():
        meta = json.loads((base_dir / "base.json").read_text())
        image_size = int(meta["image_size"])
        bundle = build_dataset(cfg.data, image_size)
        zs = json.loads((base_dir / "zero_shot.json").read_text())
        log(f"reusing the base model in {base_dir} (fingerprint {meta['fingerprint'][:12]})")
        return PreparedRun(run_dir, base_dir, meta["fingerprint"], bundle, zs)
    t0 = time.time()
    image_size = _image_size_for(cfg)
    bundle = build_dataset(cfg.data, image_size)
    sizes = bundle.sizes()
    log("data: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    base = build_base(cfg.model, bundle.classnames, bundle.templates)
    fp = save_base(base, base_dir)
    zs = {}
    for name, ds in (("heldout", bundle.heldout), ("test", bundle.test)):
        lg, lb = predict_logits(base.classifier, ds, cfg.eval_batch_size)
        zs[name] = accuracy(lg, lb)
    (base_dir / "zero_shot.json").write_text(json.dumps(zs, indent=2))
    log(f"base: {base.zero_shot_note}; zero-shot held-out {100 * zs['heldout']:.1f}%, test {100 * zs['test']:.1f}% "
        f"(fingerprint {fp[:12]}, {time.time() - t0:.0f}s)")
    return PreparedRun(run_dir, base_dir, fp, bundle, zs)


def _image_size_for(cfg: SweepConfig) -> int:
    import open_clip

    from .standin import register_model_configs

    register_model_configs()
    name = cfg.model.name
    if name.startswith("local-dir:"):
        mc = json.loads((Path(name[len("local-dir:"):]) / "open_clip_config.json").read_text())["model_cfg"]
    else:
        mc = open_clip.get_model_config(name)
        if mc is None:
            raise ValueError(f"model.name {name!r} is not an open_clip model; see open_clip.list_models()")
    size = mc["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def init_ray(cfg: SweepConfig, log: Log = print) -> bool:
    """Start or attach to Ray; returns True when this call started it (so the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.resolved_address()
    from .ray_env import worker_env_vars

    env = worker_env_vars()
    kwargs: dict[str, Any] = {"namespace": cfg.ray.namespace, "runtime_env": {"env_vars": env} if env else None,
                              "log_to_driver": True}
    if address == "local":
        log("starting an embedded local Ray (address='local')")
        ray.init(address="local", include_dashboard=False, **kwargs)
    else:
        log(f"connecting to the Ray cluster at {address}")
        ray.init(address=address, **kwargs)
    return True


def run_sweep(cfg: SweepConfig, run_dir: Path, log: Log = print, callbacks: list | None = None,
              prepared: PreparedRun | None = None, live_soup: bool = True) -> SweepOutcome:
    """Run the Tune sweep for ``cfg`` into ``run_dir`` with the live soup actor.

    Writes ``results.jsonl``; returns its rows and the soup actor's final status.
    """
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .search_space import param_space

    prep = prepared or prepare_run(cfg, run_dir, log)
    started = init_ray(cfg, log)
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
            from .actor import actor_name, start_soup_actor
            from .callback import SoupCallback

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
                name="tune",
                storage_path=str(prep.run_dir),
                callbacks=cbs,
                verbose=1,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
        t0 = time.time()
        grid = tuner.fit()
        log(f"sweep finished: {len(grid)} trials in {time.time() - t0:.0f}s")
        rows = collect_rows(grid, prep.run_dir, list(prep.bundle.shifts))
        write_jsonl(prep.run_dir / RESULTS_FILE, rows)
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

    from .actor import actor_name as actor_name_of

    minutes = cfg.soup.keep_alive_minutes
    if cfg.resolved_address() == "local" or minutes is None:
        return
    try:
        ray.get(actor.retire_when_idle.remote(60.0 * minutes), timeout=60)
    except Exception as err:  # noqa: BLE001 - the actor may already be gone; its state is on disk either way
        log(f"could not schedule the soup actor's exit ({type(err).__name__}: {err}); if the dashboard still "
            f"lists it, stop it with ray.kill(ray.get_actor({actor_name_of(run_dir)!r}, "
            f"namespace={cfg.ray.namespace!r}))")
        return
    log(f"the soup actor stays up {minutes:g} more minute(s) while idle, then exits and frees its resources; "
        f"its state stays in {run_dir}")


def finish_soup(run_dir: Path, rows: list[dict[str, Any]], cfg: SweepConfig, log: Log = print,
                timeout: float = 1800.0) -> dict[str, Any]:
    """Re-offer every completed trial (idempotent), wait for the actor's queue to drain, return its status."""
    import ray

    from .actor import actor_name
    from .callback import trial_offer

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


def print_table(rows: list[dict[str, Any]], shifts: list[str], zero_shot: dict[str, float] | None = None, log: Log = print) -> None:
    """Print the individual models, best held-out first, with the zero-shot base for reference."""
    ordered = sorted(rows, key=lambda r: (r.get("heldout") is None, -(r.get("heldout") or 0.0)))
    extra = []
    if zero_shot:
        extra.append({"model_name": "zero-shot base", "status": "base", "heldout": zero_shot.get("heldout"),
                      "test": zero_shot.get("test")})
    log(format_table(ordered + extra, shifts))
    done = [r for r in rows if r.get("status") == "completed"]
    div = [r for r in rows if r.get("status") == "diverged"]
    err = [r for r in rows if r.get("status") == "error"]
    log(f"{len(done)} completed, {len(div)} diverged, {len(err)} failed")
