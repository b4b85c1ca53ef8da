#!/usr/bin/env bash
# Quick start, part 1: the main job end to end on an embedded local Ray.
# Extra arguments go to `soup-ray run` (e.g. --out runs/mine, --seed 1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$ROOT/scripts/venv.sh")"
cd "$ROOT"
exec "$VENV/bin/soup-ray" run tune_configs/local.yaml "$@"
