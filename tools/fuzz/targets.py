"""Fuzz targets for the sans-I/O NBD codec: one function per role and phase, `bytes -> None`.

Shared by the Hypothesis fuzz tests (tests/fuzz/) and the atheris harness (fuzz_nbd.py).
Each input is one control byte and then the peer's byte stream. The control byte picks the
delivery (piece size, receive_data or the get_buffer path), the TLS mode, structured replies.

A target returns normally, or raises `RemoteProtocolError` (the peer broke the protocol: the
adapter closes the connection). Anything else is a finding: another exception type, or an
AssertionError from the invariants checked along the way, chiefly that nothing buffers more
than what arrived or what the protocol's limits allow, whatever length a header declares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from blockvirt.nbd import wire
from blockvirt.nbd.buffer import INITIAL_CAPACITY, MIN_FREE
from blockvirt.nbd.connection import ClientConnection, ServerConnection
from blockvirt.nbd.constants import (
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD_SERVED,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Opt,
    Rep,
)
from blockvirt.nbd.events import (
    Aborted,
    AccessDenied,
    Command,
    DiscCmd,
    ExportDenied,
    ExportInfo,
    Negotiated,
    OptionRefused,
    OptionResult,
    Reply,
    StartTLS,
    WriteCmd,
)
from blockvirt.nbd.exceptions import RemoteProtocolError
from blockvirt.nbd.handshake import MAX_OPTION_REPLY, ClientHandshake, State, TLSMode, transmission_flags
from blockvirt.nbd.transmission import _GROW_STEP, MAX_EXTENTS, ServerTransmission
from blockvirt.server.dispatch import Dispatcher
from blockvirt.storage.drivers.memory import MemoryNode
from blockvirt.storage.node import StorageError

Target = Callable[[bytes], None]
EXPORT_SIZE = 1 << 20


def split(data: bytes) -> tuple[int, bytes]:
    return (data[0], data[1:]) if data else (0, b"")


def piece_size(ctl: int) -> int:
    """1, 7, 64, 4096 or 1 MiB: byte by byte up to whole messages."""
    return (1, 7, 64, 4096, 1 << 20)[(ctl >> 3) % 5]


def pieces(stream: bytes, size: int) -> Iterator[bytes]:
    if size < 64 and len(stream) > 8192:
        size = 64  # byte by byte through large payloads costs time and finds nothing more
    for i in range(0, len(stream), size):
        yield stream[i : i + size]


class FuzzCatalog:
    """Three exports, as one client sees them: open, granted read-only, denied."""

    def __init__(self) -> None:
        self.disk = ExportInfo("disk", EXPORT_SIZE, "fuzz disk")
        self.ro = ExportInfo("ro", EXPORT_SIZE, read_only=True)

    def lookup(self, name: str) -> ExportInfo | ExportDenied | None:
        if name == "secret":
            return ExportDenied(name, "fuzz")
        return {"disk": self.disk, "ro": self.ro}.get(name)

    def listing(self) -> Iterable[tuple[str, str]]:
        return [(e.name, e.description) for e in (self.disk, self.ro)]


# ---------------------------------------------------------------- server, handshake


def server_handshake(data: bytes) -> None:
    ctl, stream = split(data)
    tls = (TLSMode.NONE, TLSMode.ALLOW, TLSMode.REQUIRE)[ctl % 3]
    size = piece_size(ctl)
    conn = ServerConnection(FuzzCatalog(), tls=tls)
    conn.data_to_send()
    hs = conn.handshake
    try:
        for piece in pieces(stream, size):
            conn.receive_data(piece)
            while True:
                ev = hs.next_event()
                out = hs.data_to_send()
                assert len(out) <= 64 * 1024, "one option got more than 64 KiB of replies"
                if ev is None:
                    break
                if isinstance(ev, Negotiated):
                    assert ev.export.name in ("disk", "ro")
                    assert hs.state is State.TRANSMISSION
                    return
                if isinstance(ev, Aborted) or (isinstance(ev, AccessDenied) and ev.closed):
                    assert hs.state is State.CLOSED
                    return
                if isinstance(ev, StartTLS):
                    hs.tls_started()
                elif isinstance(ev, AccessDenied):
                    assert ev.export == "secret" and not ev.closed
                else:
                    assert isinstance(ev, OptionRefused), ev
            buf = hs.buffer
            # Waiting: for client flags, or for the rest of an option no longer than the limit.
            assert len(buf) < max(size, 4) + wire.OPTION.size + MAX_OPTION_LENGTH
            if hs.state is State.OPTIONS and len(buf) >= wire.OPTION.size:
                magic, _, length = wire.OPTION.unpack_from(buf.buf, buf.pos)
                assert magic == IHAVEOPT and length <= MAX_OPTION_LENGTH
            assert len(buf.buf) <= max(INITIAL_CAPACITY, 2 * (len(buf) + max(size, MIN_FREE)))
    except RemoteProtocolError:
        assert hs.state is State.CLOSED, "a protocol error left the handshake open"
        raise


# ---------------------------------------------------------------- server, transmission


def server_transmission(data: bytes) -> None:
    """Requests into the server codec, each validated by the real dispatcher (pure checks) and,
    when valid and possible without waiting, executed inline on a memory node."""
    ctl, stream = split(data)
    structured = bool(ctl & 1)
    via_get_buffer = bool(ctl & 2)
    size = piece_size(ctl)
    tx = ServerTransmission(structured)
    flags = transmission_flags(ExportInfo("disk", EXPORT_SIZE), structured)
    contexts = {1: "base:allocation"} if structured else {}
    node = MemoryNode(EXPORT_SIZE)
    disp = Dispatcher(node, EXPORT_SIZE, flags, tx, contexts)
    for piece in pieces(stream, size):
        if via_get_buffer:
            pos = 0
            while pos < len(piece):
                view = tx.get_buffer(-1)
                n = min(len(view), len(piece) - pos)
                assert n > 0
                view[:n] = piece[pos : pos + n]
                del view
                tx.buffer_updated(n)
                pos += n
        else:
            tx.receive_data(piece)
        while (cmd := tx.next_event()) is not None:
            if isinstance(cmd, DiscCmd):
                return  # the session stops reading here, as after DISC
            _serve(disp, tx, cmd)
        _check_server_tx(tx, size)


def _serve(disp: Dispatcher, tx: ServerTransmission, cmd: Command) -> None:
    if isinstance(cmd, WriteCmd):
        if cmd.data is None:
            assert cmd.length > MAX_PAYLOAD_SERVED
        else:
            assert len(cmd.data) == cmd.length <= MAX_PAYLOAD_SERVED
    err = disp.check(cmd)
    if err is not None:
        out = disp.error_reply(cmd, err)
    else:
        try:
            out = disp.try_now(cmd)
        except StorageError as e:
            out = disp.error_reply(cmd, e)
        if out is None:
            return  # would wait for storage: nothing more to check without a loop
    assert sum(len(b) for b in out) <= 2 * MAX_PAYLOAD_SERVED
    if isinstance(cmd, WriteCmd):
        tx.recycle(cmd.data)


def _check_server_tx(tx: ServerTransmission, size: int) -> None:
    buf = tx.buffer
    if tx._skip:  # discarding an oversized WRITE: nothing piles up meanwhile
        assert len(buf) == 0
    payload, hdr = tx._payload, tx._payload_hdr
    if payload is not None:
        assert hdr is not None and hdr[3] <= MAX_PAYLOAD_SERVED
        # grown as data came, never to the declared length in one go
        assert len(payload) <= max(2 * tx._payload_have, tx._payload_have + _GROW_STEP) + _GROW_STEP
    assert len(buf) <= size + wire.REQUEST.size + MAX_PAYLOAD_SERVED
    assert len(buf.buf) <= max(INITIAL_CAPACITY, 2 * (len(buf) + max(size, MIN_FREE)))


# ---------------------------------------------------------------- client, handshake

#: What the client asks, in order, as the server answers (one option at a time).
_CLIENT_PLANS: tuple[tuple[str, ...], ...] = (
    ("sr", "list", "meta", "info", "go"),
    ("list", "go"),
    ("sr", "meta_list", "export_name"),
    ("export_name",),
)


def client_handshake(data: bytes) -> None:
    ctl, stream = split(data)
    plan = list(_CLIENT_PLANS[ctl % len(_CLIENT_PLANS)])
    size = piece_size(ctl)
    conn = ClientConnection()
    hs = conn.handshake
    for piece in pieces(stream, size):
        conn.receive_data(piece)
        while True:
            ev = hs.next_event()
            hs.data_to_send()
            if ev is not None:
                assert isinstance(ev, OptionResult)
                if ev.reply == Rep.ACK and ev.option in (Opt.GO, Opt.EXPORT_NAME):
                    assert ev.export is not None
                    return  # transmission starts: client_transmission covers it
            if hs.greeted and hs._pending is None:
                if not plan:
                    return
                _send(hs, plan.pop(0))
                continue
            if ev is None:
                break
        buf = hs.buffer
        if hs.greeted and hs._pending not in (None, Opt.EXPORT_NAME) and len(buf) >= wire.OPTION_REPLY.size:
            _, _, _, length = wire.OPTION_REPLY.unpack_from(buf.buf, buf.pos)
            assert length <= MAX_OPTION_REPLY
        assert len(buf) <= size + wire.OPTION_REPLY.size + MAX_OPTION_REPLY


def _send(hs: ClientHandshake, step: str) -> None:
    if step == "sr":
        hs.send_option(Opt.STRUCTURED_REPLY)
    elif step == "list":
        hs.send_option(Opt.LIST)
    elif step == "meta":
        hs.meta_context("disk", ["base:allocation"])
    elif step == "meta_list":
        hs.meta_context("disk", [], list_only=True)
    elif step == "info":
        hs.go("disk", info=True)
    elif step == "go":
        hs.go("disk")
    else:
        hs.export_name("disk")


# ---------------------------------------------------------------- client, transmission

#: Requests the client has in flight before the replies arrive: (command, offset, length).
CLIENT_REQUESTS: tuple[tuple[int, int, int], ...] = (
    (Cmd.READ, 0, 4096),
    (Cmd.WRITE, 4096, 512),
    (Cmd.BLOCK_STATUS, 0, EXPORT_SIZE),
    (Cmd.FLUSH, 0, 0),
    (Cmd.READ, 512, 65536),
    (Cmd.READ, 0, 0),
    (Cmd.TRIM, 0, 4096),
)


def client_transmission(data: bytes) -> None:
    ctl, stream = split(data)
    structured = bool(ctl & 1)
    size = piece_size(ctl)
    conn = ClientConnection()
    tx = conn.start_transmission(structured)
    for cmd, offset, length in CLIENT_REQUESTS:
        tx.request(cmd, offset, length, bytes(length) if cmd == Cmd.WRITE else None)
    longest = max(length for _, _, length in CLIENT_REQUESTS)
    for piece in pieces(stream, size):
        tx.receive_data(piece)
        while (ev := tx.next_event()) is not None:
            assert isinstance(ev, Reply)
            if ev.data is not None:
                assert ev.error == 0
        buf = tx.buffer
        if len(buf) >= wire.CHUNK.size:
            magic, _, _, _, length = wire.CHUNK.unpack_from(buf.buf, buf.pos)
            if magic == STRUCTURED_REPLY_MAGIC:  # waiting for a chunk: only an allowed length
                assert length <= max(8 + longest, 4 + 8 * MAX_EXTENTS)
        assert len(buf) <= size + wire.CHUNK.size + max(8 + longest, 4 + 8 * MAX_EXTENTS)


TARGETS: dict[str, Target] = {
    "server_handshake": server_handshake,
    "server_transmission": server_transmission,
    "client_handshake": client_handshake,
    "client_transmission": client_transmission,
}
