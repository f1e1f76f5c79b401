"""Cross-site request and DNS-rebinding defences for the management API.

The API needs no token on loopback, so a web page in a local browser is the attacker to
think of: it can send "simple" cross-site requests (a `text/plain` POST, a form) without a
preflight, and with DNS rebinding its own host name can point at 127.0.0.1. Hence:

- POST, PUT and PATCH must say `Content-Type: application/json` (a browser cannot send that
  cross-site without a CORS preflight, which we never grant); so must any request with a body.
- An `Origin` header, which browsers send with cross-site and non-GET requests, must name
  this API (the same host and port as the request's `Host`); `null` is foreign.
- Without a token (loopback only), `Host` must name a loopback address (`localhost`,
  `127.0.0.1`, `[::1]`, ...) and the port the request arrived on: a rebound name is refused.
  With a token, any `Host` is fine: a page cannot learn or send the token.

Pure checks (`host_allowed`, `origin_allowed`, `content_type_ok`) and a middleware.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Methods whose request carries the change it asks for: JSON only.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _split(netloc: str) -> tuple[str, int | None] | None:
    """(host, port) of `host[:port]`, lower-cased, IPv6 brackets dropped; None if malformed."""
    if not netloc or any(c in netloc for c in "/?#@ \t"):
        return None
    try:
        parts = urlsplit("//" + netloc)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port


def is_loopback_name(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str | None, local_port: int, *, loopback_only: bool) -> bool:
    """The `Host` header names this API: with `loopback_only`, a loopback name and our port."""
    if not loopback_only:
        return True
    split = _split(host_header or "")
    if split is None:
        return False
    host, port = split
    return is_loopback_name(host) and (port if port is not None else 80) == local_port


def origin_allowed(origin: str | None, host_header: str | None) -> bool:
    """No `Origin` (not a browser, or a same-origin GET), or the origin of `Host` itself."""
    if origin is None:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or parts.path not in ("", "/"):
        return False
    mine, theirs = _split(host_header or ""), _split(parts.netloc)
    if mine is None or theirs is None:
        return False
    default = 443 if parts.scheme == "https" else 80
    return mine[0] == theirs[0] and (mine[1] or default) == (theirs[1] or default)


def content_type_ok(method: str, content_type: str, has_body: bool) -> bool:
    if method not in BODY_METHODS and not has_body:
        return True
    return content_type == "application/json"


def _refuse(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def guard_middleware(*, loopback_only: bool) -> Middleware:
    """`loopback_only`: the API has no token, so it must only answer to loopback names."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        local_port = int(sock[1]) if isinstance(sock, tuple) and len(sock) >= 2 else 0
        if not host_allowed(host, local_port, loopback_only=loopback_only):
            why = "the Host header does not name this API (use 127.0.0.1 or localhost)"
            return _refuse(403, "forbidden", why)
        if not origin_allowed(request.headers.get("Origin"), host):
            return _refuse(403, "forbidden", "cross-origin requests are not allowed")
        has_body = bool(request.content_length) or request.headers.get("Transfer-Encoding") is not None
        if not content_type_ok(request.method, request.content_type, has_body):
            return _refuse(415, "invalid", "request bodies must be JSON (Content-Type: application/json)")
        return await handler(request)

    return middleware
