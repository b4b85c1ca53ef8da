#!/usr/bin/env bash
# One prepared GPU check (at most ~6 minutes): ViT-B-32 fine-tuning and evaluation throughput.
# Usage, on a machine with one NVIDIA GPU, from the repository root:
#   bash bench/gpu_check.sh            # writes bench/results/gpu-<date>.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, open_clip, soup_ray" 2>/dev/null; then
  "$PY" -m pip install -q -e . || { echo "install failed: run 'pip install -e .' first" >&2; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
timeout 360 "$PY" bench/gpu_check.py --seconds "${GPU_CHECK_SECONDS:-45}" "$@"
