#!/usr/bin/env bash
# Quick start, part 2: the whole test suite (offline, on an embedded local Ray).
#   bash scripts/test.sh            every test (what CI runs)
#   bash scripts/test.sh --quick    the tests that start no Ray, Serve, sweep, browser or venv (a few minutes)
# Extra arguments go to pytest (e.g. -k sweep, -x).
# The tests run in SOUP_RAY_TEST_WORKERS processes (default 2, a test file each at a time: most of a slow
# test's time is Ray, Serve or a subprocess starting up, not CPU); SOUP_RAY_TEST_WORKERS=0 runs them in this one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$ROOT/scripts/venv.sh")"
cd "$ROOT"
export HF_HUB_OFFLINE=1
WORKERS="${SOUP_RAY_TEST_WORKERS:-2}"
PARALLEL=()
if [ "$WORKERS" != "0" ]; then
  PARALLEL=(-n "$WORKERS" --dist loadfile)
fi
if [ "${1:-}" = "--quick" ]; then
  shift
  exec "$VENV/bin/python" -m pytest tests -m "not slow" "${PARALLEL[@]}" "$@"
fi
exec "$VENV/bin/python" -m pytest tests "${PARALLEL[@]}" "$@"
