"""The one place soup-ray starts or attaches to Ray, and what a driver passes to its workers.

``ray_session(address, ...)`` is what the sweep, the server, the benchmarks and
``soup-ray status`` call: ``address="local"`` starts an embedded Ray that never
attaches to a stranger's cluster; any other address joins that cluster. It
returns whether this call started Ray (so the caller shuts it down again).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

#: driver settings every worker must share: offline model hub, the stand-in cache
SHARED_ENV_VARS = ("HF_HUB_OFFLINE", "SOUP_RAY_CACHE")

Log = Callable[[str], None]


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


def resolve_address(address: str | None) -> str:
    """``address``, else ``RAY_ADDRESS`` (set by ``ray job submit``), else ``"local"``."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def ray_session(address: str | None = None, *, namespace: str | None = None, log: Log = print,
                env: dict[str, str] | None = None, num_cpus: int | None = None, log_to_driver: bool = True,
                quiet: bool = False) -> bool:
    """Start (``"local"``) or join (any other address) Ray unless it is initialised; returns whether it did.

    ``env`` adds environment variables for every worker on top of
    :func:`worker_env_vars`. ``quiet`` drops the log line and Ray's INFO output
    (for short status queries).
    """
    import ray

    if ray.is_initialized():
        return False
    target = resolve_address(address)
    worker_env = {**worker_env_vars(), **(env or {})}
    kwargs: dict[str, Any] = {"namespace": namespace, "runtime_env": {"env_vars": worker_env} if worker_env else None,
                              "log_to_driver": log_to_driver}
    if quiet:
        kwargs["logging_level"] = "ERROR"
    if target == "local":
        if not quiet:
            log("starting an embedded local Ray (address='local')")
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, **kwargs)
    else:
        if not quiet:
            log(f"connecting to the Ray cluster at {target}")
        ray.init(address=target, **kwargs)
    return True


def shutdown_ray() -> None:
    """Shut down the Ray this process started."""
    import ray

    ray.shutdown()
