"""One NBD client: the socket <-> nbd.ServerConnection adapter (the only code touching sockets
besides the listener).

Requests that can finish without blocking (page-cached reads, small buffered writes) are
answered inline from `data_received`; the rest become tasks, so one connection's requests run
concurrently and complete out of order. In-flight requests and bytes are bounded: past the
bound, or while the client is not reading its replies, we stop reading its socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import TYPE_CHECKING, cast

from blockvirt.nbd.connection import ServerConnection
from blockvirt.nbd.constants import Errno
from blockvirt.nbd.events import (
    Aborted,
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
from blockvirt.server.dispatch import Dispatcher
from blockvirt.server.tls import peer_identity
from blockvirt.storage import buffers
from blockvirt.storage.node import StorageError
from blockvirt.storage.volumes import Volume

if TYPE_CHECKING:
    from blockvirt.server.listener import NbdServer

log = logging.getLogger("blockvirt.session")

MAX_INFLIGHT = 64
MAX_INFLIGHT_BYTES = 128 * 1024 * 1024
#: Inline replies are written once this many payload bytes have gathered (or the burst ends).
_BATCH_BYTES = 256 * 1024
#: Reply pieces at least this large are written on their own rather than joined.
_BIG_PIECE = 64 * 1024


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
        self.volume: Volume | None = None
        self.peer = ""
        self.id = server.next_session_id()
        self.tasks: set[asyncio.Task[None]] = set()
        self.inflight = 0
        self.inflight_bytes = 0
        self._blocked = False  # not taking new requests (backpressure, DISC or shutdown)
        self._write_paused = False
        self._reading_paused = False
        self._closing = False
        self._lost = False
        self._recycle = False
        self.identity = ""  # the client certificate's CN, once TLS is up
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.closed = self.loop.create_future()

    def _ids(self) -> dict[str, object]:
        """Structured log fields: the session, its peer and (once chosen) the export."""
        extra: dict[str, object] = {"session": self.id, "peer": self.peer}
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
        self.server.sessions.add(self)
        if self.server.closing:
            transport.close()
            return
        self.conn = ServerConnection(self.server.registry.catalog(self.peer), tls=self.server.tls_mode)
        transport.write(self.conn.data_to_send())
        self._handshake_timer = self.loop.call_later(self.server.handshake_timeout, self._handshake_expired)
        log.debug("session %d: connected from %s", self.id, self.peer, extra=self._ids())

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

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        if self.tx is not None and not self._blocked:
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
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
                ev = conn.next_event()
                out = conn.data_to_send()
                if out:
                    transport.write(out)
                if ev is None:
                    return
                if isinstance(ev, Negotiated):
                    self._negotiated(ev)
                    return
                if isinstance(ev, Aborted):
                    log.debug("session %d: handshake ended: %s", self.id, ev.reason, extra=self._ids())
                    self._close()
                    return
                if isinstance(ev, OptionRefused):
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
                ssl_handshake_timeout=self.server.handshake_timeout,
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
        self.identity = peer_identity(tls_transport.get_extra_info("peercert"))
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
            vol.node, ev.export.size, ev.transmission_flags, self.tx, ev.contexts, vol.stats
        )
        log.info("session %d (%s): opened export %r", self.id, self.peer, ev.export.name, extra=self._ids())
        self._pump()

    def _handshake_expired(self) -> None:
        log.info("session %d (%s): handshake timed out", self.id, self.peer, extra=self._ids())
        self._close(abort=True)

    # ------------------------------------------------------------ transmission
    def _pump(self) -> None:
        """Parse and start every buffered request. Replies finished inline are batched into
        one writelines (one send syscall for a burst of page-cache reads)."""
        tx, transport, disp = self.tx, self.transport, self.disp
        assert tx is not None and transport is not None and disp is not None
        batch: list[bytes | bytearray | memoryview] = []
        batched = 0
        disp.begin()
        try:
            # Also stop while the client is not reading its replies: every request answered
            # now would pile its reply up in the transport's buffer.
            while not self._blocked and not self._write_paused:
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
                if type(cmd) is DiscCmd:
                    self._blocked = True
                    self._update_reading()
                    self.server.track(self.loop.create_task(self._disconnect()))
                    return
                err = disp.check(cmd)
                if err is not None:
                    batch += disp.error_reply(cmd, err)
                    continue
                try:
                    out = disp.try_now(cmd)
                except StorageError as e:
                    batch += disp.error_reply(cmd, e)
                    continue
                if out is None:
                    self._spawn(cmd)
                    continue
                if type(cmd) is WriteCmd:
                    tx.recycle(cmd.data)
                batch += out
                batched += cmd.length
                if batched >= _BATCH_BYTES:
                    _emit(transport, batch, self._recycle)
                    batch = []
                    batched = 0
                    disp.begin()  # sending is not part of the next request's service time
        finally:
            if batch and not transport.is_closing():
                _emit(transport, batch, self._recycle)

    def _spawn(self, cmd: Command) -> None:
        nbytes = cmd.length if type(cmd) is ReadCmd or type(cmd) is WriteCmd else 0
        self.inflight += 1
        self.inflight_bytes += nbytes
        task = self.loop.create_task(self._run(cmd, nbytes))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if self.inflight >= MAX_INFLIGHT or self.inflight_bytes >= MAX_INFLIGHT_BYTES:
            self._blocked = True
            self._update_reading()

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
        transport = self.transport
        if transport is not None and not self._lost:
            _emit(transport, out, self._recycle)
        if (
            self._blocked
            and not self._closing
            and self.inflight < MAX_INFLIGHT // 2
            and self.inflight_bytes < MAX_INFLIGHT_BYTES // 2
        ):
            self._blocked = False
            self._update_reading()
            if not self._lost:
                self._pump()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        want_pause = self._blocked or self._write_paused
        if want_pause and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not want_pause and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False

    # ------------------------------------------------------------ ending
    async def _drain_and_flush(self) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks))
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
        await self._drain_and_flush()
        self._close()
        await self._finish()

    async def shutdown(self) -> None:
        """Server stopping: take no new requests, finish in-flight ones, flush, close."""
        if self._closing:
            return
        self._closing = True
        self._blocked = True
        self._update_reading()
        await self._drain_and_flush()
        self._close()
        await self._finish()

    def _close(self, abort: bool = False) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if abort:
                transport.abort()
            else:
                transport.close()

    async def _finish(self) -> None:
        """Release the volume once every task is done (runs once per session)."""
        if self.closed.done():
            return
        await self._drain_and_flush()
        extra = self._ids()
        if self.volume is not None:
            self.volume.users -= 1
            self.volume = None
        self.server.sessions.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)
        log.debug("session %d: closed", self.id, extra=extra)
