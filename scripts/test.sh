#!/usr/bin/env bash
# Quick start, part 2: the whole test suite (offline, on an embedded local Ray).
#   bash scripts/test.sh            every test (what CI runs)
#   bash scripts/test.sh --quick    the tests that start no Ray, Serve, sweep, browser or venv (a few minutes)
# Extra arguments go to pytest (e.g. -k sweep, -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$ROOT/scripts/venv.sh")"
cd "$ROOT"
export HF_HUB_OFFLINE=1
if [ "${1:-}" = "--quick" ]; then
  shift
  exec "$VENV/bin/python" -m pytest tests -m "not slow" "$@"
fi
exec "$VENV/bin/python" -m pytest tests "$@"
