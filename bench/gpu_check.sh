#!/usr/bin/env bash
# One prepared GPU check (at most 8 minutes): ViT-B-32 fine-tuning throughput (fp32, bf16 autocast, and compiled:
# torch.compile, fused AdamW, channels-last, bf16 autocast; --no-train-compile leaves it out) and evaluation
# throughput, averaging 8 ViT-B-32 checkpoints with the streaming function against a plain read, then the served
# soup against an ensemble of 5 over HTTP (Ray Serve, fractional GPUs) and the in-process ceiling.
# Usage, on a machine with one NVIDIA GPU, from the repository root:
#   bash bench/gpu_check.sh            # writes bench/results/gpu-<date>.json and gpu-<date>-serve.json/.png
#   GPU_CHECK_SECONDS=20 bash bench/gpu_check.sh --no-serve    # extra arguments go to bench/gpu_check.py
#   bash bench/gpu_check.sh --dry-run     # tiny sizes, CPU-only machines too (what the test suite runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, open_clip, soup_ray, httpx" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[test]" || { echo "install failed: run 'pip install -e .[test]' first" >&2; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
# the script keeps to --budget (440 s) by itself; timeout is the backstop: SIGTERM to the script only
# (--foreground: Ray's own processes must outlive it long enough for it to stop Serve), SIGKILL 15 s later
timeout --foreground -k 15 465 "$PY" bench/gpu_check.py --seconds "${GPU_CHECK_SECONDS:-25}" --budget 440 --train-compile "$@"
