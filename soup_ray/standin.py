"""The offline stand-in for a pretrained CLIP.

No weights can be downloaded on a laptop without network, so soup-ray pretrains a
small CLIP itself: an open_clip model config registered with
``open_clip.add_model_config``, trained on digit glyphs captioned from templates
such as "a photo of the number seven". The glyphs are Pillow's built-in font at
many sizes and strokes plus digits drawn as jittered pen strokes; each batch
fits them to the frame, rotates, shears, warps (elastic), thickens or thins
them, sends most through an 8x8 17-level bottleneck, and adds blur and noise.
None of these images come from the fine-tuning data. The loss is class-aware
(``class_loss``): each image against one random caption of each of the 10
classes, each caption against the batch's images of its class, and captions of
the same class against each other, so same-class pairs are never negatives
(``RECIPE["loss"] = "clip"`` selects open_clip's ``ClipLoss`` instead). The
result is deterministic for a seed and cached as an open_clip ``local-dir:``
folder, so it is built once per machine.
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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import DIGIT_NAMES

CONFIG_DIR = Path(__file__).parent / "model_configs"
STANDIN_VERSION = 3  # bump when the recipe changes, so old caches are not reused
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
    key = json.dumps({"cfg": cfg, "steps": steps, "seed": seed, "v": STANDIN_VERSION, "recipe": RECIPE}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / f"standin-{model_name}-{digest}"


# ---------------------------------------------------------------- synthetic glyphs

# The recipe as data. Every value is part of the cache key, so changing one builds a new stand-in.
RECIPE: dict = {
    "loss": "class",  # "class": image vs the 10 class captions (+ text side); "clip": open_clip ClipLoss
    "text_side": 0.5,  # weight of the text-to-image term of the class loss
    "lr": 3e-3,
    "weight_decay": 0.1,
    "warmup_frac": 0.1,
    "batch_size": 128,
    "freeze_token_embedding": True,  # only ~30 of the 49,408 token rows are ever used
    "hand_per_digit": 300,  # stroke-drawn "handwritten" glyphs per digit
    "hand_frac": 0.6,  # share of each batch drawn from the stroke-drawn glyphs (the rest: font glyphs)
    "fit_frac": 0.8,  # share of images whose glyph fills 75-100 % of the frame height (as in the target data)
    "p8": 0.8,  # share of images that go through an 8x8 (17-level) bottleneck
    "elastic": 0.08,  # amplitude of the smooth random displacement field
    "rot": 15.0,
    "shear": 0.3,
    "noise_p": 0.4,
    "noise_max": 0.3,
    "text_text": 1.0,  # caption-vs-caption term (two templates per class): spreads the classes apart
    # early; without it both towers collapse to constant features for hundreds of steps
}


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
                draw.text(
                    ((canvas - w) / 2 - box[0], (canvas - h) / 2 - box[1]),
                    str(d),
                    fill=255,
                    font=font,
                    stroke_width=stroke,
                )
                glyphs.append(np.asarray(im, dtype=np.float32) / 255.0)
                labels.append(d)
    return torch.from_numpy(np.stack(glyphs))[:, None], torch.tensor(labels)


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 14) -> list[tuple[float, float]]:
    a = np.deg2rad(np.linspace(a0, a1, n))
    return list(zip((cx + rx * np.cos(a)).tolist(), (cy + ry * np.sin(a)).tolist(), strict=True))


# Each digit as pen strokes in a unit box (x right, y down), a few common ways of writing it.
HAND_STROKES: dict[int, list[list[list[tuple[float, float]]]]] = {
    0: [[_arc(0.5, 0.5, 0.32, 0.47, -90, 270, 20)], [_arc(0.5, 0.5, 0.26, 0.47, -70, 300, 20)]],
    1: [
        [[(0.5, 0.0), (0.5, 1.0)]],
        [[(0.28, 0.22), (0.52, 0.0), (0.52, 1.0)]],
        [[(0.3, 0.2), (0.52, 0.0), (0.52, 1.0)], [(0.3, 1.0), (0.75, 1.0)]],
    ],
    2: [
        [_arc(0.5, 0.3, 0.3, 0.28, 180, 390) + [(0.15, 1.0), (0.88, 1.0)]],
        [_arc(0.5, 0.28, 0.3, 0.27, 200, 400) + [(0.4, 0.75), (0.18, 0.98), (0.5, 0.9), (0.9, 0.98)]],
    ],
    3: [
        [_arc(0.48, 0.26, 0.3, 0.25, 200, 450) + _arc(0.48, 0.75, 0.34, 0.25, 270, 520)],
        [[(0.18, 0.02), (0.8, 0.02), (0.42, 0.42)] + _arc(0.48, 0.7, 0.34, 0.29, 260, 520)],
    ],
    4: [
        [[(0.7, 1.0), (0.7, 0.0), (0.1, 0.68), (0.92, 0.68)]],
        [[(0.28, 0.0), (0.15, 0.62), (0.9, 0.62)], [(0.68, 0.25), (0.68, 1.0)]],
    ],
    5: [
        [[(0.82, 0.02), (0.3, 0.02), (0.25, 0.45)] + _arc(0.5, 0.69, 0.33, 0.29, 225, 510)],
        [[(0.3, 0.02), (0.25, 0.45)] + _arc(0.5, 0.69, 0.33, 0.29, 225, 510), [(0.3, 0.02), (0.85, 0.02)]],
    ],
    6: [
        [[(0.75, 0.02), (0.5, 0.12), (0.3, 0.35), (0.21, 0.65)] + _arc(0.5, 0.72, 0.29, 0.27, 180, 540)],
        [[(0.6, 0.0), (0.35, 0.35), (0.22, 0.7)] + _arc(0.5, 0.75, 0.28, 0.24, 160, 520)],
    ],
    7: [
        [[(0.12, 0.0), (0.88, 0.0), (0.4, 1.0)]],
        [[(0.12, 0.0), (0.88, 0.0), (0.4, 1.0)], [(0.35, 0.52), (0.8, 0.52)]],
        [[(0.12, 0.18), (0.14, 0.0), (0.88, 0.02), (0.55, 0.55), (0.45, 1.0)]],
    ],
    8: [
        [_arc(0.5, 0.26, 0.24, 0.25, 0, 360), _arc(0.5, 0.73, 0.3, 0.27, 0, 360)],
        [_arc(0.5, 0.25, 0.26, 0.24, 90, 450, 18) + _arc(0.5, 0.74, 0.3, 0.26, 270, -90, 18)],
    ],
    9: [
        [_arc(0.48, 0.3, 0.28, 0.29, 0, 360), [(0.76, 0.3), (0.72, 0.65), (0.6, 1.0)]],
        [_arc(0.48, 0.3, 0.28, 0.29, 0, 360), [(0.76, 0.3), (0.76, 1.0)]],
        [_arc(0.5, 0.3, 0.27, 0.28, 10, 370), [(0.77, 0.35), (0.7, 0.8), (0.45, 1.0), (0.25, 0.9)]],
    ],
}


def render_hand_bank(seed: int, per_digit: int, canvas: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits drawn as jittered pen strokes of random width and aspect: ``[10*per_digit,1,canvas,canvas]``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed + 7919)
    glyphs, labels = [], []
    for d in range(10):
        for _ in range(per_digit):
            variant = HAND_STROKES[d][rng.integers(len(HAND_STROKES[d]))]
            aspect = rng.uniform(0.55, 1.1)
            width = int(rng.integers(6, 15))
            jitter = rng.uniform(0.01, 0.05)
            lean = rng.uniform(-0.2, 0.2)
            im = Image.new("L", (canvas, canvas), 0)
            draw = ImageDraw.Draw(im)
            height = canvas * 0.75
            for stroke in variant:
                p = np.asarray(stroke, dtype=np.float64)
                p = p + rng.normal(0.0, jitter, p.shape)
                x = 0.5 + (p[:, 0] - 0.5) * aspect + lean * (0.5 - p[:, 1])
                pts = list(
                    zip(
                        (canvas / 2 + (x - 0.5) * height).tolist(),
                        (canvas / 2 + (p[:, 1] - 0.5) * height).tolist(),
                        strict=True,
                    )
                )
                draw.line(pts, fill=255, width=width, joint="curve")
                r = width / 2
                for px, py in (pts[0], pts[-1]):
                    draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
            glyphs.append(np.asarray(im, dtype=np.float32) / 255.0)
            labels.append(d)
    return torch.from_numpy(np.stack(glyphs))[:, None], torch.tensor(labels)


def glyph_boxes(bank: torch.Tensor) -> torch.Tensor:
    """Each glyph's ink box in grid_sample coordinates: ``[N, 3]`` = (centre x, centre y, height), in [-1, 1] units."""
    ink = bank[:, 0] > 0.2
    n, h, w = ink.shape
    rows, cols = ink.any(2), ink.any(1)
    ar_h, ar_w = torch.arange(h).expand(n, h), torch.arange(w).expand(n, w)
    top = torch.where(rows, ar_h, h).amin(1).float()
    bot = torch.where(rows, ar_h, -1).amax(1).float() + 1
    left = torch.where(cols, ar_w, w).amin(1).float()
    right = torch.where(cols, ar_w, -1).amax(1).float() + 1
    cx = (left + right) / w - 1
    cy = (top + bot) / h - 1
    height = ((bot - top) * 2 / h).clamp_min(0.1)
    return torch.stack([cx, cy, height], 1)


def augment_glyphs(
    bank: torch.Tensor,
    idx: torch.Tensor,
    out_size: int,
    g: torch.Generator,
    boxes: torch.Tensor | None = None,
    recipe: dict | None = None,
) -> torch.Tensor:
    """Fit to the frame, rotation, shear, aspect, elastic warp, thickness, an 8x8 bottleneck, blur and noise, in one batch."""
    r = {**RECIPE, **(recipe or {})}
    n = len(idx)
    x = bank[idx]
    boxes = glyph_boxes(bank) if boxes is None else boxes
    box = boxes[idx]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    fit = torch.rand(n, generator=g) < r["fit_frac"]
    frac = torch.where(fit, u(0.75, 1.0), u(0.45, 0.9))  # share of the output height the glyph fills
    s = box[:, 2] / (2 * frac)  # input units per output unit
    ax = u(0.8, 1.25)
    ang = u(-r["rot"], r["rot"]) * math.pi / 180
    shear = u(-r["shear"], r["shear"])
    cos, sin = torch.cos(ang), torch.sin(ang)
    tmax = torch.where(fit, torch.full((n,), 0.05), torch.full((n,), 0.25))
    tx, ty = (torch.rand(n, generator=g) * 2 - 1) * tmax, (torch.rand(n, generator=g) * 2 - 1) * tmax
    theta = torch.zeros(n, 2, 3)
    # input = centre + s * diag(ax, 1) @ R @ Shear @ (output - t)
    theta[:, 0, 0] = s * ax * cos
    theta[:, 0, 1] = s * ax * (cos * shear - sin)
    theta[:, 1, 0] = s * sin
    theta[:, 1, 1] = s * (sin * shear + cos)
    theta[:, 0, 2] = box[:, 0] - theta[:, 0, 0] * tx - theta[:, 0, 1] * ty
    theta[:, 1, 2] = box[:, 1] - theta[:, 1, 0] * tx - theta[:, 1, 1] * ty
    hi = out_size * 2
    grid = F.affine_grid(theta, [n, 1, hi, hi], align_corners=False)
    if r["elastic"] > 0:
        field = torch.randn(n, 2, 4, 4, generator=g) * r["elastic"] * u(0.0, 1.0)[:, None, None, None]
        field = F.interpolate(field, size=(hi, hi), mode="bicubic", align_corners=False)
        grid = grid + field.permute(0, 2, 3, 1) * s[:, None, None, None]
    x = F.grid_sample(x, grid, align_corners=False)
    thick = torch.rand(n, generator=g)
    dil, ero = thick < 0.25, thick > 0.85
    if dil.any():
        x[dil] = F.max_pool2d(x[dil], 3, 1, 1)
    if ero.any():
        x[ero] = -F.max_pool2d(-x[ero], 3, 1, 1)
    x = F.interpolate(x, size=(out_size, out_size), mode="area")
    x = x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    # most images go through an 8x8, 17-level bottleneck like the scanned digits they stand in for
    low = torch.rand(n, generator=g) < r["p8"]
    if low.any():
        small = F.interpolate(x[low], size=(8, 8), mode="area")
        small = small / small.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        small = (small * 16).round() / 16
        x[low] = F.interpolate(small, size=(out_size, out_size), mode="bilinear", align_corners=False)
    blur = (torch.rand(n, generator=g) < 0.2) & ~low
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        x[blur] = F.conv2d(x[blur], k[None, None], padding=1)
    x = x * u(0.8, 1.0)[:, None, None, None]
    noisy = (torch.rand(n, generator=g) < r["noise_p"]).float()
    x = x + (noisy * u(0.0, r["noise_max"]))[:, None, None, None] * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1).expand(-1, 3, -1, -1)


def caption_tokens(tokenizer: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenised captions for every (digit, template): ``[10, T, ctx]`` plus the caption texts' count."""
    texts = [t.format(w=DIGIT_NAMES[d], d=d) for d in range(10) for t in CAPTION_TEMPLATES]
    toks = tokenizer(texts).view(10, len(CAPTION_TEMPLATES), -1)
    return toks, torch.tensor(len(CAPTION_TEMPLATES))


def class_loss(
    img_f: torch.Tensor, cls_f: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, text_side: float
) -> torch.Tensor:
    """Image vs the 10 class captions (cross-entropy), plus each caption vs the batch's images of its class.

    Unlike ``ClipLoss`` the ~13 other images of the same class in a batch are positives, not negatives.
    """
    logits = scale * img_f @ cls_f.T  # [B, 10]
    loss = F.cross_entropy(logits, labels)
    if text_side > 0:
        present = torch.unique(labels)
        t_logits = scale * cls_f[present] @ img_f.T  # [C, B]
        target = (labels[None, :] == present[:, None]).float()
        target = target / target.sum(1, keepdim=True)
        loss = (loss + text_side * -(target * F.log_softmax(t_logits, 1)).sum(1).mean()) / (1 + text_side)
    return loss


# ---------------------------------------------------------------- build


def pretrain_standin(
    model_name: str,
    steps: int,
    seed: int,
    out_dir: Path,
    batch_size: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Pretrain the stand-in CLIP on glyph/caption pairs and save it as an open_clip ``local-dir:`` folder."""
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    r = dict(RECIPE)
    batch_size = int(batch_size or r["batch_size"])
    register_model_configs()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(model_name)
    image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    t0 = time.time()
    font_bank, font_labels = render_glyph_bank(seed)
    n_hand = int(r["hand_per_digit"])
    if n_hand > 0:
        hand_bank, hand_labels = render_hand_bank(seed, n_hand)
        bank, bank_labels = torch.cat([font_bank, hand_bank]), torch.cat([font_labels, hand_labels])
    else:
        bank, bank_labels = font_bank, font_labels
    boxes = glyph_boxes(bank)
    n_font = len(font_bank)
    toks, n_templates = caption_tokens(tokenizer)
    clip_loss = ClipLoss()
    if r["freeze_token_embedding"]:
        model.token_embedding.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"])
    warm = max(1, int(steps * r["warmup_frac"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    loss_val = float("nan")
    for step in range(steps):
        if n_hand > 0:
            from_hand = torch.rand(batch_size, generator=g) < r["hand_frac"]
            idx = torch.where(
                from_hand,
                n_font + torch.randint(0, len(bank) - n_font, (batch_size,), generator=g),
                torch.randint(0, n_font, (batch_size,), generator=g),
            )
        else:
            idx = torch.randint(0, len(bank), (batch_size,), generator=g)
        labels = bank_labels[idx]
        images = (augment_glyphs(bank, idx, image_size, g, boxes, r) - mean) / std
        img_f = model.encode_image(images, normalize=True)
        scale = model.logit_scale.exp()
        if r["loss"] == "class":
            # one random caption per class for the images, and a second one per class for the caption-vs-caption term
            tmpl = torch.randint(0, int(n_templates), (2, 10), generator=g)
            both = model.encode_text(toks[torch.arange(10).repeat(2), tmpl.reshape(-1)], normalize=True)
            cls_f, cls_b = both[:10], both[10:]
            loss = class_loss(img_f, cls_f, labels, scale, r["text_side"])
            if r["text_text"] > 0:
                tt = scale * cls_f @ cls_b.T
                ar = torch.arange(10)
                loss = loss + r["text_text"] * 0.5 * (F.cross_entropy(tt, ar) + F.cross_entropy(tt.T, ar))
        else:
            tmpl = torch.randint(0, int(n_templates), (batch_size,), generator=g)
            txt_f = model.encode_text(toks[labels, tmpl], normalize=True)
            loss = clip_loss(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_val = float(loss.detach())
        if step % 50 == 0 or step == steps - 1:
            log(f"  stand-in pretraining: step {step + 1}/{steps}  loss {loss_val:.3f}  ({time.time() - t0:.0f}s)")
    model.eval()
    cfg = open_clip.get_model_config(model_name)
    meta = {
        "model_name": model_name,
        "steps": steps,
        "seed": seed,
        "final_clip_loss": loss_val,
        "loss": r["loss"],
        "seconds": round(time.time() - t0, 1),
        "recipe_version": STANDIN_VERSION,
        "recipe": r,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": cfg,
                "preprocess_cfg": {
                    "mean": list(open_clip.OPENAI_DATASET_MEAN),
                    "std": list(open_clip.OPENAI_DATASET_STD),
                },
            },
            indent=2,
        )
    )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # The weights file carries the recipe but not the build time: two builds of one recipe on one machine
    # are the same file, so the checksum in standin.json can verify it.
    recipe_meta = {k: v for k, v in meta.items() if k != "seconds"}
    weights = out_dir / "open_clip_model.safetensors"
    save_file(state, str(weights), metadata={"soup_ray_standin": json.dumps(recipe_meta, sort_keys=True)})
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (out_dir / "standin.json").write_text(json.dumps(meta, indent=2))
    return meta


def standin_cached(model_cfg) -> bool:
    """Whether the stand-in that ``model_cfg`` (a ``ModelConfig``) names is built and cached already."""
    return (standin_dir(model_cfg.name, model_cfg.standin_steps, model_cfg.standin_seed) / "standin.json").is_file()


def ensure_standin(
    model_name: str = "soupray-digits-tiny", steps: int = 800, seed: int = 0, log: Callable[[str], None] = print
) -> Path:
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
        log(f"stand-in built in {meta['seconds']}s (final {meta['loss']} loss {meta['final_clip_loss']:.3f})")
    return target
