"""The NBD listener: accepts TCP connections and owns the set of live sessions."""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl

from blockvirt.nbd.handshake import TLSMode
from blockvirt.server import memory
from blockvirt.server.exports import ExportRegistry
from blockvirt.server.limits import Admission, ByteBudget, Limits, LogThrottle, SecurityCounters
from blockvirt.server.session import NbdSession
from blockvirt.storage import buffers

log = logging.getLogger("blockvirt.listener")

#: Seconds with no bytes in flight before freed memory is handed back to the system.
TRIM_AFTER_IDLE = 1.0


class NbdServer:
    def __init__(
        self,
        registry: ExportRegistry,
        host: str,
        port: int,
        *,
        tls_mode: TLSMode = TLSMode.NONE,
        tls_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
        counters: SecurityCounters | None = None,
        zero_copy: bool = True,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.tls_mode = tls_mode if tls_context is not None else TLSMode.NONE
        self.tls_context = tls_context
        self.limits = limits if limits is not None else Limits()
        self.admission = Admission(self.limits)
        self.counters = counters if counters is not None else SecurityCounters()
        #: Large cached reads may be answered with views of the page cache (see
        #: Dispatcher.borrow); off, every read is copied into a buffer first.
        self.zero_copy = zero_copy
        #: Floods (refusals, denials) log a line per second per kind, not one per event.
        self.log_throttle = LogThrottle()
        self.sessions: set[NbdSession] = set()
        #: Bytes in flight over all sessions (`--max-inflight-bytes-total`).
        self.budget = ByteBudget(self.limits.max_inflight_bytes_total)
        self._budget_waiters: set[NbdSession] = set()
        self._wake_pending = False
        self._trim_timer: asyncio.TimerHandle | None = None
        self._takes = 0  # budget takes so far: the trim timer's sign of activity
        self.closing = False
        self._server: asyncio.Server | None = None
        self._ids = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()

    @property
    def handshake_timeout(self) -> float:
        return self.limits.handshake_timeout

    # ------------------------------------------------------------ process-wide byte budget
    def take_bytes(self, n: int) -> None:
        self.budget.take(n)
        # No timer is cancelled here: at queue depth 1 the budget empties after every
        # request, and a cancel plus a new timer per request is work on the fast path.
        # The armed timer checks this count when it fires instead.
        self._takes += 1

    def give_bytes(self, n: int) -> None:
        budget = self.budget
        budget.give(n)
        # The loop is looked up only when needed: the lookup is a getpid(2) per call.
        if self._budget_waiters and budget.available and not self._wake_pending:
            # Not from inside the caller's own bookkeeping: the next loop turn.
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._wake_waiters)
        if budget.used == 0 and self._trim_timer is None:
            self._trim_timer = asyncio.get_running_loop().call_later(TRIM_AFTER_IDLE, self._trim, self._takes)

    def wait_for_bytes(self, session: NbdSession) -> None:
        """`session` stopped reading because the budget is exhausted: wake it later."""
        self._budget_waiters.add(session)

    def _wake_waiters(self) -> None:
        self._wake_pending = False
        waiters = list(self._budget_waiters)
        self._budget_waiters.clear()
        for s in waiters:
            if not self.budget.available:  # an earlier one took it all again
                self._budget_waiters.add(s)
                continue
            s.budget_freed()

    def _trim(self, takes: int) -> None:
        """Give memory back once nothing was taken for a whole TRIM_AFTER_IDLE: a server
        that was busy since the timer was armed looks again one period later (so the trim
        comes 1-2 periods after the last request)."""
        self._trim_timer = None
        if self.budget.used:
            return  # busy now: the give that empties the budget arms the timer again
        if takes != self._takes:
            self._trim_timer = asyncio.get_running_loop().call_later(TRIM_AFTER_IDLE, self._trim, self._takes)
            return
        buffers.trim()  # first our pool of read buffers, then the C heap they freed
        memory.trim()

    def reap_closed(self, address: str) -> bool:
        """Uncount connections from `address` whose clients already hung up (after a storm
        their EOFs may still wait in the loop); True if any was."""
        reaped = False
        for s in list(self.sessions):
            if s.address == address and s.peer_gone():
                reaped = True
        return reaped

    def next_session_id(self) -> int:
        return next(self._ids)

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep session-ending tasks alive and awaitable at shutdown."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: NbdSession(self), self.host, self.port, reuse_address=True, backlog=1024
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info("NBD listening on %s:%d", self.host, self.port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def disconnect_volume(self, name: str) -> None:
        """Cleanly end every session on volume `name` (in-flight requests finish, data is
        flushed); used by edits that must not run under connected initiators."""
        sessions = [
            s
            for s in self.sessions
            if s.volume is not None and s.volume.record.name == name and s.volume.snapshot is None
        ]
        if sessions:
            await asyncio.gather(*(s.shutdown() for s in sessions))

    def abort_volume(self, name: str) -> None:
        """Cut every session on volume `name` at once (this node no longer serves it): the
        transports close, requests still in flight are never answered."""
        for s in list(self.sessions):
            head = s.volume is not None and s.volume.volume == name and s.volume.snapshot is None
            if head and s.transport is not None:
                s.transport.abort()

    async def stop(self, deadline: float = 10.0) -> None:
        """Stop accepting, let sessions finish in-flight work and flush, then cut the rest."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        sessions = list(self.sessions)
        if sessions:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(s.shutdown()) for s in sessions], timeout=deadline
            )
            for s in sessions:
                if s.transport is not None and not s.transport.is_closing():
                    s.transport.abort()
            if pending:
                log.warning("%d session(s) did not finish within %.1fs", len(pending), deadline)
        if self._background:
            await asyncio.wait(set(self._background), timeout=deadline)
        if self._server is not None:
            await self._server.wait_closed()
