"""The optional bearer token of the HTTP API: read from a file, compared in constant time, 401 otherwise.

``BearerAuth`` is a plain ASGI middleware: every path but the open ones
(``/healthz``) needs ``Authorization: Bearer TOKEN`` when a token is set; a
missing or wrong token gets a 401 JSON error with a ``WWW-Authenticate``
header (RFC 6750). The token is looked up per request through ``token()``, so
the middleware can be built before the replica that knows the token exists.

A browser cannot send that header, so the live page has a login: ``GET
/login`` is a form for the token, ``POST /login`` compares it (constant time)
and sets an ``HttpOnly; SameSite=Strict`` session cookie, which then stands in
for the header. The cookie holds an HMAC of the token, never the token itself.
A browser that asks for a page (``Accept: text/html``) without credentials is
sent to the login form instead of getting the JSON 401.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

REALM = "soup-ray"
LOGIN_PATH = "/login"
SESSION_COOKIE = "soup_ray_session"
MAX_LOGIN_BODY = 4096

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
        raise AuthTokenError(
            f"auth_token_file {p}: the file is empty; put a token in it (e.g. `openssl rand -hex 32 > FILE`)"
        )
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


def session_value(token: bytes) -> bytes:
    """The session cookie's value for ``token``: an HMAC of it (a stolen cookie does not reveal the token)."""
    return hmac.new(token, b"soup-ray live page session", hashlib.sha256).hexdigest().encode()


def session_cookie(header: bytes | None) -> bytes | None:
    """The value of the session cookie in a ``Cookie`` header, or None."""
    for part in (header or b"").split(b";"):
        name, _, value = part.strip().partition(b"=")
        if name == SESSION_COOKIE.encode() and value:
            return value.strip()
    return None


def login_form(action: str, message: str = "") -> bytes:
    """The login page: one password field for the server's token (posted to ``action``)."""
    note = f'<p class="error">{html.escape(message)}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>soup-ray: sign in</title>
<style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}}
input{{font:inherit;width:100%;margin:.4rem 0;padding:.4rem}}.error{{color:#b00}}</style></head>
<body><h1>soup-ray</h1><p>This server wants its token (the contents of its <code>auth_token_file</code>).</p>
{note}<form method="post" action="{html.escape(action)}">
<label for="token">Token</label><input id="token" name="token" type="password" autocomplete="current-password"
autofocus required><button type="submit">Sign in</button></form></body></html>""".encode()


class BearerAuth:
    """ASGI middleware: HTTP requests to any path but ``open_paths`` need the bearer token (when one is set)."""

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        token: Callable[[], bytes | None],
        open_paths: Iterable[str] = ("/healthz",),
    ) -> None:
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
        headers = {k.lower(): v for k, v in scope.get("headers") or ()}
        if self._path(scope) == LOGIN_PATH:
            await self._login(scope, receive, send, expected)
            return
        presented = bearer_token(headers.get(b"authorization"))
        cookie = session_cookie(headers.get(b"cookie"))
        if token_matches(presented, expected) or token_matches(cookie, session_value(expected)):
            await self.app(scope, receive, send)
            return
        if presented is None and scope.get("method") == "GET" and b"text/html" in headers.get(b"accept", b""):
            await _send(send, 303, b"", [(b"location", self._url(scope, LOGIN_PATH).encode())])
            return
        if presented is None:
            code, detail = "unauthorized", "this server wants `Authorization: Bearer TOKEN`"
            challenge = f'Bearer realm="{REALM}"'
        else:
            code, detail = "invalid_token", "the bearer token is not the server's token"
            challenge = f'Bearer realm="{REALM}", error="invalid_token"'
        body = json.dumps({"error": code, "detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", challenge.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _login(self, scope: Scope, receive: Receive, send: Send, expected: bytes) -> None:
        """GET: the form. POST: the token compared in constant time; right: the session cookie and back to the page."""
        page = [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store")]
        action = self._url(scope, LOGIN_PATH)
        if scope.get("method") == "GET":
            await _send(send, 200, login_form(action), page)
            return
        if scope.get("method") != "POST":
            await _send(
                send,
                405,
                b'{"error": "method_not_allowed", "detail": "GET or POST /login"}',
                [(b"content-type", b"application/json"), (b"allow", b"GET, POST")],
            )
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_LOGIN_BODY:
                await _send(send, 413, login_form(action, "That is not a token (too long)."), page)
                return
            if not message.get("more_body"):
                break
        try:
            token = parse_qs(body.decode("utf-8"), max_num_fields=4).get("token", [""])[0].strip().encode()
        except (UnicodeDecodeError, ValueError):
            token = b""
        if not token_matches(token or None, expected):
            await _send(send, 401, login_form(action, "Wrong token."), page)
            return
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        root = str(scope.get("root_path") or "").rstrip("/") or "/"
        cookie = f"{SESSION_COOKIE}={session_value(expected).decode()}; Path={root}; HttpOnly; SameSite=Strict{secure}"
        await _send(
            send,
            303,
            b"",
            [
                (b"location", self._url(scope, "/").encode()),
                (b"set-cookie", cookie.encode()),
                (b"cache-control", b"no-store"),
            ],
        )

    @staticmethod
    def _path(scope: Scope) -> str:
        path = str(scope.get("path") or "/")
        root = str(scope.get("root_path") or "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        return path

    @staticmethod
    def _url(scope: Scope, path: str) -> str:
        """``path`` under the application's route prefix (what a redirect or a form action names)."""
        return str(scope.get("root_path") or "").rstrip("/") + path

    def _open(self, scope: Scope) -> bool:
        return self._path(scope).rstrip("/") in {p.rstrip("/") for p in self.open_paths}


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
