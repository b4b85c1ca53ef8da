"""The classifier every trial fine-tunes: an open_clip image tower plus a zero-shot linear head.

``build_base`` is the one factory: it turns a model config into a ready
classifier (``ViT-B-32`` + ``openai``, a ``local-dir:`` folder, or the offline
stand-in), builds the zero-shot head from class names and prompt templates
with open_clip's own ``build_zero_shot_classifier``, and returns it together
with the CLIP text tower's state, which the exported soup keeps unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .run_dir import BASE_META, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS
from .run_dir import WEIGHTS_FILE as BASE_WEIGHTS


class CLIPClassifier(nn.Module):
    """Images in [0, 1] -> normalise -> CLIP image encoder -> L2-normalise -> linear head (logits)."""

    def __init__(
        self, visual: nn.Module, head: nn.Linear, mean: Sequence[float], std: Sequence[float], image_size: int
    ):
        super().__init__()
        self.visual = visual
        self.head = head
        self.register_buffer("image_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("image_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.image_size = image_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings."""
        x = (images - self.image_mean) / self.image_std
        f = self.visual(x)
        return f / f.norm(dim=-1, keepdim=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class Base:
    """The shared initialisation: the classifier plus what is needed to export a soup as open_clip."""

    classifier: CLIPClassifier
    open_clip_cfg: dict
    clip_state: dict[str, torch.Tensor]  # the full CLIP state (text tower included), for export
    classnames: list[str]
    zero_shot_note: str


def _open_clip_model(cfg: ModelConfig) -> tuple[nn.Module, dict, str, str]:
    import open_clip

    from .standin import ensure_standin, register_model_configs

    register_model_configs()
    name, pretrained, note = cfg.name, cfg.pretrained, ""
    if pretrained == "standin":
        folder = ensure_standin(cfg.name, cfg.standin_steps, cfg.standin_seed)
        name, pretrained = f"local-dir:{folder}", None
        note = f"offline stand-in CLIP from {folder}"
    try:
        model = open_clip.create_model(name, pretrained=pretrained)
    except RuntimeError as err:
        if pretrained and "download" in str(err).lower():
            raise RuntimeError(
                f"could not fetch pretrained weights {cfg.name}/{pretrained}: {err}. "
                "Check network access or point model.name at a local-dir: folder."
            ) from None
        raise
    note = note or f"{name} pretrained={pretrained}"
    if name.startswith("local-dir:"):
        oc_cfg = json.loads((Path(name[len("local-dir:") :]) / OPEN_CLIP_CONFIG).read_text())
    else:
        mc = open_clip.get_model_config(name)
        pp = {
            "mean": list(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
            "std": list(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
        }
        oc_cfg = {"model_cfg": mc, "preprocess_cfg": pp}
    return model, oc_cfg, note, name


def config_image_size(model_cfg: dict) -> int:
    """The input size an open_clip model config declares (``vision_cfg.image_size``, an int or a pair)."""
    size = model_cfg["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def zero_shot_weights(
    model: nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence
) -> torch.Tensor:
    """Zero-shot head weights ``[n_classes, embed_dim]``: normalised mean text embedding per class."""
    from open_clip import build_zero_shot_classifier

    with torch.no_grad():
        w = build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=50)
    return w.T.contiguous()


def build_base(cfg: ModelConfig, classnames: Sequence[str], templates: Sequence) -> Base:
    """Build the shared initialisation: CLIP image tower + zero-shot head (scaled by CLIP's logit scale)."""
    import open_clip

    model, oc_cfg, note, resolved_name = _open_clip_model(cfg)
    model.eval()
    tokenizer = open_clip.get_tokenizer(resolved_name)
    weights = zero_shot_weights(model, tokenizer, classnames, templates)
    scale = float(model.logit_scale.detach().exp())
    head = nn.Linear(weights.shape[1], weights.shape[0], bias=True)
    with torch.no_grad():
        head.weight.copy_(weights * scale)
        head.bias.zero_()
    pp = oc_cfg.get("preprocess_cfg", {})
    mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pp.get("std", open_clip.OPENAI_DATASET_STD)
    clf = CLIPClassifier(model.visual, head, mean, std, config_image_size(oc_cfg["model_cfg"]))
    clip_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Base(clf, oc_cfg, clip_state, list(classnames), note)


# ---------------------------------------------------------------- state dicts on disk


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_base(base: Base, out_dir: Path) -> str:
    """Save the base classifier ONCE as safetensors; returns its fingerprint.

    The folder is written whole or not at all (a temporary folder beside it, then a rename): a run stopped
    while saving leaves no half-written base behind, and a later run builds it again.
    """
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    final, out_dir = out_dir, Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fp = _write_base(base, out_dir)
        if final.exists():
            shutil.rmtree(final)
        out_dir.rename(final)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return fp


def _write_base(base: Base, out_dir: Path) -> str:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in base.classifier.state_dict().items()}
    fp = state_fingerprint(state)
    meta = {
        "fingerprint": fp,
        "classnames": json.dumps(base.classnames),
        "image_size": str(base.classifier.image_size),
        "source": base.zero_shot_note,
    }
    save_file(state, str(out_dir / BASE_WEIGHTS), metadata=meta)
    save_file({k: v.contiguous() for k, v in base.clip_state.items()}, str(out_dir / OPEN_CLIP_WEIGHTS))
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(base.open_clip_cfg, indent=2))
    (out_dir / BASE_META).write_text(json.dumps({**meta, "classnames": base.classnames}, indent=2))
    return fp


def classifier_from_dir(base_dir: Path) -> CLIPClassifier:
    """Rebuild an empty classifier skeleton from a saved base folder (weights loaded separately)."""
    import open_clip

    from .standin import register_model_configs

    register_model_configs()
    oc_cfg = json.loads((base_dir / OPEN_CLIP_CONFIG).read_text())
    meta = json.loads((base_dir / BASE_META).read_text())
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that no weights were loaded: they are loaded next
    try:
        model = open_clip.create_model(f"local-dir:{base_dir}", pretrained=None, load_weights=False)
    finally:
        root.setLevel(level)
    emb = oc_cfg["model_cfg"]["embed_dim"]
    head = nn.Linear(emb, len(meta["classnames"]))
    pp = oc_cfg.get("preprocess_cfg", {})
    return CLIPClassifier(
        model.visual,
        head,
        pp.get("mean", open_clip.OPENAI_DATASET_MEAN),
        pp.get("std", open_clip.OPENAI_DATASET_STD),
        int(meta["image_size"]),
    )


def load_base(base_dir: Path) -> tuple[CLIPClassifier, dict]:
    """Load the saved base classifier and its metadata (fingerprint, class names)."""
    from safetensors.torch import load_file

    clf = classifier_from_dir(base_dir)
    state = load_file(str(base_dir / BASE_WEIGHTS))
    clf.load_state_dict(state)
    meta = json.loads((base_dir / BASE_META).read_text())
    return clf, meta
