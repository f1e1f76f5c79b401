"""Transmission phase, both roles: request framing, simple and structured replies.

The server side is on the hot path: headers go through precompiled structs, commands are built
through a table, and reply encoders return buffers the adapter hands to `writelines` as-is.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from blockvirt.nbd import wire
from blockvirt.nbd.buffer import ReceiveBuffer
from blockvirt.nbd.constants import (
    MAX_PAYLOAD_ADVERTISED,
    MAX_PAYLOAD_SERVED,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Errno,
    ReplyFlag,
    ReplyType,
)
from blockvirt.nbd.events import (
    BlockStatusCmd,
    CacheCmd,
    Command,
    DiscCmd,
    Extent,
    FlushCmd,
    ReadCmd,
    Reply,
    TrimCmd,
    UnknownCmd,
    WriteCmd,
    WriteZeroesCmd,
)
from blockvirt.nbd.exceptions import LocalProtocolError, RemoteProtocolError

_NO_PAYLOAD: dict[int, type[Command]] = {
    Cmd.READ: ReadCmd,
    Cmd.DISC: DiscCmd,
    Cmd.FLUSH: FlushCmd,
    Cmd.TRIM: TrimCmd,
    Cmd.CACHE: CacheCmd,
    Cmd.WRITE_ZEROES: WriteZeroesCmd,
    Cmd.BLOCK_STATUS: BlockStatusCmd,
}
_REQ = wire.REQUEST
_REQ_SIZE = wire.REQUEST.size
_WRITE = int(Cmd.WRITE)
_SIMPLE = wire.SIMPLE_REPLY
_SIMPLE_MAGIC = SIMPLE_REPLY_MAGIC
_DATA_CHUNK = wire.DATA_CHUNK.pack
_STRUCTURED_MAGIC = STRUCTURED_REPLY_MAGIC
_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
#: Data in one OFFSET_DATA chunk of a (non-DF) READ: at most the maximum payload we advertise.
_MAX_CHUNK_DATA = MAX_PAYLOAD_ADVERTISED
#: WRITE payloads at least this large get their own buffer, received into directly.
_DIRECT_MIN = 64 * 1024
#: ... and that buffer grows by at least this much at a time as the payload arrives.
_GROW_STEP = 1024 * 1024
#: At most this many bytes of recycled payload buffers are kept per connection.
_POOL_MAX = 8 * 1024 * 1024
#: Client side: the longest structured chunk payload accepted for each reply type (None:
#: OFFSET_DATA, bounded by the request's own length). A server declaring more is refused
#: before anything is buffered.
MAX_EXTENTS = 1 << 20  # upstream: SHOULD send at most 2^20 descriptors per chunk
_CHUNK_LIMIT: dict[int, int] = {
    ReplyType.NONE: 0,
    ReplyType.OFFSET_HOLE: wire.OFFSET_HOLE.size,
    ReplyType.BLOCK_STATUS: 4 + 8 * MAX_EXTENTS,
    ReplyType.ERROR: 6 + 4096,
    ReplyType.ERROR_OFFSET: 6 + 4096 + 8,
}
_OTHER_CHUNK_LIMIT = 64 * 1024


class ServerTransmission:
    """Parses requests from the client; encodes our replies.

    Large WRITE payloads are received straight into their own bytearray (see get_buffer), so
    the bytes the storage layer writes are the bytes the socket delivered, never copied.
    Only what arrived in the same receive as the header is copied over; so the receive after
    a large payload asks for one header, in case another large WRITE follows (a stream of 1M
    writes would otherwise copy the first ~256 KiB of each, the receive buffer's worth).
    """

    __slots__ = (
        "_header_next",
        "_payload",
        "_payload_have",
        "_payload_hdr",
        "_pool",
        "_pool_bytes",
        "_skip",
        "_skip_hdr",
        "buffer",
        "closed",
        "structured",
    )

    def __init__(self, structured: bool, buffer: ReceiveBuffer | None = None) -> None:
        self.structured = structured
        self.buffer = buffer if buffer is not None else ReceiveBuffer()
        self.closed = False
        self._skip = 0  # bytes of an oversized WRITE payload still to discard
        self._skip_hdr: tuple[int, int, int, int] | None = None
        self._payload: bytearray | None = None  # a large WRITE payload being received
        self._payload_have = 0
        self._payload_hdr: tuple[int, int, int, int] | None = None
        self._header_next = False  # a large payload just ended: receive one header alone
        # Payload buffers handed back after their WRITE completed, by size: reusing them saves
        # zero-filling and page-faulting a fresh buffer for every large write.
        self._pool: dict[int, list[bytearray]] = {}
        self._pool_bytes = 0

    def recycle(self, buf: object) -> None:
        """Return a large WRITE's payload once storage is done with it (optional)."""
        if type(buf) is bytearray and len(buf) >= _DIRECT_MIN and self._pool_bytes + len(buf) <= _POOL_MAX:
            self._pool.setdefault(len(buf), []).append(buf)
            self._pool_bytes += len(buf)

    def _pooled(self, length: int) -> bytearray | None:
        bufs = self._pool.get(length)
        if not bufs:
            return None
        self._pool_bytes -= length
        return bufs.pop()

    # ------------------------------------------------------------ input
    def get_buffer(self, hint: int = -1) -> memoryview:
        """Where the transport should receive next (BufferedProtocol.get_buffer)."""
        payload = self._payload
        if payload is not None:
            self._grow_payload(_GROW_STEP)
            return memoryview(payload)[self._payload_have :]
        if self._header_next:
            self._header_next = False
            if self.buffer.end == self.buffer.pos:
                return self.buffer.get_buffer(hint)[:_REQ_SIZE]
        return self.buffer.get_buffer(hint)

    def _grow_payload(self, want: int) -> None:
        """Make room for `want` more payload bytes, up to the declared length. The buffer
        grows as data arrives, so a stalled header cannot pin its whole declared payload."""
        payload = self._payload
        assert payload is not None and self._payload_hdr is not None
        target = self._payload_hdr[3]
        need = min(self._payload_have + want, target)
        if len(payload) < need:
            payload += bytes(min(target, max(need, 2 * len(payload))) - len(payload))

    def buffer_updated(self, n: int) -> None:
        if self._payload is not None:
            self._payload_have += n
        else:
            self.buffer.end += n

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        payload = self._payload
        if payload is not None:
            assert self._payload_hdr is not None
            k = min(len(data), self._payload_hdr[3] - self._payload_have)
            self._grow_payload(k)
            payload[self._payload_have : self._payload_have + k] = memoryview(data)[:k]
            self._payload_have += k
            data = memoryview(data)[k:]
            if not data:
                return
        self.buffer.feed(data)

    def next_event(self) -> Command | None:
        """The next complete request, or None if more bytes are needed."""
        buf = self.buffer
        if self._payload is not None:
            assert self._payload_hdr is not None
            flags, cookie, offset, length = self._payload_hdr
            if self._payload_have < length:
                return None
            payload = self._payload
            self._payload = self._payload_hdr = None
            self._header_next = True
            return WriteCmd(cookie, flags, offset, length, payload)
        if self._skip:
            self._skip -= buf.skip(self._skip)
            if self._skip:
                return None
            assert self._skip_hdr is not None
            flags, cookie, offset, length = self._skip_hdr
            self._skip_hdr = None
            return WriteCmd(cookie, flags, offset, length, None)
        avail = buf.end - buf.pos
        if avail < _REQ_SIZE:
            return None
        magic, flags, ctype, cookie, offset, length = _REQ.unpack_from(buf.buf, buf.pos)
        if magic != REQUEST_MAGIC:
            self.closed = True
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        if ctype == _WRITE:
            if length > MAX_PAYLOAD_SERVED:
                # Too big to buffer: discard the payload as it streams in, then fail the request.
                buf.advance(_REQ_SIZE)
                self._skip = length
                self._skip_hdr = (flags, cookie, offset, length)
                return self.next_event()
            if avail >= _REQ_SIZE + length:
                start = buf.pos + _REQ_SIZE
                data = bytes(memoryview(buf.buf)[start : start + length])
                buf.advance(_REQ_SIZE + length)
                return WriteCmd(cookie, flags, offset, length, data)
            if length >= _DIRECT_MIN:
                buf.advance(_REQ_SIZE)
                have = len(buf)
                payload = self._pooled(length) or bytearray(min(length, have + _GROW_STEP))
                buf.take_into(payload, have)
                self._payload, self._payload_have = payload, have
                self._payload_hdr = (flags, cookie, offset, length)
                return None
            return None
        buf.advance(_REQ_SIZE)
        cls = _NO_PAYLOAD.get(ctype)
        if cls is None:
            return UnknownCmd(cookie, flags, offset, length, ctype)
        return cls(cookie, flags, offset, length)

    def receiving(self) -> bool:
        """Whether bytes of a request not yet complete are buffered (after next_event returned
        None): the adapter's request timeout runs while this holds."""
        return self._payload is not None or self._skip > 0 or self.buffer.end > self.buffer.pos

    def pending_payload(self) -> int:
        """Bytes of a WRITE payload we are waiting for (for backpressure accounting)."""
        if self._payload_hdr is not None:
            return self._payload_hdr[3]
        buf = self.buffer
        if len(buf) < _REQ_SIZE:
            return 0
        _, _, ctype, _, _, length = _REQ.unpack_from(buf.buf, buf.pos)
        return length if ctype == _WRITE else 0

    # ------------------------------------------------------------ reply encoders
    def ok(self, cookie: int) -> bytes:
        return _SIMPLE.pack(_SIMPLE_MAGIC, 0, cookie)

    def error(self, cookie: int, errno: int, message: str = "") -> bytes:
        if self.structured:
            return wire.error_chunk(cookie, errno, message or Errno(errno).name)
        return _SIMPLE.pack(_SIMPLE_MAGIC, errno, cookie)

    def read_empty(self, cookie: int) -> bytes:
        """A zero-length READ: structured replies must still use a chunk (NONE, DONE)."""
        if self.structured:
            return wire.chunk_header(cookie, ReplyType.NONE, 0, True)
        return _SIMPLE.pack(_SIMPLE_MAGIC, 0, cookie)

    def read_data(
        self, cookie: int, offset: int, data: bytes | bytearray | memoryview
    ) -> list[bytes | bytearray | memoryview]:
        """A successful READ whose whole range is `data` (one chunk when structured)."""
        if self.structured:
            return [_DATA_CHUNK(_STRUCTURED_MAGIC, _DONE, _OFFSET_DATA, cookie, len(data) + 8, offset), data]
        return [_SIMPLE.pack(_SIMPLE_MAGIC, 0, cookie), data]

    def read_segments(
        self,
        cookie: int,
        segments: Sequence[tuple[int, int, bytes | bytearray | memoryview | None]],
    ) -> list[bytes | bytearray | memoryview]:
        """A READ as (offset, length, data-or-None-for-zeros) segments in order.

        Structured: data chunks and hole chunks (the last marked DONE). Simple: the bytes.
        """
        out: list[bytes | bytearray | memoryview] = []
        if not self.structured:
            out.append(_SIMPLE.pack(_SIMPLE_MAGIC, 0, cookie))
            for _off, length, data in segments:
                out.append(bytes(length) if data is None else data)
            return out
        last = len(segments) - 1
        for i, (off, length, data) in enumerate(segments):
            done = i == last
            if data is None:
                out.append(wire.hole_chunk(cookie, off, length, done))
            elif length <= _MAX_CHUNK_DATA:
                out.append(wire.data_chunk_header(cookie, off, length, done))
                out.append(data)
            else:  # spec: no chunk may carry more data than the advertised maximum payload
                view = memoryview(data)
                for start in range(0, length, _MAX_CHUNK_DATA):
                    part = view[start : start + _MAX_CHUNK_DATA]
                    end = done and start + len(part) == length
                    out.append(wire.data_chunk_header(cookie, off + start, len(part), end))
                    out.append(part)
        return out

    def block_status(self, cookie: int, contexts: dict[int, Sequence[tuple[int, int]]]) -> bytes:
        """One BLOCK_STATUS chunk per selected context, the last one DONE."""
        if not self.structured:
            raise LocalProtocolError("BLOCK_STATUS needs structured replies")
        parts: list[bytes] = []
        n = len(contexts)
        for i, (cid, extents) in enumerate(contexts.items()):
            payload = wire.U32.pack(cid) + b"".join(wire.EXTENT.pack(ln, fl) for ln, fl in extents)
            parts.append(wire.chunk_header(cookie, ReplyType.BLOCK_STATUS, len(payload), i == n - 1))
            parts.append(payload)
        return b"".join(parts)


# ======================================================================= client role


@dataclass(slots=True)
class _Pending:
    cmd: int
    offset: int
    length: int
    data: bytearray | None = None
    error: int = 0
    message: str = ""
    extents: dict[int, tuple[Extent, ...]] = field(default_factory=dict)
    chunks: list[tuple[str, int, int]] = field(default_factory=list)


class ClientTransmission:
    """Encodes requests and turns (simple or structured) replies into `Reply` events."""

    def __init__(self, structured: bool, buffer: ReceiveBuffer | None = None) -> None:
        self.structured = structured
        self.buffer = buffer if buffer is not None else ReceiveBuffer()
        self._cookies = itertools.count(1)
        self._pending: dict[int, _Pending] = {}

    def receive_data(self, data: bytes) -> None:
        self.buffer.feed(data)

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        data: bytes | None = None,
        flags: int = 0,
    ) -> tuple[int, list[bytes]]:
        """Encode a request; returns its cookie and the buffers to send."""
        cookie = next(self._cookies)
        if cmd == Cmd.WRITE:
            if data is None:
                raise LocalProtocolError("WRITE needs data")
            length = len(data)
        if cmd != Cmd.DISC:
            self._pending[cookie] = _Pending(cmd, offset, length)
        out = [wire.request(cmd, flags, cookie, offset, length)]
        if data is not None:
            out.append(data)
        return cookie, out

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def next_event(self) -> Reply | None:
        buf = self.buffer
        while len(buf) >= 4:
            (magic,) = wire.U32.unpack_from(buf.buf, buf.pos)
            if magic == SIMPLE_REPLY_MAGIC:
                if len(buf) < _SIMPLE.size:
                    return None
                _, err, cookie = _SIMPLE.unpack_from(buf.buf, buf.pos)
                p = self._pending.get(cookie)
                if p is None:
                    raise RemoteProtocolError(f"reply for unknown cookie {cookie}")
                want = p.length if (p.cmd == Cmd.READ and err == 0) else 0
                if len(buf) < _SIMPLE.size + want:
                    return None
                buf.advance(_SIMPLE.size)
                data = buf.take(want) if p.cmd == Cmd.READ and err == 0 else None
                del self._pending[cookie]
                message = Errno(err).name if err and err in Errno._value2member_map_ else ""
                return Reply(cookie, err, message, data)
            if magic == STRUCTURED_REPLY_MAGIC:
                if len(buf) < wire.CHUNK.size:
                    return None
                _, flags, rtype, cookie, length = wire.CHUNK.unpack_from(buf.buf, buf.pos)
                self._check_chunk(rtype, cookie, length)
                if len(buf) < wire.CHUNK.size + length:
                    return None
                buf.advance(wire.CHUNK.size)
                payload = buf.take(length)
                try:
                    ev = self._chunk(flags, rtype, cookie, payload)
                except struct.error as e:  # a payload too short for its type
                    raise RemoteProtocolError(f"malformed reply chunk of type {rtype}: {e}") from None
                if ev is not None:
                    return ev
                continue
            raise RemoteProtocolError(f"bad reply magic {magic:#x}")
        return None

    def _check_chunk(self, rtype: int, cookie: int, length: int) -> None:
        """Refuse a chunk before buffering it if its declared length cannot be right."""
        p = self._pending.get(cookie)
        if p is None:
            raise RemoteProtocolError(f"chunk for unknown cookie {cookie}")
        if rtype == ReplyType.OFFSET_DATA:
            limit = 8 + p.length if p.cmd == Cmd.READ else 0
        else:
            limit = _CHUNK_LIMIT.get(rtype, _OTHER_CHUNK_LIMIT)
        if length > limit:
            raise RemoteProtocolError(f"reply chunk of type {rtype} declares {length} bytes, at most {limit}")

    def _chunk(self, flags: int, rtype: int, cookie: int, payload: bytes) -> Reply | None:
        p = self._pending.get(cookie)
        if p is None:
            raise RemoteProtocolError(f"chunk for unknown cookie {cookie}")
        if flags & ~int(ReplyFlag.DONE):  # int(): ~ on an IntFlag only inverts defined bits
            raise RemoteProtocolError(f"unknown reply flags {flags:#x}")
        if rtype == ReplyType.OFFSET_DATA:
            (off,) = wire.U64.unpack_from(payload, 0)
            n = len(payload) - 8
            if n <= 0:
                raise RemoteProtocolError("data chunk without data")
            if off < p.offset or off + n > p.offset + p.length:
                raise RemoteProtocolError("data chunk outside the request")
            if p.data is None:
                p.data = bytearray(p.length)
            p.data[off - p.offset : off - p.offset + n] = payload[8:]
            p.chunks.append(("data", off, n))
        elif rtype == ReplyType.OFFSET_HOLE:
            off, n = wire.OFFSET_HOLE.unpack(payload)
            if off < p.offset or off + n > p.offset + p.length:
                raise RemoteProtocolError("hole chunk outside the request")
            if p.data is None:
                p.data = bytearray(p.length)
            p.chunks.append(("hole", off, n))
        elif rtype == ReplyType.BLOCK_STATUS:
            if p.cmd != Cmd.BLOCK_STATUS or (len(payload) - 4) % 8:
                raise RemoteProtocolError("malformed block status chunk")
            (cid,) = wire.U32.unpack_from(payload, 0)
            ext = tuple(
                Extent(*wire.EXTENT.unpack_from(payload, 4 + 8 * i)) for i in range((len(payload) - 4) // 8)
            )
            p.extents[cid] = ext
        elif rtype in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            err, mlen = wire.ERROR_HEAD.unpack_from(payload, 0)
            if err == 0 or 6 + mlen > len(payload):
                raise RemoteProtocolError("malformed error chunk")
            p.error = err
            p.message = payload[6 : 6 + mlen].decode(errors="replace")
        elif rtype != ReplyType.NONE:
            if rtype & (1 << 15):
                p.error = p.error or Errno.EINVAL
            else:
                raise RemoteProtocolError(f"unknown reply chunk type {rtype}")
        if not flags & ReplyFlag.DONE:
            return None
        del self._pending[cookie]
        data: bytes | None = None
        if p.cmd == Cmd.READ and not p.error:
            data = bytes(p.data) if p.data is not None else bytes(p.length)
        return Reply(
            cookie,
            p.error,
            p.message,
            data,
            p.extents if p.cmd == Cmd.BLOCK_STATUS else None,
            tuple(p.chunks),
        )


def merge_extents(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join neighbouring (length, flags) extents with equal flags (spec: SHOULD differ)."""
    out: list[tuple[int, int]] = []
    for ln, fl in extents:
        if ln <= 0:
            continue
        if out and out[-1][1] == fl:
            out[-1] = (out[-1][0] + ln, fl)
        else:
            out.append((ln, fl))
    return out
