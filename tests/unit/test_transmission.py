"""Transmission framing: request parsing (server role) and reply decoding (client role)."""

from __future__ import annotations

import tracemalloc

import pytest

from blockvirt.nbd import wire
from blockvirt.nbd.buffer import ReceiveBuffer
from blockvirt.nbd.constants import (
    MAX_PAYLOAD_SERVED,
    REQUEST_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
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
    TrimCmd,
    UnknownCmd,
    WriteCmd,
    WriteZeroesCmd,
)
from blockvirt.nbd.exceptions import LocalProtocolError, RemoteProtocolError
from blockvirt.nbd.transmission import ClientTransmission, ServerTransmission, merge_extents
from tests.helpers import NbdPair

REQ = wire.REQUEST.size


def drain(tx: ServerTransmission) -> list[Command]:
    out: list[Command] = []
    while (ev := tx.next_event()) is not None:
        out.append(ev)
    return out


def mixed_stream() -> tuple[bytes, list[Command]]:
    """One request of every kind, with the commands they must parse to."""
    parts = [
        (wire.request(Cmd.READ, CmdFlag.FUA, 1, 4096, 512), ReadCmd(1, 1, 4096, 512)),
        (wire.request(Cmd.WRITE, 0, 2, 8, 5) + b"hello", WriteCmd(2, 0, 8, 5, b"hello")),
        (wire.request(Cmd.FLUSH, 0, 3, 0, 0), FlushCmd(3, 0, 0, 0)),
        (wire.request(Cmd.TRIM, 0, 4, 0, 1 << 20), TrimCmd(4, 0, 0, 1 << 20)),
        (wire.request(Cmd.CACHE, 0, 5, 0, 100), CacheCmd(5, 0, 0, 100)),
        (wire.request(Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE, 6, 512, 1024), WriteZeroesCmd(6, 2, 512, 1024)),
        (
            wire.request(Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 7, 0, 2**32 - 1),
            BlockStatusCmd(7, 8, 0, 2**32 - 1),
        ),
        (wire.request(Cmd.WRITE, 0, 2**64 - 1, 2**64 - 1, 0), WriteCmd(2**64 - 1, 0, 2**64 - 1, 0, b"")),
        (wire.request(42, 0xFFFF, 9, 1, 2), UnknownCmd(9, 0xFFFF, 1, 2, 42)),
        (wire.request(Cmd.DISC, 0, 10, 0, 0), DiscCmd(10, 0, 0, 0)),
    ]
    return b"".join(p for p, _ in parts), [c for _, c in parts]


# ---------------------------------------------------------------- request parsing


def test_every_request_kind_parses() -> None:
    data, expected = mixed_stream()
    tx = ServerTransmission(structured=True)
    tx.receive_data(data)
    assert drain(tx) == expected
    assert len(tx.buffer) == 0


def test_requests_split_at_every_byte_boundary() -> None:
    data, expected = mixed_stream()
    tx = ServerTransmission(structured=False)
    got: list[Command] = []
    for b in data:
        tx.receive_data(bytes([b]))
        got.extend(drain(tx))
    assert got == expected


@pytest.mark.parametrize("cut", range(1, 40))
def test_requests_split_once_anywhere(cut: int) -> None:
    data, expected = mixed_stream()
    tx = ServerTransmission(structured=False)
    tx.receive_data(data[:cut])
    got = drain(tx)
    tx.receive_data(data[cut:])
    got += drain(tx)
    assert got == expected


def test_write_payload_assembled_from_pieces() -> None:
    payload = bytes(range(256)) * 300
    tx = ServerTransmission(structured=False)
    tx.receive_data(wire.request(Cmd.WRITE, CmdFlag.FUA, 77, 1 << 30, len(payload)))
    assert tx.next_event() is None
    assert tx.pending_payload() == len(payload)
    for i in range(0, len(payload), 1000):
        assert tx.next_event() is None
        tx.receive_data(payload[i : i + 1000])
    ev = tx.next_event()
    assert ev == WriteCmd(77, int(CmdFlag.FUA), 1 << 30, len(payload), payload)
    assert isinstance(ev, WriteCmd) and bytes(ev.data or b"") == payload
    assert tx.pending_payload() == 0


def test_write_data_is_a_copy_not_a_view_of_the_buffer() -> None:
    tx = ServerTransmission(structured=False)
    tx.receive_data(wire.request(Cmd.WRITE, 0, 1, 0, 4) + b"abcd")
    tx.receive_data(wire.request(Cmd.WRITE, 0, 2, 0, 4) + b"wxyz")
    first = tx.next_event()
    second = tx.next_event()
    tx.receive_data(b"more data that may reuse the buffer")
    assert isinstance(first, WriteCmd) and bytes(first.data or b"") == b"abcd"
    assert isinstance(second, WriteCmd) and bytes(second.data or b"") == b"wxyz"


@pytest.mark.parametrize("chunk", [1, 4096, 1 << 20, 8 << 20])
def test_oversized_write_is_skipped_and_next_request_parsed(chunk: int) -> None:
    length = MAX_PAYLOAD_SERVED + 1
    tx = ServerTransmission(structured=True)
    tx.receive_data(wire.request(Cmd.WRITE, 0, 5, 0, length))
    assert tx.next_event() is None
    sent = 0
    events: list[Command] = []
    piece = bytes(chunk)
    if chunk == 1:  # a byte at a time for the whole payload is too slow; do the tail only
        tx.receive_data(bytes(length - 100))
        sent = length - 100
        assert tx.next_event() is None
    while sent < length:
        n = min(chunk, length - sent)
        tx.receive_data(piece[:n])
        sent += n
        events.extend(drain(tx))
        assert len(tx.buffer) == 0  # never buffered
        if sent < length:
            assert events == []
    assert events == [WriteCmd(5, 0, 0, length, None)]
    tx.receive_data(wire.request(Cmd.READ, 0, 6, 0, 10))
    assert tx.next_event() == ReadCmd(6, 0, 0, 10)


def test_oversized_write_with_following_request_in_same_read() -> None:
    length = MAX_PAYLOAD_SERVED + 4096
    tx = ServerTransmission(structured=False)
    data = wire.request(Cmd.WRITE, 0, 1, 0, length) + bytes(length) + wire.request(Cmd.FLUSH, 0, 2, 0, 0)
    tx.receive_data(data)
    assert drain(tx) == [WriteCmd(1, 0, 0, length, None), FlushCmd(2, 0, 0, 0)]


def test_write_at_the_limit_is_buffered() -> None:
    tx = ServerTransmission(structured=False)
    tx.receive_data(wire.request(Cmd.WRITE, 0, 1, 0, MAX_PAYLOAD_SERVED) + bytes(MAX_PAYLOAD_SERVED))
    ev = tx.next_event()
    assert isinstance(ev, WriteCmd) and ev.data is not None and len(ev.data) == MAX_PAYLOAD_SERVED


@pytest.mark.parametrize("magic", [0, REQUEST_MAGIC + 1, 0x12560953, 0x25609514, STRUCTURED_REPLY_MAGIC])
def test_bad_request_magic_raises(magic: int) -> None:
    tx = ServerTransmission(structured=False)
    tx.receive_data(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.FLUSH, 1, 0, 0))
    tx.receive_data(wire.REQUEST.pack(magic, 0, Cmd.READ, 2, 0, 0))
    assert isinstance(tx.next_event(), FlushCmd)
    with pytest.raises(RemoteProtocolError):
        tx.next_event()
    assert tx.closed


def test_partial_header_waits() -> None:
    tx = ServerTransmission(structured=False)
    tx.receive_data(wire.request(Cmd.READ, 0, 1, 0, 1)[: REQ - 1])
    assert tx.next_event() is None
    assert tx.pending_payload() == 0


def feed_like_a_transport(tx: ServerTransmission, data: bytes, max_recv: int) -> list[Command]:
    """Deliver `data` the way asyncio's BufferedProtocol does: get_buffer, fill, buffer_updated."""
    got: list[Command] = []
    pos = 0
    while pos < len(data):
        view = tx.get_buffer(-1)
        assert len(view) > 0
        n = min(len(view), max_recv, len(data) - pos)
        view[:n] = data[pos : pos + n]
        del view
        tx.buffer_updated(n)
        pos += n
        got.extend(drain(tx))
    return got


@pytest.mark.parametrize("max_recv", [1, 7, 4096, 65536, 1 << 20])
def test_requests_through_get_buffer(max_recv: int) -> None:
    data, expected = mixed_stream()
    big = bytes(range(256)) * 1024  # 256 KiB: received straight into its own buffer
    data += wire.request(Cmd.WRITE, 0, 11, 0, len(big)) + big + wire.request(Cmd.FLUSH, 0, 12, 0, 0)
    expected = [*expected, WriteCmd(11, 0, 0, len(big), big), FlushCmd(12, 0, 0, 0)]
    tx = ServerTransmission(structured=True)
    assert feed_like_a_transport(tx, data, max_recv) == expected


def test_large_write_payload_goes_to_its_own_buffer() -> None:
    length = 1 << 20
    payload = bytes(range(251)) * (length // 251) + bytes(length % 251)
    tx = ServerTransmission(structured=False)
    tx.receive_data(wire.request(Cmd.WRITE, 0, 3, 4096, length) + payload[:1000])
    assert tx.next_event() is None
    assert tx.pending_payload() == length
    view = tx.get_buffer(-1)
    assert len(view) == length - 1000  # exactly the rest of the payload, nothing more
    view[:] = payload[1000:]
    del view
    tx.buffer_updated(length - 1000)
    ev = tx.next_event()
    assert ev == WriteCmd(3, 0, 4096, length, payload)
    assert tx.next_event() is None
    assert tx.pending_payload() == 0
    tx.receive_data(wire.request(Cmd.READ, 0, 4, 0, 1))
    assert tx.next_event() == ReadCmd(4, 0, 0, 1)


def test_after_a_large_payload_the_next_receive_takes_one_header() -> None:
    # A stream of 1M writes: the receive after a payload would otherwise take the next
    # header with ~256 KiB of its payload, to be copied into the payload's own buffer.
    length = 1 << 20
    first, second = b"\x01" * length, b"\x02" * length
    tx = ServerTransmission(structured=False)
    tx.receive_data(wire.request(Cmd.WRITE, 0, 1, 0, length))
    assert tx.next_event() is None
    view = tx.get_buffer(-1)
    view[:] = first
    del view
    tx.buffer_updated(length)
    assert tx.next_event() == WriteCmd(1, 0, 0, length, first)
    view = tx.get_buffer(-1)
    assert len(view) == REQ  # one header, nothing of its payload
    view[:] = wire.request(Cmd.WRITE, 0, 2, length, length)
    del view
    tx.buffer_updated(REQ)
    assert tx.next_event() is None
    view = tx.get_buffer(-1)
    assert len(view) == length  # the whole payload lands in its own buffer, nothing copied
    view[:] = second
    del view
    tx.buffer_updated(length)
    assert tx.next_event() == WriteCmd(2, 0, length, length, second)
    # A small request after it: one short receive, then the buffer's full space again.
    view = tx.get_buffer(-1)
    view[:] = wire.request(Cmd.READ, 0, 3, 0, 512)
    del view
    tx.buffer_updated(REQ)
    assert tx.next_event() == ReadCmd(3, 0, 0, 512)
    assert len(tx.get_buffer(-1)) > REQ


def test_large_write_payload_through_receive_data_with_next_request() -> None:
    length = 100_000
    payload = b"\x5a" * length
    tx = ServerTransmission(structured=False)
    tx.receive_data(wire.request(Cmd.WRITE, 0, 1, 0, length) + payload[:10])
    assert tx.next_event() is None
    tx.receive_data(payload[10:] + wire.request(Cmd.FLUSH, 0, 2, 0, 0))
    assert drain(tx) == [WriteCmd(1, 0, 0, length, payload), FlushCmd(2, 0, 0, 0)]


def test_write_header_alone_does_not_pin_its_whole_payload() -> None:
    tx = ServerTransmission(structured=False)
    tracemalloc.start()
    try:
        tx.receive_data(wire.request(Cmd.WRITE, 0, 1, 0, MAX_PAYLOAD_SERVED) + b"x")
        assert tx.next_event() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"{peak} bytes allocated for a 29-byte input"


# ---------------------------------------------------------------- receive buffer


def test_receive_buffer_take_skip_and_compaction() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"abcdef")
    assert buf.take(2) == b"ab"
    assert len(buf) == 4
    assert buf.skip(10) == 4
    assert len(buf) == 0 and buf.pos == 0
    big = bytes(300 * 1024) + b"tail"
    buf.feed(big)
    buf.advance(300 * 1024)
    assert buf.take(4) == b"tail"
    assert buf.pos == buf.end == 0  # emptied: rewound without resizing
    # A partial message left at the end is moved to the front when room is needed.
    buf.feed(bytes(len(buf.buf) - 10) + b"0123456789")
    buf.advance(len(buf.buf) - 10)
    view = buf.get_buffer(100_000)
    assert buf.pos == 0 and buf.end == 10 and len(view) >= 100_000
    assert buf.take(10) == b"0123456789"


def test_receive_buffer_get_buffer_then_update() -> None:
    buf = ReceiveBuffer(capacity=16)
    view = buf.get_buffer(8)
    view[:5] = b"hello"
    del view
    buf.buffer_updated(5)
    assert buf.take(5) == b"hello"


# ---------------------------------------------------------------- reply encoders -> client


def _pair(structured: bool) -> NbdPair:
    pair = NbdPair()
    pair.negotiate("disk", structured=structured)
    return pair


@pytest.mark.parametrize("structured", [False, True])
def test_ok_reply(structured: bool) -> None:
    pair = _pair(structured)
    cookie, cmd = pair.request(Cmd.WRITE, 0, data=b"abc")
    reply = pair.reply([pair.stx.ok(cmd.cookie)])
    assert (reply.cookie, reply.error, reply.data, reply.message) == (cookie, 0, None, "")
    assert pair.tx.in_flight == 0


@pytest.mark.parametrize("structured", [False, True])
def test_error_reply(structured: bool) -> None:
    pair = _pair(structured)
    cookie, cmd = pair.request(Cmd.TRIM, 0, 4096)
    raw = pair.stx.error(cmd.cookie, Errno.EPERM, "read-only")
    (magic,) = wire.U32.unpack_from(raw)
    assert magic == (STRUCTURED_REPLY_MAGIC if structured else wire.SIMPLE_REPLY.unpack(raw)[0])
    reply = pair.reply([raw])
    assert reply.cookie == cookie and reply.error == Errno.EPERM
    if structured:
        assert reply.message == "read-only"


def test_structured_error_chunk_layout_and_default_message() -> None:
    pair = _pair(True)
    _, cmd = pair.request(Cmd.READ, 0, 512)
    raw = pair.stx.error(cmd.cookie, Errno.EINVAL)
    _, flags, rtype, cookie, length = wire.CHUNK.unpack_from(raw)
    assert flags == ReplyFlag.DONE and rtype == ReplyType.ERROR and cookie == cmd.cookie
    err, mlen = wire.ERROR_HEAD.unpack_from(raw, wire.CHUNK.size)
    assert err == Errno.EINVAL and length == 6 + mlen
    reply = pair.reply([raw])
    assert reply.error == Errno.EINVAL and reply.message == "EINVAL" and reply.data is None


def test_error_message_is_capped() -> None:
    raw = wire.error_chunk(1, Errno.EIO, "x" * 5000)
    _, _, _, _, length = wire.CHUNK.unpack_from(raw)
    assert length <= 1006


@pytest.mark.parametrize("structured", [False, True])
def test_read_data_reply(structured: bool) -> None:
    pair = _pair(structured)
    data = bytes(range(256)) * 16
    cookie, cmd = pair.request(Cmd.READ, 8192, len(data))
    reply = pair.reply(pair.stx.read_data(cmd.cookie, cmd.offset, data))
    assert reply.cookie == cookie and reply.error == 0 and reply.data == data
    if structured:
        assert reply.chunks == (("data", 8192, len(data)),)


def test_simple_read_error_has_no_payload() -> None:
    pair = _pair(False)
    c1, cmd1 = pair.request(Cmd.READ, 0, 4096)
    c2, cmd2 = pair.request(Cmd.READ, 0, 4)
    pair.tx.receive_data(pair.stx.error(cmd1.cookie, Errno.EIO))
    pair.tx.receive_data(b"".join(pair.stx.read_data(cmd2.cookie, 0, b"abcd")))
    r1 = pair.tx.next_event()
    r2 = pair.tx.next_event()
    assert r1 is not None and (r1.cookie, r1.error, r1.data) == (c1, Errno.EIO, None)
    assert r2 is not None and (r2.cookie, r2.data) == (c2, b"abcd")


@pytest.mark.parametrize("structured", [False, True])
def test_read_segments_with_holes(structured: bool) -> None:
    pair = _pair(structured)
    segs = [(0, 512, None), (512, 1024, b"\x01" * 1024), (1536, 2560, None), (4096, 4, b"tail")]
    cookie, cmd = pair.request(Cmd.READ, 0, 4100)
    out = pair.stx.read_segments(cmd.cookie, segs)
    if structured:
        # hole, data header, data, hole, data header, data: only the last chunk is DONE
        headers = [
            bytes(b)
            for b in out
            if len(b) >= wire.CHUNK.size and wire.U32.unpack_from(b)[0] == STRUCTURED_REPLY_MAGIC
        ]
        done = [wire.CHUNK.unpack_from(h)[1] & ReplyFlag.DONE for h in headers]
        assert done == [0, 0, 0, 1]
    reply = pair.reply(out)
    assert reply.cookie == cookie and reply.error == 0
    assert reply.data == bytes(512) + b"\x01" * 1024 + bytes(2560) + b"tail"
    if structured:
        assert reply.chunks == (
            ("hole", 0, 512),
            ("data", 512, 1024),
            ("hole", 1536, 2560),
            ("data", 4096, 4),
        )


def test_hole_only_read() -> None:
    pair = _pair(True)
    _, cmd = pair.request(Cmd.READ, 4096, 8192)
    raw = pair.stx.read_segments(cmd.cookie, [(4096, 8192, None)])
    assert len(raw) == 1 and len(raw[0]) == wire.CHUNK.size + 12
    _, flags, rtype, _, length = wire.CHUNK.unpack_from(raw[0])
    assert (flags, rtype, length) == (ReplyFlag.DONE, ReplyType.OFFSET_HOLE, 12)
    reply = pair.reply(raw)
    assert reply.data == bytes(8192)


@pytest.mark.parametrize("structured", [False, True])
def test_zero_length_read(structured: bool) -> None:
    pair = _pair(structured)
    cookie, cmd = pair.request(Cmd.READ, 0, 0)
    raw = pair.stx.read_empty(cmd.cookie)
    if structured:
        assert raw == wire.CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.NONE, cookie, 0)
    else:
        assert raw == wire.simple_reply(cookie)
    reply = pair.reply([raw])
    assert reply.cookie == cookie and reply.error == 0 and reply.data == b""


def test_block_status_reply_one_chunk_per_context() -> None:
    pair = _pair(True)
    cookie, cmd = pair.request(Cmd.BLOCK_STATUS, 0, 1 << 20)
    raw = pair.stx.block_status(cmd.cookie, {1: [(4096, 0), (8192, 3)], 2: [(12288, 1)]})
    _, flags, rtype, _, length = wire.CHUNK.unpack_from(raw)
    assert rtype == ReplyType.BLOCK_STATUS and flags == 0 and length == 4 + 16
    reply = pair.reply([raw])
    assert reply.cookie == cookie and reply.error == 0
    assert reply.extents == {1: (Extent(4096, 0), Extent(8192, 3)), 2: (Extent(12288, 1),)}


def test_block_status_needs_structured_replies() -> None:
    tx = ServerTransmission(structured=False)
    with pytest.raises(LocalProtocolError):
        tx.block_status(1, {1: [(512, 0)]})


def test_replies_out_of_order_and_interleaved_chunks() -> None:
    pair = _pair(True)
    c1, r1 = pair.request(Cmd.READ, 0, 8)
    c2, r2 = pair.request(Cmd.READ, 8, 8)
    c3, r3 = pair.request(Cmd.FLUSH)
    stx = pair.stx
    stream = (
        wire.data_chunk_header(c2, 8, 4, False)
        + b"ABCD"
        + wire.data_chunk_header(c1, 4, 4, False)
        + b"wxyz"
        + stx.ok(c3)
        + wire.hole_chunk(c2, 12, 4, True)
        + wire.data_chunk_header(c1, 0, 4, True)
        + b"abcd"
    )
    pair.tx.receive_data(stream)
    got = []
    while (ev := pair.tx.next_event()) is not None:
        got.append(ev)
    assert [g.cookie for g in got] == [c3, c2, c1]
    assert got[1].data == b"ABCD" + bytes(4)
    assert got[2].data == b"abcdwxyz"
    assert pair.tx.in_flight == 0
    assert (r1.cookie, r2.cookie, r3.cookie) == (c1, c2, c3)


def test_client_decodes_reply_split_at_every_byte() -> None:
    pair = _pair(True)
    _, cmd = pair.request(Cmd.READ, 0, 1000)
    segs: list[tuple[int, int, bytes | None]] = [(0, 500, b"x" * 500), (500, 500, None)]
    raw = b"".join(bytes(b) for b in pair.stx.read_segments(cmd.cookie, segs))
    for b in raw[:-1]:
        pair.tx.receive_data(bytes([b]))
        assert pair.tx.next_event() is None
    pair.tx.receive_data(raw[-1:])
    reply = pair.tx.next_event()
    assert reply is not None and reply.data == b"x" * 500 + bytes(500)


@pytest.mark.parametrize(
    "bad",
    [
        wire.simple_reply(999),  # unknown cookie
        wire.chunk_header(999, ReplyType.NONE, 0, True),
        wire.U32.pack(0xDEADBEEF) + bytes(12),  # bad magic
    ],
)
def test_client_rejects_bad_replies(bad: bytes) -> None:
    pair = _pair(True)
    pair.request(Cmd.READ, 0, 8)
    pair.tx.receive_data(bad)
    with pytest.raises(RemoteProtocolError):
        pair.tx.next_event()


def test_client_rejects_chunks_outside_the_request() -> None:
    pair = _pair(True)
    cookie, _ = pair.request(Cmd.READ, 4096, 8)
    pair.tx.receive_data(wire.data_chunk_header(cookie, 4100, 8, True) + bytes(8))
    with pytest.raises(RemoteProtocolError):
        pair.tx.next_event()
    pair = _pair(True)
    cookie, _ = pair.request(Cmd.READ, 4096, 8)
    pair.tx.receive_data(wire.hole_chunk(cookie, 0, 8, True))
    with pytest.raises(RemoteProtocolError):
        pair.tx.next_event()


def test_client_unknown_error_chunk_type_fails_only_that_request() -> None:
    pair = _pair(True)
    cookie, _ = pair.request(Cmd.READ, 0, 8)
    pair.tx.receive_data(wire.chunk_header(cookie, 0x8000 | 77, 0, True))
    reply = pair.tx.next_event()
    assert reply is not None and reply.error == Errno.EINVAL and reply.data is None
    cookie, _ = pair.request(Cmd.READ, 0, 8)
    pair.tx.receive_data(wire.chunk_header(cookie, 77, 0, True))
    with pytest.raises(RemoteProtocolError):
        pair.tx.next_event()


def test_client_request_encoding() -> None:
    tx = ClientTransmission(structured=False)
    cookie, out = tx.request(Cmd.WRITE, 10, data=b"abc", flags=CmdFlag.FUA)
    assert out == [wire.REQUEST.pack(REQUEST_MAGIC, CmdFlag.FUA, Cmd.WRITE, cookie, 10, 3), b"abc"]
    with pytest.raises(LocalProtocolError):
        tx.request(Cmd.WRITE, 0)
    _, out = tx.request(Cmd.DISC)
    assert tx.in_flight == 1  # DISC has no reply, so it is not pending


def test_merge_extents() -> None:
    assert merge_extents([(1, 0), (2, 0), (0, 3), (4, 3), (5, 3), (6, 0)]) == [(3, 0), (9, 3), (6, 0)]
    assert merge_extents([]) == []
