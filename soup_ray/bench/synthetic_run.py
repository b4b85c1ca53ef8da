"""A synthetic run folder with a real model's cost: a random-init open_clip base, its "soup" and fake trials.

The stand-in CLIP of the local runs is so small that serving it measures the
HTTP path, not the model. ``build_vit_run`` writes a run folder whose model
has the real ViT-B-32 cost: open_clip ``ViT-B-32`` with ``pretrained=None``
(random initialisation, no download), the digits class names, saved with
``build_base``/``save_base``; the "soup" is those weights exported with
``export_soup``; ``results.jsonl`` lists ``members`` completed fake trials,
all pointing at one checkpoint of the same weights, so the single-model and
ensemble targets cost exactly what K real trials would. Accuracy is
meaningless here; only cost is measured.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from ..config import DigitsData, ModelConfig, SweepConfig
from ..data import DIGIT_NAMES, DIGIT_TEMPLATES
from ..export import export_soup
from ..model import build_base, save_base
from ..results import write_jsonl
from ..run_dir import CHECKPOINT_METRICS, WEIGHTS_FILE, RunDir

CHECKPOINT = "trials/synthetic"


def build_vit_run(
    run_dir: Path,
    members: int = 5,
    model_name: str = "ViT-B-32",
    config_from: Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Write a synthetic run folder: random-init ``model_name`` base, its soup, ``members`` fake trials.

    The config is the digits config of ``config_from`` (a run folder) or of
    the package's ``tune_configs/local.yaml`` defaults, with the model replaced by ``model_name``
    (``pretrained: null``). Returns ``run_dir``.
    """
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = RunDir(run_dir)
    if config_from is not None:
        cfg = SweepConfig.model_validate_json(RunDir(config_from).config.read_text())
    else:
        cfg = SweepConfig(
            name="synthetic",
            model=ModelConfig(name=model_name, pretrained=None),
            data=DigitsData(kind="digits"),
            search_space={"lr": 1e-5, "weight_decay": 0.1, "epochs": 1},
        )  # no trial is trained
    cfg = cfg.model_copy(
        update={"name": f"synthetic-{model_name}", "model": ModelConfig(name=model_name, pretrained=None)}
    )
    paths.config.write_text(cfg.model_dump_json(indent=2))

    torch.manual_seed(seed)
    base = build_base(cfg.model, DIGIT_NAMES, DIGIT_TEMPLATES)
    fingerprint = save_base(base, paths.base)
    state = {k: v.detach().contiguous() for k, v in base.classifier.state_dict().items()}
    ids = [f"synthetic_{i:02d}" for i in range(members)]
    if members:
        ckpt = run_dir / CHECKPOINT
        ckpt.mkdir(parents=True, exist_ok=True)
        save_file(
            state,
            str(ckpt / WEIGHTS_FILE),
            metadata={
                "base_fingerprint": fingerprint,
                "hyperparameters": json.dumps({"synthetic": True}),
                "classnames": json.dumps(list(DIGIT_NAMES)),
            },
        )
        (ckpt / CHECKPOINT_METRICS).write_text(
            json.dumps(
                {"base_fingerprint": fingerprint, "heldout_correct": 0, "status": "completed", "synthetic": True}
            )
        )
        rows = [
            {
                "model_name": f"trial_{tid}",
                "trial_id": tid,
                "status": "completed",
                "kind": "individual",
                "checkpoint": CHECKPOINT,
                "heldout": 0.1,
                "test": 0.1,
                "heldout_correct": 0,
                "note": f"synthetic: random-init {model_name}, the same weights as every other trial",
            }
            for tid in ids
        ]
        write_jsonl(paths.results, rows)
    export_soup(
        paths.base,
        state,
        paths.soup,
        {
            "version": 1,
            "ingredients": ids or ["base"],
            "heldout_accuracy": None,
            "note": f"synthetic: random-init {model_name}; the ingredients all have these same weights",
        },
    )
    size = json.loads(paths.base_meta.read_text())["image_size"]
    log(
        f"built a synthetic {model_name} run ({size} px, {members} fake trial(s)) in {run_dir} "
        f"in {time.perf_counter() - t0:.0f}s"
    )
    return run_dir
