"""Distribution shifts for the built-in digits data: fixed, seeded transformations of the test split.

Each shift maps a float image batch ``[N, C, H, W]`` in [0, 1] to a new batch of the
same shape, drawing its randomness from the ``torch.Generator`` it is given, so the
shifted test sets are identical on every machine and in every trial.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as TF

Shift = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
SHIFTS: dict[str, Shift] = {}


def register_shift(name: str) -> Callable[[Shift], Shift]:
    """Register a shift under ``name`` so configs can ask for it."""

    def deco(fn: Shift) -> Shift:
        SHIFTS[name] = fn
        return fn

    return deco


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _signs(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


@register_shift("rotate")
def rotate(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rotation by 20-30 degrees, either way."""
    angles = _uniform(g, len(images), 20.0, 30.0) * _signs(g, len(images))
    return torch.stack([TF.rotate(img, float(a)) for img, a in zip(images, angles, strict=True)])


@register_shift("affine")
def affine(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shear of 15-25 degrees, shrink to 70-85 %, shift by up to 3 pixels."""
    n = len(images)
    shears = _uniform(g, n, 15.0, 25.0) * _signs(g, n)
    scales = _uniform(g, n, 0.70, 0.85)
    shifts = torch.randint(-3, 4, (n, 2), generator=g)
    out = [
        TF.affine(img, angle=0.0, translate=[int(t[0]), int(t[1])], scale=float(s), shear=[float(sh), 0.0])
        for img, sh, s, t in zip(images, shears, scales, shifts, strict=True)
    ]
    return torch.stack(out)


@register_shift("noise")
def noise(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Strong additive Gaussian noise (sigma 0.4), clipped to [0, 1]."""
    return (images + 0.4 * torch.randn(images.shape, generator=g)).clamp(0.0, 1.0)


@register_shift("occlude")
def occlude(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random square covering about a sixth of the image is blanked out."""
    n, _, h, w = images.shape
    side = max(1, round(0.4 * h))
    out = images.clone()
    ys = torch.randint(h // 8, h - side - h // 8 + 1, (n,), generator=g)
    xs = torch.randint(w // 8, w - side - w // 8 + 1, (n,), generator=g)
    for i in range(n):
        out[i, :, ys[i] : ys[i] + side, xs[i] : xs[i] + side] = 0.0
    return out


def apply_shift(name: str, images: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply the registered shift ``name`` with a generator seeded from ``seed`` and the name."""
    if name not in SHIFTS:
        raise KeyError(f"unknown shift {name!r}; available: {sorted(SHIFTS)}")
    g = torch.Generator().manual_seed(seed * 1009 + sum(map(ord, name)))
    return SHIFTS[name](images, g)
