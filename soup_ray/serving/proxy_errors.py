"""A JSON 503 from Serve's HTTP proxy when the replica holding a request dies before it answers.

Ray Serve's proxy retries a request only until a replica accepts it. When that replica then dies (a lost
node, an OOM kill, ``ray.kill``), the proxy sends nothing and its HTTP server answers a plain-text 500,
although the client did nothing wrong and the same request succeeds a moment later on another replica.
:func:`middlewares` is the proxy's callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, read when Serve's
processes start): it wraps the proxy so that a request left without any answer gets the JSON 503 with
``Retry-After`` that the application gives for an unavailable model. An answer already started passes as it is.

Imported by Serve's proxy process: only the standard library and Starlette here.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = f"{__name__}:middlewares"
RETRY_AFTER_S = "1"  # ServeOptions.retry_after_s's default: the proxy cannot see an application's settings
ERROR_CODE = "replica_lost"


def _answer(retry_after_s: str) -> tuple[dict[str, Any], bytes]:
    body = json.dumps(
        {
            "error": ERROR_CODE,
            "detail": "the server replica handling this request stopped before it answered; retry the request",
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", retry_after_s.encode()),
    ]
    return {"type": "http.response.start", "status": 503, "headers": headers}, body


class ReplicaLostAnswer:
    """ASGI middleware: an HTTP request the wrapped app leaves unanswered (or fails before answering) gets a 503."""

    def __init__(self, app: Any, retry_after_s: str = RETRY_AFTER_S) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
        if started:
            return
        start, body = _answer(self.retry_after_s)
        with contextlib.suppress(Exception):  # the client may have gone already: nothing to answer then
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})


def middlewares() -> list[Any]:
    """Serve's HTTP proxy callback: the middlewares it wraps its ASGI app with."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLostAnswer)]
