"""A bounded HTTP load generator: POST image bytes to one URL from a pool of threads, with hard limits.

``run_level`` posts image bytes to one URL from a pool of threads sharing one
``httpx.Client``. Every level is bounded twice: it stops issuing requests
after ``max_requests`` or after ``max_seconds`` (whichever comes first), and
every request has its own timeout, so a level never lasts longer than
``max_seconds + timeout_s`` plus a small grace. It records the throughput
(successful requests per second, over the time until the last answer),
latency percentiles of the successful requests and the error counts by HTTP
status (or ``exc:<ExceptionName>`` for connection failures and timeouts).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import SweepConfig
from ..data import build_dataset
from ..run_dir import RunDir
from .stats import percentile

if TYPE_CHECKING:
    import httpx

JOIN_GRACE_S = 5.0


@dataclass
class LevelResult:
    """What one bounded level of load produced."""

    concurrency: int
    max_requests: int
    max_seconds: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    unfinished: int = 0
    stopped_by: str = "count"
    duration_s: float = 0.0
    throughput_rps: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @property
    def server_errors(self) -> int:
        """Answers with a 5xx status."""
        return sum(n for k, n in self.errors.items() if k.isdigit() and int(k) >= 500)


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99, mean, min and max of latencies given in seconds, in milliseconds."""
    ms = [1000.0 * v for v in latencies_s]

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {
        "p50": r(percentile(ms, 50)),
        "p95": r(percentile(ms, 95)),
        "p99": r(percentile(ms, 99)),
        "mean": r(float(np.mean(ms))) if ms else None,
        "min": r(min(ms)) if ms else None,
        "max": r(max(ms)) if ms else None,
    }


def _status_key(response: Any = None, error: BaseException | None = None) -> str:
    if error is not None:
        return f"exc:{type(error).__name__}"
    return str(int(response.status_code))


def parse_server_timing(value: str | None) -> dict[str, float]:
    """``Server-Timing: decode;dur=1.2, forward;dur=3`` -> ``{"decode": 1.2, "forward": 3.0}`` (milliseconds)."""
    out: dict[str, float] = {}
    for part in (value or "").split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, raw = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    out[name] = float(raw)
                except ValueError:
                    pass
    return out


def run_level(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    *,
    timeout_s: float = 30.0,
    content_type: str = "image/png",
    client: httpx.Client | None = None,
) -> LevelResult:
    """POST ``bodies`` (cycled) to ``url`` from ``concurrency`` threads until ``max_requests`` or ``max_seconds``.

    A request counts as successful when its status is 2xx. Throughput is the
    successful requests divided by the time from the start to the last answer.
    Requests still running after ``max_seconds + timeout_s`` plus a grace are
    abandoned (their threads are daemons) and counted in ``unfinished``. The
    mean of each ``Server-Timing`` duration of the successful answers goes to
    ``extra["server_timing_ms"]`` (where the server says the time went).
    """
    import httpx

    if not bodies:
        raise ValueError("run_level needs at least one request body")
    if concurrency < 1 or max_requests < 1 or max_seconds <= 0:
        raise ValueError("concurrency and max_requests must be >= 1 and max_seconds > 0")
    own = client is None
    if client is None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        client = httpx.Client(timeout=timeout_s, limits=limits, trust_env=False)
    headers = {"content-type": content_type}
    lock = threading.Lock()
    stop = threading.Event()  # set when the level ends or is interrupted: no worker starts another request
    issued = 0
    records: list[tuple[str, float, float]] = []  # (status key, latency s, completion time)
    timings: list[dict[str, float]] = []

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    deadline = t0 + max_seconds

    def claim() -> int | None:
        nonlocal issued
        with lock:
            if stop.is_set() or issued >= max_requests or time.perf_counter() >= deadline:
                return None
            issued += 1
            return issued - 1

    def worker() -> None:
        while (i := claim()) is not None:
            body = bodies[i % len(bodies)]
            start = time.perf_counter()
            timing: dict[str, float] = {}
            try:
                resp = client.post(url, content=body, headers=headers)
                key = _status_key(resp)
                if 200 <= resp.status_code < 300:
                    timing = parse_server_timing(resp.headers.get("server-timing"))
            except Exception as err:  # noqa: BLE001 - timeouts, refused connections, a client closed under us
                key = _status_key(error=err)
            end = time.perf_counter()
            with lock:
                records.append((key, end - start, end))
                if timing:
                    timings.append(timing)

    threads = [threading.Thread(target=worker, name=f"loadgen-{k}", daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    join_until = deadline + timeout_s + JOIN_GRACE_S
    try:
        for t in threads:
            t.join(timeout=max(0.0, join_until - time.perf_counter()))
    finally:  # also on KeyboardInterrupt: the workers must not keep loading a server that is being stopped
        stop.set()
        if own:
            client.close()
    with lock:
        done = list(records)
        sent = issued
        seen = list(timings)
    ok_lat = [lat for key, lat, _ in done if key.isdigit() and 200 <= int(key) < 300]
    errors = Counter(key for key, _, _ in done if not (key.isdigit() and 200 <= int(key) < 300))
    end = max((e for _, _, e in done), default=time.perf_counter())
    duration = max(end - t0, 1e-9)
    extra: dict[str, Any] = {}
    if seen:
        names = sorted({k for t in seen for k in t})
        extra["server_timing_ms"] = {k: round(float(np.mean([t[k] for t in seen if k in t])), 3) for k in names}
        extra["server_timing_answers"] = len(seen)
    return LevelResult(
        concurrency=concurrency,
        max_requests=max_requests,
        max_seconds=max_seconds,
        sent=sent,
        ok=len(ok_lat),
        errors=dict(sorted(errors.items())),
        unfinished=sent - len(done),
        stopped_by="count" if sent >= max_requests else "time",
        duration_s=round(duration, 4),
        throughput_rps=round(len(ok_lat) / duration, 3),
        latency_ms=latency_summary(ok_lat),
        client_cpu_s=round(time.process_time() - cpu0, 3),
        extra=extra,
    )


def png_bytes(array: np.ndarray) -> bytes:
    """An ``uint8`` image array ``[H, W, 3]`` as PNG bytes (grey ``L`` when the three channels are equal)."""
    from PIL import Image

    arr = np.asarray(array, dtype=np.uint8)
    if (
        arr.ndim == 3
        and arr.shape[2] == 3
        and np.array_equal(arr[..., 0], arr[..., 1])
        and np.array_equal(arr[..., 0], arr[..., 2])
    ):
        img = Image.fromarray(arr[..., 0], "L")
    else:
        img = Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def sample_pngs(run_dir: Path | str, n: int = 64, image_size: int | None = None) -> list[bytes]:
    """The first ``n`` test images of the run's dataset as PNG bytes, at ``image_size`` (default: the base's)."""
    paths = RunDir(run_dir)
    cfg = SweepConfig.model_validate_json(paths.config.read_text())
    size = int(image_size or json.loads(paths.base_meta.read_text())["image_size"])
    test = build_dataset(cfg.data, size).test
    out = []
    for i in range(min(int(n), len(test))):
        x, _ = test[i]
        out.append(png_bytes((x.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)))
    if not out:
        raise ValueError(f"{run_dir}: the test split has no images")
    return out


def parse_concurrency(text: str | Iterable[int]) -> list[int]:
    """'1,4,16' -> [1, 4, 16] (positive, ascending, unique)."""
    items = [int(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip()]
    if not items or any(v < 1 for v in items):
        raise ValueError(f"concurrency levels must be positive integers, got {text!r}")
    return sorted(set(items))
