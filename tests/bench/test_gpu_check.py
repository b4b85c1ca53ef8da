"""The prepared GPU check runs end to end as a dry run on a CPU-only machine (tiny sizes, same code paths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import soup_ray.bench.gpu_figures as gf

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", GPU_CHECK_SECONDS="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["model"].startswith("soupray-digits-tiny")
    for key in (
        "train_fp32_images_per_s",
        "train_bf16_autocast_images_per_s",
        "eval_fp32_images_per_s",
        "eval_bf16_autocast_images_per_s",
    ):
        assert res[key] > 0, key
    # the wrapper turns --train-compile on: compiled on CPU with the dry run's backend, no fused AdamW there
    comp = res["train_bf16_compiled"]
    assert "error" not in comp and "skipped" not in comp, comp
    assert res["train_bf16_compiled_images_per_s"] > 0
    assert res["train_compiled_over_bf16"] == round(
        res["train_bf16_compiled_images_per_s"] / res["train_bf16_autocast_images_per_s"], 3
    )
    assert comp["compile_backend"] == "aot_eager" and comp["compile_mode"] is None and "note" in comp
    assert comp["fused_adamw"] is False and "optimizer_note" in comp and comp["channels_last"] is True
    assert comp["compile_warmup_s"] > 0 and comp["compile_warmup_steps"] >= 1 and comp["steps"] >= 1
    # no peak fraction for the stand-in model on a CPU
    assert res["bf16_peak_tflops"] is None and res["train_flop_per_image"] is None
    assert res["train_bf16_autocast_peak_fraction"] is None and res["train_bf16_compiled_peak_fraction"] is None
    avg = res["averaging"]
    assert avg["n"] == 8 and avg["stream_s"] > 0 and avg["read_s"] > 0 and avg["stream_over_read"] > 0
    assert avg["stream_into_model_over_read"] > 0
    assert "skipped" in res["serving_vitb32"]


def test_the_compiled_phase_runs_only_when_its_warm_up_fits_beside_the_later_phases() -> None:
    reserve = gf.AVERAGE_RESERVE_S + gf.SERVE_MIN_LEFT_S
    assert gf.later_phases_reserve_s(no_average=False, no_serve=False) == reserve
    assert gf.compile_spare_s(reserve + 60, no_average=False, no_serve=False) is None  # skipped
    # without the later phases the same budget leaves room for the compile warm-up
    assert gf.compile_spare_s(reserve + 60, no_average=True, no_serve=True) == reserve + 60
    assert (
        gf.compile_spare_s(reserve + gf.COMPILE_WARMUP_MAX_S, no_average=False, no_serve=False)
        == gf.COMPILE_WARMUP_MAX_S
    )


def test_bf16_peak_fraction() -> None:
    assert gf.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == gf.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert gf.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0 and gf.bf16_peak_tflops("Some GPU") is None
    # 10,000 images/s at ~26.5 GFLOP each on 989 TFLOP/s: about 27 % of the peak
    assert 0.26 < gf.peak_fraction(10_000, "ViT-B-32", 989.0) < 0.28
    assert gf.peak_fraction(10_000, "ViT-B-32", None) is None
    assert gf.peak_fraction(10_000, "soupray-digits-tiny", 989.0) is None
