"""One NBD client: the socket <-> nbd.ServerConnection adapter (the only code touching sockets
besides the listener).

Requests that can finish without blocking (page-cached reads, small buffered writes) are
answered inline from `data_received`; the rest become tasks, so one connection's requests run
concurrently and complete out of order. In-flight requests and bytes are bounded: past the
bound, or while the client is not reading its replies, we stop reading its socket.

Every connection is admitted against the listener's limits first (refused ones are closed
before the greeting), and timeouts cut clients that stall: the handshake as a whole, a request
that started arriving but does not finish, and (optionally) an idle session.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import sys
from typing import TYPE_CHECKING, cast

from blockvirt.nbd.connection import ServerConnection
from blockvirt.nbd.constants import Errno
from blockvirt.nbd.events import (
    Aborted,
    AccessDenied,
    Command,
    DiscCmd,
    Negotiated,
    OptionRefused,
    ReadCmd,
    StartTLS,
    WriteCmd,
)
from blockvirt.nbd.exceptions import ProtocolError
from blockvirt.nbd.transmission import ServerTransmission
from blockvirt.server.acl import ClientIdentity, certificate_names, parse_address
from blockvirt.server.dispatch import SUBMITTED, Dispatcher, Out
from blockvirt.server.exports import ExportView
from blockvirt.server.limits import (
    REFUSED_SHUTTING_DOWN,
    TIMEOUT_HANDSHAKE,
    TIMEOUT_IDLE,
    TIMEOUT_REPLY,
    TIMEOUT_REQUEST,
)
from blockvirt.storage import buffers
from blockvirt.storage.export import Export
from blockvirt.storage.node import StorageError

if TYPE_CHECKING:
    from blockvirt.server.listener import NbdServer

log = logging.getLogger("blockvirt.session")

#: Inline replies are written once this many payload bytes have gathered (or the burst ends).
_BATCH_BYTES = 256 * 1024
#: Reply pieces at least this large are written on their own rather than joined.
_BIG_PIECE = 64 * 1024
#: Handshake options handled per event-loop turn: a pipelined flood must not hold the loop.
_OPTIONS_PER_TURN = 8


def socket_closed_by_peer(fd: int) -> bool:
    """poll() without waiting: the peer hung up (FIN or RST) on `fd`. Reads nothing."""
    p = select.poll()
    p.register(fd, select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


def _emit(transport: asyncio.Transport, bufs: list[bytes | bytearray | memoryview], recycle: bool) -> None:
    """Write replies: small pieces joined into one send, large payloads passed as they are
    (joining would copy them; asyncio's writelines joins). With `recycle`, the transport
    copies what it does not send at once, so large buffers can go back to the pool."""
    small: list[bytes | bytearray | memoryview] = []
    for b in bufs:
        if len(b) >= _BIG_PIECE:
            if small:
                transport.write(b"".join(small))
                small = []
            transport.write(b)
            if recycle and type(b) is bytearray:
                buffers.put(b)
        else:
            small.append(b)
    if small:
        transport.write(small[0] if len(small) == 1 else b"".join(small))


class NbdSession(asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.tx: ServerTransmission | None = None
        self.disp: Dispatcher | None = None
        self.volume: Export | None = None
        #: The client has left: the export no longer counts this session as a user (leave()).
        self._left = False
        self.peer = ""
        self.address = ""  # the peer's IP address, without port
        self.view: ExportView | None = None
        self._handshake_backlog = False  # options are buffered; the next turn goes on
        self._denied: set[str] = set()  # exports this session was refused (bounded by the catalog)
        self._admitted = False
        self.id = server.next_session_id()
        self.tasks: set[asyncio.Task[None]] = set()
        self.inflight = 0
        #: Requests the node started by submission (no task): their replies come to _answered.
        self.submitted = 0
        self._none_submitted: asyncio.Future[None] | None = None
        self.inflight_bytes = 0
        self._blocked = False  # not taking new requests (backpressure, DISC or shutdown)
        self._ending = False  # DISC or shutdown: never unblocked again
        #: Bytes of replies that went into the transport while the client was not reading:
        #: still held (in the transport's buffer), so still charged to the server's budget.
        self._parked = 0
        self._reply_timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._reading_paused = False
        self._closing = False
        self._lost = False
        self._recycle = False
        self.identity = ""  # the client certificate's names, once TLS is up
        limits = server.limits
        self.max_inflight = limits.max_inflight
        self.max_inflight_bytes = limits.max_inflight_bytes
        self._handshake_timer: asyncio.TimerHandle | None = None
        # Transmission timers are lazy: they fire, look at the times below, and re-arm, so
        # the data path only stores a timestamp (and only when a timeout is on).
        self._request_timer: asyncio.TimerHandle | None = None
        self._partial_since: float | None = None  # when the request now arriving started
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_input = 0.0
        self.closed = self.loop.create_future()

    def _ids(self) -> dict[str, object]:
        """Structured log fields: the session, its peer, its identity and the export."""
        extra: dict[str, object] = {"session": self.id, "peer": self.peer}
        if self.identity:
            extra["identity"] = self.identity
        if self.volume is not None:
            extra["volume"] = self.volume.export_name
        return extra

    # ------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Other loops' transports (uvloop) are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        # asyncio's own socket transport (3.11) copies unsent data, so reply buffers can be
        # reused as soon as write() returns; other transports may keep a reference.
        self._recycle = type(transport).__module__ == "asyncio.selector_events" and sys.version_info < (3, 12)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        addr = parse_address(str(peer[0])) if isinstance(peer, tuple) else None
        self.address = str(addr) if addr is not None else self.peer
        server = self.server
        refusal = REFUSED_SHUTTING_DOWN if server.closing else server.admission.admit(self.address)
        if refusal is not None and refusal != REFUSED_SHUTTING_DOWN and server.reap_closed(self.address):
            refusal = server.admission.admit(self.address)  # closed peers made room
        if refusal is not None:
            self._refuse(refusal)
            return
        self._admitted = True
        server.sessions.add(self)
        self.view = server.registry.catalog(ClientIdentity(self.address))
        self.conn = ServerConnection(self.view, tls=server.tls_mode, options_per_call=_OPTIONS_PER_TURN)
        transport.write(self.conn.data_to_send())
        self._handshake_timer = self.loop.call_later(server.limits.handshake_timeout, self._handshake_expired)
        log.debug("session %d: connected from %s", self.id, self.peer, extra=self._ids())

    def _refuse(self, reason: str) -> None:
        """Over a limit (or stopping): close at once, before the greeting; count and log."""
        assert self.transport is not None
        self.transport.abort()
        counters = self.server.counters
        counters.refused[reason] = counters.refused.get(reason, 0) + 1
        held = self.server.log_throttle.allow(f"refused:{reason}", self.loop.time())
        if held is not None:
            more = f" ({held} more since the last report)" if held else ""
            log.warning(
                "connection from %s refused: %s%s",
                self.peer,
                reason.replace("_", " "),
                more,
                extra={"peer": self.peer, "reason": reason},
            )

    def get_buffer(self, sizehint: int) -> memoryview:
        # Receive straight into the codec's buffer (or a large WRITE's payload buffer).
        tx = self.tx
        if tx is not None:
            return tx.get_buffer(sizehint)
        if self.conn is None:  # refused at connect: swallow whatever arrives
            return memoryview(bytearray(4096))
        return self.conn.handshake.buffer.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        tx = self.tx
        if tx is not None:
            tx.buffer_updated(nbytes)
            if self._idle_timer is not None:
                self._last_input = self.loop.time()
            if not self._blocked:
                self._pump()
            return
        if self.conn is not None:
            self.conn.handshake.buffer.buffer_updated(nbytes)
            self._handshake()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()
        timeout = self.server.limits.request_timeout
        if timeout and self._reply_timer is None and not self._lost:
            self._reply_timer = self.loop.call_later(timeout, self._replies_unread)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._reply_timer is not None:
            self._reply_timer.cancel()
            self._reply_timer = None
        self._give_parked()
        self._update_reading()
        if self.tx is not None and not self._blocked:
            self._pump()
        elif self.tx is None and not self._handshake_backlog:
            self._handshake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self.disp is not None:
            self.disp.abandon()  # requests waiting for QoS: nobody wants their answer
        for timer in (self._handshake_timer, self._request_timer, self._idle_timer, self._reply_timer):
            if timer is not None:
                timer.cancel()
        self._handshake_timer = self._request_timer = self._idle_timer = self._reply_timer = None
        self._give_parked()
        self._release_admission()  # a closed connection no longer counts, however long it drains
        self._leaving()
        if not self._closing:
            self._closing = True
            self.server.track(self.loop.create_task(self._finish()))

    # ------------------------------------------------------------ handshake
    def _handshake(self) -> None:
        conn, transport = self.conn, self.transport
        if conn is None or transport is None or self._closing:
            return
        try:
            while True:
                if self._write_paused:
                    # The client is not reading our replies: answering more options would
                    # only pile them up here. resume_writing() goes on.
                    return
                ev = conn.next_event()
                out = conn.data_to_send()
                if out:
                    transport.write(out)
                if ev is None:
                    if conn.handshake.backlog:
                        self._handshake_later()
                    return
                if isinstance(ev, Negotiated):
                    self._negotiated(ev)
                    return
                if isinstance(ev, Aborted):
                    log.debug("session %d: handshake ended: %s", self.id, ev.reason, extra=self._ids())
                    self._close()
                    return
                if isinstance(ev, AccessDenied):
                    self._access_denied(ev)
                    if ev.closed:
                        self._close()
                        return
                elif isinstance(ev, OptionRefused):
                    log.debug(
                        "session %d: option %d refused: %s", self.id, ev.option, ev.message, extra=self._ids()
                    )
                elif isinstance(ev, StartTLS):
                    # Nothing more may be read in plaintext: the client's next bytes are TLS.
                    transport.pause_reading()
                    self.server.track(self.loop.create_task(self._start_tls()))
                    return
        except ProtocolError as e:
            log.info(
                "session %d (%s): protocol violation in handshake: %s",
                self.id,
                self.peer,
                e,
                extra=self._ids(),
            )
            self._close(abort=True)

    def _handshake_later(self) -> None:
        """More options are buffered: stop reading and go on at the next loop turn, so a
        pipelined flood shares the loop with everyone else."""
        self._handshake_backlog = True
        self._update_reading()
        self.loop.call_soon(self._handshake_turn)

    def _handshake_turn(self) -> None:
        self._handshake_backlog = False
        if self._lost or self._closing:
            return
        self._update_reading()
        self._handshake()

    def _access_denied(self, ev: AccessDenied) -> None:
        # Counted and logged once per export and session: a client's SET_META_CONTEXT, INFO
        # and GO for one export are one refused attempt.
        if ev.export in self._denied:
            return
        self._denied.add(ev.export)
        if ev.elsewhere is not None:  # not refused: served by another node of the cluster
            log.info("session %d (%s): %s", self.id, self.peer, ev.elsewhere, extra=self._ids())
            return
        volume = ev.export.partition("@")[0]
        self.server.counters.denied(volume)
        held = self.server.log_throttle.allow(f"denied:{self.address}:{ev.export}", self.loop.time())
        if held is None:
            return
        more = f" ({held} more since the last report)" if held else ""
        log.warning(
            "session %d (%s): access to export %r denied: %s%s",
            self.id,
            self.peer,
            ev.export,
            ev.reason,
            more,
            extra={**self._ids(), "export": ev.export, "option": ev.option},
        )

    async def _start_tls(self) -> None:
        assert self.conn is not None and self.transport is not None
        ctx = self.server.tls_context
        assert ctx is not None, "STARTTLS is only acked when TLS is configured"
        try:
            tls_transport = await self.loop.start_tls(
                self.transport,
                self,
                ctx,
                server_side=True,
                ssl_handshake_timeout=self.server.limits.handshake_timeout,
            )
        except (TimeoutError, OSError, ConnectionError) as e:
            log.info("session %d (%s): TLS handshake failed: %s", self.id, self.peer, e, extra=self._ids())
            self._close(abort=True)
            return
        if tls_transport is None or self._lost:
            return
        self.transport = tls_transport
        self._recycle = False  # the TLS transport keeps references to what it is given
        self._reading_paused = False
        cn, sans = certificate_names(tls_transport.get_extra_info("peercert"))
        client = ClientIdentity(self.address, cn, sans)
        self.identity = client.describe()
        if self.view is not None:  # from now on, certificate rules can match
            self.view.client = client
        log.info(
            "session %d (%s): TLS established, client %r",
            self.id,
            self.peer,
            self.identity,
            extra=self._ids(),
        )
        self.conn.handshake.tls_started()
        self._handshake()

    def _negotiated(self, ev: Negotiated) -> None:
        assert self.conn is not None and self.conn.transmission is not None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        vol = self.server.registry.resolve(ev.export.name)
        if vol is None:  # deleted between the lookup and now
            self._close(abort=True)
            return
        vol.users += 1
        self.volume = vol
        self.tx = self.conn.transmission
        self.disp = Dispatcher(
            vol,
            ev.export.size,
            ev.transmission_flags,
            self.tx,
            ev.contexts,
            vol.stats,
            self.server.registry.qos_for(vol),
            self.server.registry.bitmaps(vol, ev.contexts),
        )
        # Inline replies reach the transport before the session yields; this one copies
        # what it does not send at once, so they may carry views of the page cache.
        self.disp.borrow = self._recycle and self.server.zero_copy
        self.disp.deliver = self._answered
        log.info(
            "session %d (%s): opened export %r%s",
            self.id,
            self.peer,
            ev.export.name,
            " (read-only)" if ev.export.read_only else "",
            extra=self._ids(),
        )
        if self.server.limits.idle_timeout:
            self._last_input = self.loop.time()
            self._idle_timer = self.loop.call_later(self.server.limits.idle_timeout, self._idle_check)
        self._pump()

    def _handshake_expired(self) -> None:
        self._timed_out(TIMEOUT_HANDSHAKE, "handshake timed out")
        self._close(abort=True)

    def _timed_out(self, phase: str, what: str) -> None:
        self.server.counters.timed_out[phase] += 1
        log.info("session %d (%s): %s", self.id, self.peer, what, extra={**self._ids(), "timeout": phase})

    # ------------------------------------------------------------ transmission timeouts
    def _watch_input(self) -> None:
        """After parsing: note when an unfinished request started arriving, arm its timer."""
        tx = self.tx
        if tx is None or self._closing or self._reading_paused or not tx.receiving():
            # Nothing half-received, or we are not reading (our own backpressure: the
            # client cannot be blamed for that time).
            self._partial_since = None
            return
        timeout = self.server.limits.request_timeout
        if self._partial_since is None and timeout:
            self._partial_since = self.loop.time()
            if self._request_timer is None:
                self._request_timer = self.loop.call_later(timeout, self._request_check)

    def _request_check(self) -> None:
        self._request_timer = None
        since = self._partial_since
        if since is None or self._closing:
            return  # it completed; the next partial request arms a new timer
        timeout = self.server.limits.request_timeout
        left = since + timeout - self.loop.time()
        if left > 0:
            self._request_timer = self.loop.call_later(left, self._request_check)
            return
        self._timed_out(TIMEOUT_REQUEST, f"request not received within {timeout:g}s")
        self._close(abort=True)

    def _replies_unread(self) -> None:
        """The client has not read our replies for the request timeout: it holds memory
        (and the server's byte budget) for nothing."""
        self._reply_timer = None
        if not self._write_paused or self._closing or self._lost:
            return
        timeout = self.server.limits.request_timeout
        self._timed_out(TIMEOUT_REPLY, f"replies left unread for {timeout:g}s")
        self._close(abort=True)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._closing or self._lost:
            return
        timeout = self.server.limits.idle_timeout
        now = self.loop.time()
        # Not idle: requests running, one half-received, or we stopped reading (backpressure).
        busy = self.inflight or self._reading_paused or (self.tx is not None and self.tx.receiving())
        if busy:
            self._last_input = now
        left = self._last_input + timeout - now
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._idle_check)
            return
        self._timed_out(TIMEOUT_IDLE, f"idle for {timeout:g}s: closing")
        self.server.track(self.loop.create_task(self.shutdown()))

    # ------------------------------------------------------------ transmission
    def _pump(self) -> None:
        """Parse and start every buffered request. Replies finished inline are batched into
        one write (one send syscall for a burst of page-cache reads)."""
        tx, transport, disp = self.tx, self.transport, self.disp
        assert tx is not None and transport is not None and disp is not None
        budget = self.server.budget
        batch: list[bytes | bytearray | memoryview] = []
        batched = 0
        disp.begin()
        try:
            # Also stop while the client is not reading its replies: every request answered
            # now would pile its reply up in the transport's buffer.
            while not self._blocked and not self._write_paused:
                if budget.used >= budget.limit:
                    # The whole server holds as much as it may: take nothing new (not even
                    # a request answered inline, its reply is memory too) until it frees.
                    self._blocked = True
                    self.server.wait_for_bytes(self)
                    self._update_reading()
                    return
                try:
                    cmd = tx.next_event()
                except ProtocolError as e:
                    log.info(
                        "session %d (%s): protocol violation: %s", self.id, self.peer, e, extra=self._ids()
                    )
                    self._close(abort=True)
                    return
                if cmd is None:
                    return
                self._partial_since = None  # a request is complete
                t = type(cmd)
                if t is DiscCmd:
                    self._blocked = self._ending = True
                    self._update_reading()
                    self.server.track(self.loop.create_task(self._disconnect()))
                    return
                out = disp.serve_inline(cmd)
                if out is None:
                    self._spawn(cmd)
                    continue
                if out is SUBMITTED:
                    self.submitted += 1
                    self._hold(cmd)
                    continue
                if t is WriteCmd:
                    tx.recycle(cmd.data)  # type: ignore[attr-defined]
                batch += out
                batched += cmd.length
                if batched >= _BATCH_BYTES:
                    _emit(transport, batch, self._recycle)
                    batch = []
                    batched = 0
                    disp.begin()  # sending is not part of the next request's service time
        finally:
            if disp.fua_pending and not transport.is_closing():
                # One sync for the FUA writes of this burst, then their replies.
                settled = disp.settle_fua()
                if settled is None:
                    self._spawn_settle()
                else:
                    batch += settled
            if batch and not transport.is_closing():
                _emit(transport, batch, self._recycle)
            self._watch_input()

    def _spawn_settle(self) -> None:
        """The pending FUA writes need an awaited sync: one task for all of them."""
        disp = self.disp
        assert disp is not None
        pending, disp.fua_pending = disp.fua_pending, []
        self.inflight += 1
        task = self.loop.create_task(self._settle(pending))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if self.inflight >= self.max_inflight:
            self._blocked = True
            self._update_reading()

    async def _settle(self, pending: list[tuple[int, float]]) -> None:
        disp = self.disp
        assert disp is not None and self.tx is not None
        try:
            out = await disp.settle_fua_later(pending)
        except Exception:
            log.exception("session %d: internal error on a FUA write's sync", self.id, extra=self._ids())
            out = [self.tx.error(cookie, Errno.EIO, "internal server error") for cookie, _ in pending]
        finally:
            self.inflight -= 1
        self._replied(out, 0)

    def _spawn(self, cmd: Command) -> None:
        nbytes = self._hold(cmd)
        task = self.loop.create_task(self._run(cmd, nbytes))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _answered(self, out: Out, cmd: Command) -> None:
        """A submitted request ended (Dispatcher.deliver): as _run's end, without a task."""
        nbytes = cmd.length
        self.inflight -= 1
        self.inflight_bytes -= nbytes
        self.submitted -= 1
        if type(cmd) is WriteCmd:
            self.tx.recycle(cmd.data)  # type: ignore[union-attr, attr-defined]
        if not self.submitted and self._none_submitted is not None:
            waiter, self._none_submitted = self._none_submitted, None
            if not waiter.done():
                waiter.set_result(None)
        self._replied(out, nbytes)

    def _hold(self, cmd: Command) -> int:
        """Count a request that is not answered yet (its bytes against the limits), and stop
        reading if that reaches them. Returns its bytes."""
        nbytes = cmd.length if type(cmd) is ReadCmd or type(cmd) is WriteCmd else 0
        self.inflight += 1
        self.inflight_bytes += nbytes
        if nbytes:
            self.server.take_bytes(nbytes)
        if self.inflight >= self.max_inflight or self.inflight_bytes >= self.max_inflight_bytes:
            self._blocked = True
            self._update_reading()
        elif self.server.budget.exhausted:
            self._blocked = True
            self.server.wait_for_bytes(self)
            self._update_reading()
        return nbytes

    async def _run(self, cmd: Command, nbytes: int) -> None:
        disp = self.disp
        assert disp is not None and self.tx is not None
        try:
            out = await disp.run(cmd)
        except Exception:
            log.exception("session %d: internal error on %r", self.id, type(cmd).__name__, extra=self._ids())
            out = [self.tx.error(cmd.cookie, Errno.EIO, "internal server error")]
        finally:
            self.inflight -= 1
            self.inflight_bytes -= nbytes
        if type(cmd) is WriteCmd:
            self.tx.recycle(cmd.data)  # storage is done with the payload
        self._replied(out, nbytes)

    def _replied(self, out: Out, nbytes: int) -> None:
        """Send a task's replies, give back what it held, and read on if it was held up."""
        transport = self.transport
        # Closing: the send failed (the peer is gone; connection_lost comes on the next turn)
        # or the connection was aborted. A write then is dropped by asyncio, which logs a
        # warning for each past the fifth: a client that vanished with 64 reads in flight
        # left 20 such lines.
        if transport is not None and not self._lost and not transport.is_closing():
            _emit(transport, out, self._recycle)
        if nbytes:
            if self._write_paused and not self._lost:
                self._parked += nbytes  # its reply waits in the transport: still held
            else:
                self.server.give_bytes(nbytes)
        if (
            self._blocked
            and not self._closing
            and not self._ending
            and self.inflight < self.max_inflight // 2
            and self.inflight_bytes < self.max_inflight_bytes // 2
        ):
            if self.server.budget.exhausted:
                self.server.wait_for_bytes(self)
                return
            self._blocked = False
            self._update_reading()
            if not self._lost:
                self._pump()

    def _give_parked(self) -> None:
        if self._parked:
            self.server.give_bytes(self._parked)
            self._parked = 0

    def budget_freed(self) -> None:
        """The server's byte budget is low again (see NbdServer.give_bytes): read on, unless
        this session's own limits still hold it (its own replies will release it)."""
        if not self._blocked or self._closing or self._ending or self._lost or self.tx is None:
            return
        if self.inflight >= self.max_inflight // 2 or self.inflight_bytes >= self.max_inflight_bytes // 2:
            return
        self._blocked = False
        self._update_reading()
        self._pump()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        want_pause = self._blocked or self._write_paused or self._handshake_backlog
        if want_pause and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
            self._partial_since = None  # our pause: the request clock restarts on resume
        elif not want_pause and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False

    # ------------------------------------------------------------ ending
    async def _drain_and_flush(self) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks))
        while self.submitted:
            if self._none_submitted is None:
                self._none_submitted = self.loop.create_future()
            await asyncio.shield(self._none_submitted)
        disp = self.disp
        if disp is not None and disp.unflushed:
            # nbdcopy and fio never send FLUSH: make their data durable when they leave.
            try:
                await disp.node.flush()
                disp.unflushed = False
            except StorageError as e:
                log.error("session %d: flush on disconnect failed: %s", self.id, e, extra=self._ids())

    async def _disconnect(self) -> None:
        """NBD_CMD_DISC: finish in-flight requests, flush, then close (no reply)."""
        self._closing = True
        self._leaving()
        await self._drain_and_flush()
        self._close()
        await self._finish()

    async def shutdown(self) -> None:
        """Server stopping: take no new requests, finish in-flight ones, flush, close."""
        if self._closing:
            return
        self._closing = True
        self._blocked = self._ending = True
        self._update_reading()
        await self._drain_and_flush()
        self._close()
        await self._finish()

    def _leaving(self) -> None:
        """The client is gone (DISC, or its connection closed): an edit of the volume need not
        refuse for it, only wait for its last requests and flush (Export.leave)."""
        if self.volume is not None and not self._left:
            self._left = True
            self.volume.leave()

    def _release_admission(self) -> None:
        if self._admitted:
            self._admitted = False
            self.server.admission.release(self.address)

    def peer_gone(self) -> bool:
        """Whether the client closed its end though we have not seen it yet (its EOF or RST
        is still queued behind other work); then the connection is aborted and uncounted."""
        transport = self.transport
        if transport is None or self._lost or not self._admitted:
            return False
        sock = transport.get_extra_info("socket")
        if not transport.is_closing() and (sock is None or not socket_closed_by_peer(sock.fileno())):
            return False
        self._release_admission()
        transport.abort()
        return True

    def _close(self, abort: bool = False) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if abort:
                transport.abort()
                return
            if self._reading_paused:
                # asyncio's TLS transport (3.11) that saw the client's EOF while we paused
                # reading (a DISC, then the client's shutdown) finishes its own shutdown only
                # once reading resumes; close() alone then never closes the socket. Nothing
                # more is parsed: every path here has stopped taking requests.
                transport.resume_reading()
                self._reading_paused = False
            transport.close()

    async def _finish(self) -> None:
        """Release the volume once every task is done (runs once per session)."""
        if self.closed.done():
            return
        await self._drain_and_flush()
        extra = self._ids()
        if self.disp is not None:
            await self.disp.close()
        if self.volume is not None:
            self._leaving()  # no-op if the client's leaving was seen already
            self.volume.left()
            self.volume = None
        self.server.sessions.discard(self)
        self._release_admission()
        if not self.closed.done():
            self.closed.set_result(None)
        log.debug("session %d: closed", self.id, extra=extra)
