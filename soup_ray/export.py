"""Publish a soup as an open_clip ``local-dir:`` folder and load it back.

The folder holds the full CLIP (``open_clip_model.safetensors``: the base's text
tower with the soup's image tower), ``open_clip_config.json``, the fine-tuned
linear head (``classifier_head.safetensors``, with the class names) and
``soup.json`` (ingredients, held-out accuracy, version, time). open_clip loads
it with ``create_model_and_transforms('local-dir:FOLDER')``.

A folder is published durably and atomically: written beside its place, every
file and the folder synced, then swapped in. Where the platform and file
system can (Linux ``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs, tmpfs) the
swap is one step and the path always names a whole soup, the old or the new.
Elsewhere (macOS, NFS) it takes two renames with an instant between them when
the path names nothing; a crash inside that instant leaves the old folder aside
as ``.NAME.old``, which :func:`recover_folder` (run by every export first and by
the soup keeper when it starts) puts back.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import sync
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


RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, TypeError):
        return None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False (nothing done) where the platform or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def exchange_supported(folder: Path) -> bool:
    """Whether :func:`exchange_paths` works for folders inside ``folder``."""
    with tempfile.TemporaryDirectory(prefix=".exchange.", dir=folder) as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        a.mkdir()
        b.mkdir()
        return exchange_paths(a, b)


def _aside(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.old")


def recover_folder(out_dir: Path | str) -> bool:
    """Put back a published folder that a crash left aside between the two renames of a swap; returns whether
    it did (a no-op wherever the swap is one step)."""
    out_dir = Path(out_dir)
    old = _aside(out_dir)
    if out_dir.exists() or not (old / SOUP_INFO).is_file():
        return False
    os.rename(old, out_dir)
    sync(out_dir.parent)
    return True


def _swap_in(new: Path, out_dir: Path) -> None:
    """Make ``out_dir`` the folder ``new`` (synced already); afterwards ``new`` holds the old one, if any."""
    if not out_dir.exists():
        os.rename(new, out_dir)
    elif not exchange_paths(new, out_dir):
        old = _aside(out_dir)
        if old.exists():
            shutil.rmtree(old)
        os.rename(out_dir, old)
        os.rename(new, out_dir)  # the instant between these two renames has no out_dir (recover_folder)
        shutil.rmtree(old, ignore_errors=True)
    sync(out_dir.parent)


def export_soup(base_dir: Path, soup: dict[str, torch.Tensor], out_dir: Path, info: dict[str, Any]) -> Path:
    """Write the soup as an open_clip local-dir folder, durably and atomically (readers never see half a folder;
    see the module's docstring for the swap)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    base_meta = json.loads((base_dir / BASE_META).read_text())
    clip = load_file(str(base_dir / OPEN_CLIP_WEIGHTS))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(out_dir)
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
        for p in tmp.iterdir():
            sync(p)
        sync(tmp)
        _swap_in(tmp, out_dir)
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
    clf = CLIPClassifier(
        model.visual,
        head,
        pp.get("mean", open_clip.OPENAI_DATASET_MEAN),
        pp.get("std", open_clip.OPENAI_DATASET_STD),
        int(info["image_size"]),
    )
    return clf.eval().to(device), info
