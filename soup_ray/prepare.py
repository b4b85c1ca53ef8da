"""The run folder before a sweep: the config, the shared base saved ONCE with its fingerprint, the data splits."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_json, write_text
from .config import SweepConfig
from .data import DatasetBundle, build_dataset
from .evaluate import accuracy, predict_logits
from .linear_probe import fit_linear_probe
from .model import build_base, config_image_size, save_base
from .run_dir import OPEN_CLIP_CONFIG, RunDir
from .stages import DATA, STAND_IN, Stages
from .standin import ensure_standin, standin_cached

Log = Callable[[str], None]


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


def prepare_run(cfg: SweepConfig, run_dir: Path, log: Log = print, stages: Stages | None = None) -> PreparedRun:
    """Build (or reuse) the base model ONCE and save it with its fingerprint under ``run_dir/base``.

    With ``stages``, building the offline stand-in (when it is not cached yet) and preparing the data and
    the base are two stages of their own.
    """
    stages = stages or Stages(log=lambda m: None)
    run_dir = run_dir.resolve()
    paths = RunDir(run_dir)
    reuse = paths.base_meta.is_file() and paths.zero_shot.is_file()
    if cfg.model.pretrained == "standin" and not reuse and not standin_cached(cfg.model):
        with stages.stage(STAND_IN):
            ensure_standin(cfg.model.name, cfg.model.standin_steps, cfg.model.standin_seed, log=log)
    with stages.stage(DATA):
        return _prepare(cfg, run_dir, paths, reuse, log)


def _prepare(cfg: SweepConfig, run_dir: Path, paths: RunDir, reuse: bool, log: Log) -> PreparedRun:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(paths.config, cfg.model_dump_json(indent=2))
    base_dir = paths.base
    if reuse:
        meta = json.loads(paths.base_meta.read_text())
        image_size = int(meta["image_size"])
        bundle = build_dataset(cfg.data, image_size)
        zs = json.loads(paths.zero_shot.read_text())
        log(f"reusing the base model in {base_dir} (fingerprint {meta['fingerprint'][:12]})")
        return PreparedRun(run_dir, base_dir, meta["fingerprint"], bundle, zs)
    t0 = time.time()
    image_size = image_size_for(cfg)
    bundle = build_dataset(cfg.data, image_size)
    sizes = bundle.sizes()
    log("data: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    base = build_base(cfg.model, bundle.classnames, bundle.templates)
    head_note = "zero-shot head"
    if cfg.model.head_init == "linear_probe":
        probe = fit_linear_probe(base.classifier, bundle.train, bundle.heldout, cfg.eval_batch_size)
        head_note = f"linear-probe head (C={probe['C']:g}, chosen on held-out)"
    fp = save_base(base, base_dir)
    zs = {}
    for name, ds in (("heldout", bundle.heldout), ("test", bundle.test)):
        lg, lb = predict_logits(base.classifier, ds, cfg.eval_batch_size)
        zs[name] = accuracy(lg, lb)
    zs["head_init"] = cfg.model.head_init
    write_json(paths.zero_shot, zs)
    log(
        f"base: {base.zero_shot_note}, {head_note}; held-out {100 * zs['heldout']:.1f}%, test {100 * zs['test']:.1f}% "
        f"(fingerprint {fp[:12]}, {time.time() - t0:.0f}s)"
    )
    return PreparedRun(run_dir, base_dir, fp, bundle, zs)


def image_size_for(cfg: SweepConfig) -> int:
    """The image size of the configured open_clip model (its config, no weights loaded)."""
    import open_clip

    from .standin import register_model_configs

    register_model_configs()
    name = cfg.model.name
    if name.startswith("local-dir:"):
        mc = json.loads((Path(name[len("local-dir:") :]) / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
    else:
        mc = open_clip.get_model_config(name)
        if mc is None:
            raise ValueError(f"model.name {name!r} is not an open_clip model; see open_clip.list_models()")
    return config_image_size(mc)
