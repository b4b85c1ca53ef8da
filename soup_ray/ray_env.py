"""What a soup-ray driver passes to its Ray workers through the runtime env."""

from __future__ import annotations

import json
import os

#: driver settings every worker must share: offline model hub, the stand-in cache
SHARED_ENV_VARS = ("HF_HUB_OFFLINE", "SOUP_RAY_CACHE")


def job_env_var_keys() -> set[str]:
    """Environment variables the enclosing Ray job's runtime env already sets (empty outside ``ray job submit``)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def worker_env_vars() -> dict[str, str]:
    """The driver's shared settings, less those a submitted job already passes to its workers.

    Ray refuses a driver runtime env that repeats a key of the job's own
    runtime env (``ray job submit --runtime-env-json``), and the job's env
    vars reach every worker of the job anyway.
    """
    skip = job_env_var_keys()
    return {k: os.environ[k] for k in SHARED_ENV_VARS if k in os.environ and k not in skip}
