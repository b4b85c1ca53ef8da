"""Figures and budget rules of the GPU check (``bench/gpu_check.py``): FLOPs per training image, bf16 peaks, reserves."""

from __future__ import annotations

# Budget kept for the phases after training when the compiled measurement decides whether it fits: the serving
# phase runs only with SERVE_MIN_LEFT_S left; averaging 8 ViT-B-32 checkpoints takes well under AVERAGE_RESERVE_S.
SERVE_MIN_LEFT_S = 90.0
AVERAGE_RESERVE_S = 40.0
# The compiled measurement starts only with this much spare beyond those reserves: a cold Inductor compile of
# ViT-B-32's forward and backward should take about a minute on a GPU host (not yet measured here), and a
# compile cannot be stopped once started.
COMPILE_WARMUP_MAX_S = 120.0
# Dry run: a cold Inductor compile of the stand-in's training step took about 50 s on a 2-core CPU, more than
# the whole dry run, so it uses "aot_eager" (Dynamo capture and AOTAutograd's forward/backward graphs, run
# eagerly: every step of torch.compile but Inductor's code generation). --compile-backend overrides it.
DRY_RUN_COMPILE_BACKEND = "aot_eager"

# Training FLOPs per image, ViT-B/32 at 224 px: forward = 2 x 4.41 GMACs (12 blocks of 50 tokens, width 768,
# MLP 3072: 4.29 GMACs; patch embedding 0.12 GMACs) = 8.8 GFLOP; backward ~ 2 x forward, so 3 x 8.8 ~ 26.5 GFLOP.
# Only for the model it was counted for (other models: no peak fraction).
TRAIN_FLOP_PER_IMAGE = {"ViT-B-32": 3 * 8.82e9}
# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s by a substring of torch.cuda.get_device_name(), first
# match wins (the PCIe/NVL parts before the SXM ones: "NVIDIA H100 80GB HBM3" and "NVIDIA H200" are SXM).
# Unknown devices: no peak fraction.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named like ``torch.cuda.get_device_name()``; None when not known."""
    return next((tf for key, tf in BF16_PEAK_TFLOPS if key in device_name), None)


def peak_fraction(images_per_s: float, model_name: str, peak_tflops: float | None) -> float | None:
    """Achieved fraction of the bf16 peak at TRAIN_FLOP_PER_IMAGE; None for another model or an unknown GPU."""
    flop = TRAIN_FLOP_PER_IMAGE.get(model_name)
    if flop is None or peak_tflops is None:
        return None
    return round(images_per_s * flop / (peak_tflops * 1e12), 4)


def later_phases_reserve_s(no_average: bool, no_serve: bool) -> float:
    """Seconds of the budget the compiled measurement leaves to the averaging and serving phases still to run."""
    return (0.0 if no_average else AVERAGE_RESERVE_S) + (0.0 if no_serve else SERVE_MIN_LEFT_S)


def compile_spare_s(budget_left_s: float, no_average: bool, no_serve: bool) -> float | None:
    """Seconds the compiled measurement may use, or None when its warm-up does not fit beside the later phases."""
    spare = budget_left_s - later_phases_reserve_s(no_average, no_serve)
    return spare if spare >= COMPILE_WARMUP_MAX_S else None
