"""The prepared GPU check runs end to end as a dry run on a CPU-only machine (tiny sizes, same code paths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", GPU_CHECK_SECONDS="1")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["model"].startswith("soupray-digits-tiny")
    for key in ("train_fp32_images_per_s", "train_bf16_autocast_images_per_s", "eval_fp32_images_per_s",
                "eval_bf16_autocast_images_per_s"):
        assert res[key] > 0, key
    avg = res["averaging"]
    assert avg["n"] == 8 and avg["stream_s"] > 0 and avg["read_s"] > 0 and avg["stream_over_read"] > 0
    assert avg["stream_into_model_over_read"] > 0
    assert "skipped" in res["serving_vitb32"]
