#!/usr/bin/env bash
# Quick start, part 2: the whole test suite (offline, on an embedded local Ray).
# Extra arguments go to pytest (e.g. -k sweep, -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$ROOT/scripts/venv.sh")"
cd "$ROOT"
export HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m pytest tests "$@"
