"""Publish a soup as an open_clip ``local-dir:`` folder and load it back.

The folder holds the full CLIP (``open_clip_model.safetensors``: the base's text
tower with the soup's image tower), ``open_clip_config.json``, the fine-tuned
linear head (``classifier_head.safetensors``, with the class names) and
``soup.json`` (ingredients, held-out accuracy, version, time). open_clip loads
it with ``create_model_and_transforms('local-dir:FOLDER')``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .model import CLIPClassifier
from .run_dir import BASE_META, HEAD_FILE, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, SOUP_INFO



def clip_state_with_soup(base_clip: dict[str, torch.Tensor], soup: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base CLIP's state with every ``visual.*`` tensor replaced by the soup's."""
    out = dict(base_clip)
    for k, v in soup.items():
        if k.startswith("visual."):
            if k not in out:
                raise KeyError(f"soup tensor {k} has no counterpart in the base CLIP")
            out[k] = v.to(out[k].dtype)
    return out


def export_soup(base_dir: Path, soup: dict[str, torch.Tensor], out_dir: Path, info: dict[str, Any]) -> Path:
    """Write the soup as an open_clip local-dir folder, atomically (readers never see half a folder)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    base_meta = json.loads((base_dir / BASE_META).read_text())
    clip = load_file(str(base_dir / OPEN_CLIP_WEIGHTS))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        merged = clip_state_with_soup(clip, soup)
        save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp / OPEN_CLIP_WEIGHTS))
        head = {"weight": soup["head.weight"].contiguous(), "bias": soup["head.bias"].contiguous()}
        save_file(head, str(tmp / HEAD_FILE), metadata={"classnames": json.dumps(base_meta["classnames"])})
        shutil.copy(base_dir / OPEN_CLIP_CONFIG, tmp / OPEN_CLIP_CONFIG)
        full_info = {
            **info,
            "base_fingerprint": base_meta["fingerprint"],
            "classnames": base_meta["classnames"],
            "image_size": int(base_meta["image_size"]),
            "published_at": info.get("published_at", time.time()),
        }
        (tmp / SOUP_INFO).write_text(json.dumps(full_info, indent=2))
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_soup(folder: Path, device: str = "cpu") -> tuple[CLIPClassifier, dict[str, Any]]:
    """Load an exported soup: open_clip's ``local-dir:`` architecture, then its weights and head.

    Only the folder's safetensors files are read, every key of them (strict):
    a missing weights file is an error, never a randomly initialised model, and
    a pickle beside them (``*.bin``, ``*.pth``) is never loaded.
    """
    import open_clip

    folder = Path(folder)
    info = json.loads((folder / SOUP_INFO).read_text())
    model = open_clip.create_model(f"local-dir:{folder}", pretrained=None, load_weights=False)
    model.load_state_dict(load_file(str(folder / OPEN_CLIP_WEIGHTS)), strict=True)
    model = model.to(device)
    head_state = load_file(str(folder / HEAD_FILE))
    head = nn.Linear(head_state["weight"].shape[1], head_state["weight"].shape[0])
    head.load_state_dict(head_state)
    cfg = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    pp = cfg.get("preprocess_cfg", {})
    clf = CLIPClassifier(model.visual, head, pp.get("mean", open_clip.OPENAI_DATASET_MEAN),
                         pp.get("std", open_clip.OPENAI_DATASET_STD), int(info["image_size"]))
    return clf.eval().to(device), info
