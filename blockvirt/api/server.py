"""Connection limits for the management API: a cap on open connections, and deadlines for a
request's head and body, so idle or slow clients cannot hold sockets (and memory) for ever.

aiohttp has no header-read deadline: a client that connects and trickles header lines, or
sends none, was held for minutes. Here each connection gets one timer, armed at connect and
again after every response, and cancelled when a complete request head reaches the
application (`head_received`, called by the first middleware). The body has its own
deadline where it is read (`blockvirt.api.request.body`).

`install(app, limits)` makes the app's server use `GuardedHandler`. The AppRunner is built by
the service; the app is what it is handed, so the hook is the app's handler factory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("blockvirt.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_BUSY_BODY = b'{"error": {"code": "http", "message": "too many API connections, try again later"}}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """serve --api-header-timeout, --api-body-timeout, --api-max-connections."""

    #: From connect, or the end of the previous response, to a complete request head: this
    #: also ends idle keep-alive connections.
    header_timeout: float = 10.0
    #: For the whole request body, once the handler starts reading it.
    body_timeout: float = 30.0
    #: Open connections; one more is answered 503 and closed.
    max_connections: int = 256

    def __post_init__(self) -> None:
        if self.header_timeout <= 0 or self.body_timeout <= 0:
            raise ValueError("API timeouts must be positive")
        if self.max_connections < 1:
            raise ValueError("api-max-connections must be at least 1")


LIMITS = web.AppKey("api_limits", ApiLimits)


class ConnectionGuard:
    """Counts the API's open connections against the cap; pure bookkeeping."""

    def __init__(self, limits: ApiLimits) -> None:
        self.limits = limits
        self.open = 0
        self.refused = 0
        self.timed_out = 0

    def admit(self) -> bool:
        if self.open >= self.limits.max_connections:
            self.refused += 1
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1


GUARD = web.AppKey("api_guard", ConnectionGuard)


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler, with the cap and the head deadline."""

    __slots__ = ("_admitted", "_guard", "_head_timer")

    def __init__(self, manager: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._admitted = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._guard.admit():
            tr: Any = transport
            tr.write(_BUSY)
            tr.close()
            return
        self._admitted = True
        self.arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.head_received()
        if self._admitted:
            self._admitted = False
            self._guard.release()
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """Malformed HTTP is the client's mistake, not our bug: one line at INFO, no
        traceback. Anything else stays an ERROR with its traceback."""
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            peer = self.transport.get_extra_info("peername") if self.transport is not None else None
            log.info("malformed HTTP request from %s: %s", peer[0] if peer else "?", exc.message.strip())
            return
        super().log_exception(*args, **kw)

    def arm(self) -> None:
        """Start waiting for a request head (at connect, and after each response)."""
        if self._head_timer is None and self._admitted:
            loop = asyncio.get_running_loop()
            self._head_timer = loop.call_later(self._guard.limits.header_timeout, self._head_expired)

    def head_received(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        self._guard.timed_out += 1
        log.debug("API connection closed: no complete request within %gs", self._guard.limits.header_timeout)
        transport: Any = self.transport
        if transport is not None:
            transport.abort()


def deadline_middleware() -> Middleware:
    """First middleware: a complete head arrived; re-arm for the next one after the answer."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        proto = request.protocol
        if not isinstance(proto, GuardedHandler):
            return await handler(request)
        proto.head_received()
        try:
            return await handler(request)
        finally:
            proto.arm()

    return middleware


class GuardedServer(web.Server):
    """aiohttp's server (protocol factory), making `GuardedHandler`s."""

    guard: ConnectionGuard

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, self.guard, loop=self._loop, **self._kwargs)


def install(app: web.Application, limits: ApiLimits) -> None:
    """Make `app`'s server guard its connections with `limits`."""
    guard = ConnectionGuard(limits)
    app[LIMITS] = limits
    app[GUARD] = guard
    make = app._make_handler

    def make_guarded(**kwargs: Any) -> web.Server:
        server = make(**kwargs)
        # The app builds a plain web.Server; only the class of handler it makes changes.
        server.__class__ = GuardedServer
        assert isinstance(server, GuardedServer)
        server.guard = guard
        return server

    app._make_handler = make_guarded  # type: ignore[method-assign]
