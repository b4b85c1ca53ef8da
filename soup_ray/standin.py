"""The offline stand-in for a pretrained CLIP.

No weights can be downloaded on a laptop without network, so soup-ray pretrains a
small CLIP itself: an open_clip model config registered with
``open_clip.add_model_config``, trained with open_clip's ``ClipLoss`` on digit
glyphs rendered with Pillow's built-in font (random sizes, strokes, positions,
rotations, shears, down-sampling, blur and noise), captioned from templates such
as "a photo of the number seven". None of these images come from the
fine-tuning data. The result is deterministic for a seed and cached as an
open_clip ``local-dir:`` folder, so it is built once per machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

CONFIG_DIR = Path(__file__).parent / "model_configs"
STANDIN_VERSION = 2  # bump when the recipe changes, so old caches are not reused
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = [
    "a photo of the number {w}.",
    "a photo of the digit {d}.",
    "the number {w}.",
    "the digit {d}.",
    "a handwritten {w}.",
    "a drawing of the number {w}.",
    "a blurry photo of the number {w}.",
    "a picture of a {w}.",
    "a {w}.",
    "the numeral {d}.",
    "a small {w}.",
    "a rendering of the digit {w}.",
]


def register_model_configs() -> None:
    """Make soup-ray's own model configs known to open_clip's factory (idempotent)."""
    import open_clip

    if "soupray-digits-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def cache_root() -> Path:
    """Where stand-ins are cached: ``$SOUP_RAY_CACHE`` or ``~/.cache/soup-ray``."""
    return Path(os.environ.get("SOUP_RAY_CACHE", Path.home() / ".cache" / "soup-ray"))


def standin_dir(model_name: str, steps: int, seed: int) -> Path:
    """The cache folder of one stand-in recipe (model config, steps, seed, recipe version)."""
    register_model_configs()
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown model config {model_name!r} for the stand-in; try soupray-digits-tiny")
    key = json.dumps({"cfg": cfg, "steps": steps, "seed": seed, "v": STANDIN_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / f"standin-{model_name}-{digest}"


# ---------------------------------------------------------------- synthetic glyphs


def render_glyph_bank(seed: int, canvas: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Every digit rendered white-on-black at many font sizes and stroke widths: ``[N,1,canvas,canvas]``."""
    from PIL import Image, ImageDraw, ImageFont

    glyphs, labels = [], []
    for size in range(30, 58, 3):
        font = ImageFont.load_default(size=size)
        for stroke in range(0, 4):
            for d in range(10):
                im = Image.new("L", (canvas, canvas), 0)
                draw = ImageDraw.Draw(im)
                box = draw.textbbox((0, 0), str(d), font=font, stroke_width=stroke)
                w, h = box[2] - box[0], box[3] - box[1]
                draw.text(((canvas - w) / 2 - box[0], (canvas - h) / 2 - box[1]), str(d), fill=255, font=font, stroke_width=stroke)
                glyphs.append(np.asarray(im, dtype=np.float32) / 255.0)
                labels.append(d)
    return torch.from_numpy(np.stack(glyphs))[:, None], torch.tensor(labels)


def augment_glyphs(bank: torch.Tensor, idx: torch.Tensor, out_size: int, g: torch.Generator) -> torch.Tensor:
    """Random rotation, shear, scale and shift, down-sampling, blur and noise, done in one batch."""
    n = len(idx)
    x = bank[idx]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    ang = u(-25, 25) * math.pi / 180
    shear = u(-0.3, 0.3)
    scale = u(0.55, 1.0)
    tx, ty = u(-0.15, 0.15), u(-0.15, 0.15)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos / scale
    theta[:, 0, 1] = (-sin + shear) / scale
    theta[:, 1, 0] = sin / scale
    theta[:, 1, 1] = cos / scale
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    grid = F.affine_grid(theta, [n, 1, out_size * 2, out_size * 2], align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False)
    x = F.interpolate(x, size=(out_size, out_size), mode="area")
    # half the batch goes through an 8x8 bottleneck, like scanned low-resolution digits
    low = torch.rand(n, generator=g) < 0.5
    if low.any():
        small = F.interpolate(x[low], size=(8, 8), mode="area")
        x[low] = F.interpolate(small, size=(out_size, out_size), mode="bilinear", align_corners=False)
    blur = torch.rand(n, generator=g) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        x[blur] = F.conv2d(x[blur], k[None, None], padding=1)
    x = x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6) * u(0.6, 1.0)[:, None, None, None]
    x = x + u(0.0, 0.15)[:, None, None, None] * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1).expand(-1, 3, -1, -1)


def caption_tokens(tokenizer: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenised captions for every (digit, template): ``[10, T, ctx]`` plus the caption texts' count."""
    texts = [t.format(w=DIGIT_WORDS[d], d=d) for d in range(10) for t in CAPTION_TEMPLATES]
    toks = tokenizer(texts).view(10, len(CAPTION_TEMPLATES), -1)
    return toks, torch.tensor(len(CAPTION_TEMPLATES))


# ---------------------------------------------------------------- build


def pretrain_standin(model_name: str, steps: int, seed: int, out_dir: Path, batch_size: int = 128, log: Callable[[str], None] = print) -> dict:
    """Contrastively pretrain the stand-in CLIP and save it as an open_clip ``local-dir:`` folder."""
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    register_model_configs()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(model_name)
    image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    bank, bank_labels = render_glyph_bank(seed)
    toks, n_templates = caption_tokens(tokenizer)
    loss_fn = ClipLoss()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.1)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    t0 = time.time()
    loss_val = float("nan")
    for step in range(steps):
        idx = torch.randint(0, len(bank), (batch_size,), generator=g)
        labels = bank_labels[idx]
        images = (augment_glyphs(bank, idx, image_size, g) - mean) / std
        tmpl = torch.randint(0, int(n_templates), (batch_size,), generator=g)
        text = toks[labels, tmpl]
        img_f = model.encode_image(images, normalize=True)
        txt_f = model.encode_text(text, normalize=True)
        loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_val = float(loss.detach())
        if step % 50 == 0 or step == steps - 1:
            log(f"  stand-in pretraining: step {step + 1}/{steps}  ClipLoss {loss_val:.3f}  ({time.time() - t0:.0f}s)")
    model.eval()
    cfg = open_clip.get_model_config(model_name)
    meta = {
        "model_name": model_name,
        "steps": steps,
        "seed": seed,
        "final_clip_loss": loss_val,
        "seconds": round(time.time() - t0, 1),
        "recipe_version": STANDIN_VERSION,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": cfg,
                "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)},
            },
            indent=2,
        )
    )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"), metadata={"soup_ray_standin": json.dumps(meta)})
    (out_dir / "standin.json").write_text(json.dumps(meta, indent=2))
    return meta


def ensure_standin(model_name: str = "soupray-digits-tiny", steps: int = 600, seed: int = 0, log: Callable[[str], None] = print) -> Path:
    """Return the cached stand-in folder, building it first if this recipe has never been built here.

    Safe to call from several processes at once: one builds, the others wait for it.
    """
    target = standin_dir(model_name, steps, seed)
    if (target / "standin.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "standin.json").is_file():
            return target
        log(f"building the offline stand-in CLIP ({model_name}, {steps} steps, seed {seed}) -> {target}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            meta = pretrain_standin(model_name, steps, seed, tmp, log=log)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log(f"stand-in built in {meta['seconds']}s (final ClipLoss {meta['final_clip_loss']:.3f})")
    return target
