"""The optional bearer token of the HTTP API: read from a file, compared in constant time, 401 otherwise.

``BearerAuth`` is a plain ASGI middleware: every path but the open ones
(``/healthz``) needs ``Authorization: Bearer TOKEN`` when a token is set; a
missing or wrong token gets a 401 JSON error with a ``WWW-Authenticate``
header (RFC 6750). The token is looked up per request through ``token()``, so
the middleware can be built before the replica that knows the token exists.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

REALM = "soup-ray"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class AuthTokenError(ValueError):
    """The configured token file cannot be used."""


def read_token(path: str | Path) -> bytes:
    """The token in ``path`` (surrounding whitespace dropped); refuses a missing, unreadable or empty file."""
    p = Path(path).expanduser()
    try:
        token = p.read_bytes().strip()
    except OSError as err:
        raise AuthTokenError(f"auth_token_file {p}: cannot be read ({err.strerror or err})") from None
    if not token:
        raise AuthTokenError(f"auth_token_file {p}: the file is empty; put a token in it "
                             "(e.g. `openssl rand -hex 32 > FILE`)")
    if any(c < 0x21 or c > 0x7E for c in token):
        raise AuthTokenError(f"auth_token_file {p}: the token must be one line of printable ASCII without spaces")
    return token


def bearer_token(header: bytes | None) -> bytes | None:
    """The credentials of an ``Authorization: Bearer ...`` header value, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not value.strip():
        return None
    return value.strip()


def token_matches(presented: bytes | None, expected: bytes) -> bool:
    """Whether ``presented`` is ``expected``, compared in constant time."""
    return presented is not None and hmac.compare_digest(presented, expected)


class BearerAuth:
    """ASGI middleware: HTTP requests to any path but ``open_paths`` need the bearer token (when one is set)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 token: Callable[[], bytes | None], open_paths: Iterable[str] = ("/healthz",)) -> None:
        self.app = app
        self.token = token
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or self._open(scope):
            await self.app(scope, receive, send)
            return
        expected = self.token()
        if expected is None:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers") or () if k.lower() == b"authorization"), None)
        presented = bearer_token(header)
        if token_matches(presented, expected):
            await self.app(scope, receive, send)
            return
        if presented is None:
            code, detail = "unauthorized", "this server wants `Authorization: Bearer TOKEN`"
            challenge = f'Bearer realm="{REALM}"'
        else:
            code, detail = "invalid_token", "the bearer token is not the server's token"
            challenge = f'Bearer realm="{REALM}", error="invalid_token"'
        body = json.dumps({"error": code, "detail": detail}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", challenge.encode())]})
        await send({"type": "http.response.body", "body": body})

    def _open(self, scope: Scope) -> bool:
        path = str(scope.get("path") or "/")
        root = str(scope.get("root_path") or "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        return path.rstrip("/") in {p.rstrip("/") for p in self.open_paths}
