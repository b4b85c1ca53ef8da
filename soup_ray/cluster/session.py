"""The one place soup-ray starts or attaches to Ray, and what a driver passes to its workers.

``ray_session(address, ...)`` is what the sweep, the server, the benchmarks and
``soup-ray status`` call: ``address="local"`` starts an embedded Ray that never
attaches to a stranger's cluster; any other address joins that cluster. It
returns whether this call started Ray (so the caller shuts it down again).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

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


DEFAULT_DASHBOARD_PORT = 8265


def free_port(preferred: int, host: str = "127.0.0.1") -> int:
    """``preferred`` if nothing listens on it at ``host``, else a free port the system picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free TCP port on {host}")


def dashboard_auth_headers() -> dict[str, str]:
    """The ``Authorization`` header the dashboard's REST API wants when Ray's token auth is on (else empty)."""
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
    except ImportError:  # a Ray without token auth
        return {}
    return dict(get_auth_headers_if_auth_enabled({}))


def metrics_url(host: str | None = None) -> str | None:
    """Where this Ray node exports its Prometheus metrics (the soup actor's ``soup_*`` among them).

    ``host`` replaces the node's address (``127.0.0.1`` for the embedded Ray: loopback reaches it).
    """
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            return f"http://{host or node.get('NodeManagerAddress')}:{node['MetricsExportPort']}/metrics"
    return None


def ray_session(
    address: str | None = None,
    *,
    namespace: str | None = None,
    log: Log = print,
    env: dict[str, str] | None = None,
    num_cpus: int | None = None,
    log_to_driver: bool = True,
    quiet: bool = False,
    dashboard: bool = False,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    verbose: bool = True,
) -> bool:
    """Start (``"local"``) or join (any other address) Ray unless it is initialised; returns whether it did.

    ``env`` adds environment variables for every worker on top of
    :func:`worker_env_vars`. ``quiet`` drops the log line and Ray's INFO output
    (for short status queries). ``dashboard`` gives an embedded Ray its
    dashboard on 127.0.0.1 (``dashboard_port``, or a free one if that is taken)
    and prints its URL and the metrics endpoint first thing. ``verbose=False``
    keeps the console to warnings: Ray's own INFO lines and the workers'
    output stay in Ray's log files (``/tmp/ray/session_latest/logs``).
    """
    import ray

    if ray.is_initialized():
        return False
    target = resolve_address(address)
    worker_env = {**worker_env_vars(), **(env or {})}
    kwargs: dict[str, Any] = {
        "namespace": namespace,
        "runtime_env": {"env_vars": worker_env} if worker_env else None,
        "log_to_driver": log_to_driver,
    }
    if quiet:
        kwargs["logging_level"] = "ERROR"
    elif not verbose:
        kwargs["logging_level"] = "WARNING"
        kwargs["log_to_driver"] = False
        quiet_ray_loggers()
    if target == "local":
        if not quiet:
            log("starting an embedded local Ray (address='local')")
        if dashboard:
            kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(dashboard_port))
        else:
            kwargs["include_dashboard"] = False
        context = ray.init(address="local", num_cpus=num_cpus, **kwargs)
        if dashboard and not quiet:
            url = context.dashboard_url
            log(
                f"Ray dashboard: http://{url}  (it asks for Ray's auth token: `ray get-auth-token` prints it)"
                if url
                else "the Ray dashboard did not start (see Ray's log above)"
            )
            metrics = metrics_url("127.0.0.1")
            if metrics:
                log(f"Ray metrics (Prometheus text, soup_size, soup_heldout_accuracy, ...): {metrics}")
    else:
        if not quiet:
            log(f"connecting to the Ray cluster at {target}")
        ray.init(address=target, **kwargs)
    return True


def quiet_ray_loggers() -> None:
    """Ray Tune's and Serve's driver-side INFO lines at WARNING (``--verbose`` keeps them)."""
    import logging

    for name in ("ray", "ray.tune", "ray.serve", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # after a Ctrl-C, Tune's result grid warns once per trial that never started ("Failed to fetch metrics ...
    # result.json and progress.csv were not found"): 20 lines on the local default, which the sweep's own
    # "N trial(s) unfinished" line already says
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


def shutdown_ray() -> None:
    """Shut down the Ray this process started."""
    import ray

    ray.shutdown()
