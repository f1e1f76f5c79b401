"""Bearer-token authentication for the management API.

The API binds 127.0.0.1 by default. Any other address needs a token (`serve
--api-token-file FILE`); once a token is configured every request must carry
`Authorization: Bearer TOKEN`, except `GET /api/v1/health`, which answers only
`{"status": "ok"}` and serves liveness probes (Docker's HEALTHCHECK) that hold no secret.
`/metrics` is protected like the rest: it names every volume, and Prometheus sends a bearer
token with `authorization: {credentials_file: ...}`.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

#: Paths served without a token even when one is configured.
OPEN_PATHS = frozenset({"/api/v1/health"})
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 4096

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TokenError(Exception):
    """The token file cannot be used; the message is one line for the operator."""


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the API on this machine (names other than localhost are
    not resolved: they count as reachable from elsewhere)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(token: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(f"the API token must be at least {MIN_TOKEN_LENGTH} characters")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError(f"the API token must be at most {MAX_TOKEN_LENGTH} characters")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise TokenError("the API token must be printable ASCII without spaces")
    return token


def read_token_file(path: str) -> str:
    """The token in `path` (surrounding whitespace, such as a final newline, is dropped)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKEN_LENGTH + 2)
    except OSError as e:
        raise TokenError(f"cannot read API token file {path!r}: {e.strerror or e}") from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenError(f"API token file {path!r}: the token must be printable ASCII") from None
    if not token:
        raise TokenError(f"API token file {path!r} is empty")
    try:
        return check_token(token)
    except TokenError as e:
        raise TokenError(f"API token file {path!r}: {e}") from None


def readable_by_others(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def bearer_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer TOKEN`, compared in constant time."""
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # aiohttp hands non-ASCII header bytes over as surrogate escapes: never a token.
    given = credentials.strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, token.encode())


def auth_middleware(token: str) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or bearer_matches(request.headers.get("Authorization"), token):
            return await handler(request)
        # Before routing: an unknown path answers 401 too, so nothing about routes leaks.
        return web.json_response(
            {"error": {"code": "unauthorized", "message": "missing or invalid bearer token"}},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="blockvirt"'},
        )

    return middleware
