"""Hypothesis: the codec under arbitrary input, request/reply round trips, and a storage model."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from blockvirt.nbd import wire
from blockvirt.nbd.buffer import INITIAL_CAPACITY, MIN_FREE, ReceiveBuffer
from blockvirt.nbd.connection import ServerConnection
from blockvirt.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD_SERVED,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    Opt,
)
from blockvirt.nbd.events import (
    Aborted,
    AccessDenied,
    BlockStatusCmd,
    CacheCmd,
    Command,
    DiscCmd,
    Extent,
    FlushCmd,
    Negotiated,
    OptionRefused,
    ReadCmd,
    StartTLS,
    TrimCmd,
    UnknownCmd,
    WriteCmd,
    WriteZeroesCmd,
)
from blockvirt.nbd.exceptions import ProtocolError
from blockvirt.nbd.handshake import State, TLSMode
from blockvirt.nbd.transmission import ClientTransmission, ServerTransmission
from blockvirt.storage.drivers.memory import MemoryNode
from blockvirt.storage.node import HOLE, ZERO
from tests.helpers import (
    NbdPair,
    default_catalog,
    execute,
    make_dispatcher,
    option_payload_info,
    option_payload_meta,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
NAMES = st.sampled_from(["disk", "ro", "plain", "nope", "secret", "", "\u00e9t\u00e9"])
QUERIES = st.lists(st.sampled_from([BASE_ALLOCATION, "base:", "qemu:", "x:y", ""]), max_size=4)
OPT_CODES = st.one_of(st.sampled_from(list(Opt)), U32)

# ---------------------------------------------------------------- arbitrary input to the server

option_frame = st.one_of(
    st.binary(max_size=40),
    st.builds(wire.option, OPT_CODES, st.binary(max_size=64)),
    st.builds(
        lambda o, n, i: wire.option(o, option_payload_info(n, i)),
        st.sampled_from([Opt.INFO, Opt.GO]),
        NAMES,
        st.lists(U16, max_size=4),
    ),
    st.builds(
        lambda o, n, q: wire.option(o, option_payload_meta(n, q)),
        st.sampled_from([Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT]),
        NAMES,
        QUERIES,
    ),
    st.builds(lambda n: wire.option(Opt.EXPORT_NAME, n.encode()), NAMES),
    st.sampled_from(
        [
            wire.option(Opt.STRUCTURED_REPLY),
            wire.option(Opt.LIST),
            wire.option(Opt.STARTTLS),
            wire.option(Opt.ABORT),
        ]
    ),
    # a header alone, possibly declaring a huge length
    st.builds(lambda o, n: wire.OPTION.pack(IHAVEOPT, o, n), OPT_CODES, U32),
)


@st.composite
def request_frame(draw: st.DrawFn) -> bytes:
    """A well-framed request of any type and flags; WRITE headers may declare any length."""
    cmd = draw(st.one_of(st.sampled_from([Cmd.WRITE, Cmd.WRITE, *Cmd]), U16))
    flags, cookie, offset = draw(U16), draw(U64), draw(U64)
    if cmd != Cmd.WRITE:
        return wire.request(cmd, flags, cookie, offset, draw(U32))
    if draw(st.booleans()):
        payload = draw(st.binary(max_size=64))
        return wire.request(cmd, flags, cookie, offset, len(payload)) + payload
    # a header alone declaring any length (up to 4 GiB), with some of its payload
    return wire.request(cmd, flags, cookie, offset, draw(U32)) + draw(st.binary(max_size=64))


client_flags = st.one_of(
    st.just(wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)),
    st.just(wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE)),
    st.builds(wire.CLIENT_FLAGS.pack, U32),
)


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos = [], 0
    for n in sizes:
        if pos >= len(data):
            break
        out.append(data[pos : pos + n])
        pos += n
    if pos < len(data):
        out.append(data[pos:])
    return out


def _check_limits(conn: ServerConnection) -> None:
    """What the connection is waiting for must stay under the documented limits."""
    tx = conn.transmission
    if tx is None:
        buf = conn.handshake.buffer
        if conn.handshake.state is State.OPTIONS and len(buf) >= wire.OPTION.size:
            _, _, length = wire.OPTION.unpack_from(buf.buf, buf.pos)
            assert length <= MAX_OPTION_LENGTH
            assert len(buf) < wire.OPTION.size + MAX_OPTION_LENGTH
        return
    if tx._skip:  # discarding an oversized WRITE: nothing may pile up
        assert len(tx.buffer) == 0
        return
    assert tx.pending_payload() <= MAX_PAYLOAD_SERVED
    assert len(tx.buffer) < wire.REQUEST.size + MAX_PAYLOAD_SERVED


def _check_command(ev: Command) -> None:
    assert 0 <= ev.flags < 2**16 and 0 <= ev.cookie < 2**64
    assert 0 <= ev.offset < 2**64 and 0 <= ev.length < 2**32
    if isinstance(ev, WriteCmd):
        if ev.data is None:
            assert ev.length > MAX_PAYLOAD_SERVED
        else:
            assert len(ev.data) == ev.length
    elif isinstance(ev, UnknownCmd):
        assert ev.type not in {int(c) for c in Cmd}


@SETTINGS
@given(
    cflags=client_flags,
    options=st.lists(option_frame, max_size=8),
    requests=st.lists(request_frame(), max_size=12),
    garbage=st.binary(max_size=40),
    sizes=st.lists(st.integers(1, 200), max_size=30),
    tls=st.sampled_from(list(TLSMode)),
    straight_to_transmission=st.booleans(),
    structured=st.booleans(),
)
def test_server_survives_arbitrary_bytes(
    cflags: bytes,
    options: list[bytes],
    requests: list[bytes],
    garbage: bytes,
    sizes: list[int],
    tls: TLSMode,
    straight_to_transmission: bool,
    structured: bool,
) -> None:
    conn = ServerConnection(default_catalog(), tls=tls if not straight_to_transmission else TLSMode.NONE)
    conn.data_to_send()
    if straight_to_transmission:  # spend the examples on request parsing
        cflags = wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
        options = [wire.option(Opt.STRUCTURED_REPLY)] if structured else []
        options.append(wire.option(Opt.GO, option_payload_info("disk")))
    stream = cflags + b"".join(options) + b"".join(requests) + garbage
    try:
        for chunk in _chunks(stream, sizes):
            conn.receive_data(chunk)
            while True:
                ev = conn.next_event()
                if ev is None:
                    _check_limits(conn)
                    break
                event(type(ev).__name__)
                if isinstance(ev, Aborted) or (isinstance(ev, AccessDenied) and ev.closed):
                    return  # the adapter closes the connection here
                if isinstance(ev, StartTLS):
                    conn.handshake.tls_started()  # pretend the upgrade happened
                elif isinstance(ev, Command):
                    _check_command(ev)
                else:
                    assert isinstance(ev, Negotiated | OptionRefused | AccessDenied)
                    if isinstance(ev, AccessDenied):
                        assert ev.export == "secret"  # the only export the catalog refuses
                if conn.transmission is None:
                    conn.data_to_send()
    except ProtocolError as e:
        event(f"closed: {type(e).__name__}")


# ---------------------------------------------------------------- request/reply round trips


@dataclass(frozen=True)
class Req:
    cmd: Cmd
    offset: int
    length: int
    flags: int
    data: bytes | None


req_strategy = st.one_of(
    st.builds(lambda o, d, f: Req(Cmd.WRITE, o, len(d), f, d), U64, st.binary(max_size=300), U16),
    # large enough to be received into its own buffer
    st.builds(
        lambda n, b: Req(Cmd.WRITE, 0, n, 0, bytes([b]) * n),
        st.integers(64 * 1024, 200 * 1024),
        st.integers(0, 255),
    ),
    st.builds(
        Req,
        st.sampled_from([Cmd.READ, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS, Cmd.FLUSH]),
        U64,
        st.integers(0, 2**32 - 1),
        U16,
        st.none(),
    ),
)

_CLS = {
    Cmd.READ: ReadCmd,
    Cmd.WRITE: WriteCmd,
    Cmd.FLUSH: FlushCmd,
    Cmd.TRIM: TrimCmd,
    Cmd.CACHE: CacheCmd,
    Cmd.WRITE_ZEROES: WriteZeroesCmd,
    Cmd.BLOCK_STATUS: BlockStatusCmd,
    Cmd.DISC: DiscCmd,
}


@SETTINGS
@given(
    reqs=st.lists(req_strategy, max_size=20),
    disc=st.booleans(),
    sizes=st.lists(st.integers(1, 70000), max_size=40),
    via_get_buffer=st.booleans(),
)
def test_requests_round_trip(reqs: list[Req], disc: bool, sizes: list[int], via_get_buffer: bool) -> None:
    client = ClientTransmission(structured=True)
    server = ServerTransmission(structured=True)
    stream = b""
    expected: list[Command] = []
    for r in reqs + ([Req(Cmd.DISC, 0, 0, 0, None)] if disc else []):
        cookie, out = client.request(r.cmd, r.offset, r.length, r.data, r.flags)
        stream += b"".join(out)
        if r.cmd == Cmd.WRITE:
            expected.append(WriteCmd(cookie, r.flags, r.offset, r.length, r.data))
        else:
            expected.append(_CLS[r.cmd](cookie, r.flags, r.offset, r.length))
    got: list[Command] = []
    for chunk in _chunks(stream, sizes):
        if via_get_buffer:  # as asyncio's BufferedProtocol delivers
            pos = 0
            while pos < len(chunk):
                view = server.get_buffer(-1)
                n = min(len(view), len(chunk) - pos)
                assert n > 0
                view[:n] = chunk[pos : pos + n]
                del view
                server.buffer_updated(n)
                pos += n
                while (ev := server.next_event()) is not None:
                    got.append(ev)
        else:
            server.receive_data(chunk)
        while (ev := server.next_event()) is not None:
            got.append(ev)
    assert got == expected
    assert len(server.buffer) == 0
    assert client.in_flight == len(reqs)


@st.composite
def segments(draw: st.DrawFn, offset: int, length: int) -> list[tuple[int, int, bytes | None]]:
    """A partition of [offset, offset+length) into data and hole segments."""
    out: list[tuple[int, int, bytes | None]] = []
    pos, end = offset, offset + length
    while pos < end:
        n = draw(st.integers(1, end - pos))
        data = None if draw(st.booleans()) else draw(st.binary(min_size=n, max_size=n))
        out.append((pos, n, data))
        pos += n
    return out


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[bool, list[tuple[Cmd, int, int, str, object]]]:
    structured = draw(st.booleans())
    kinds = [Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM] + ([Cmd.BLOCK_STATUS] if structured else [])
    out: list[tuple[Cmd, int, int, str, object]] = []
    for _ in range(draw(st.integers(0, 12))):
        cmd = draw(st.sampled_from(kinds))
        offset = draw(st.integers(0, 2**40))
        length = draw(st.integers(0, 600))
        outcome = draw(st.sampled_from(["ok", "error"]))
        detail: object = None
        if outcome == "error":
            detail = draw(st.sampled_from([e for e in Errno if e != Errno.OK]))
        elif cmd == Cmd.READ:
            detail = draw(segments(offset, length))
        elif cmd == Cmd.BLOCK_STATUS:
            detail = draw(
                st.dictionaries(
                    st.integers(0, 5),
                    st.lists(st.tuples(st.integers(1, 2**32 - 1), st.integers(0, 3)), min_size=1, max_size=4),
                    min_size=1,
                    max_size=2,
                )
            )
        out.append((cmd, offset, length, outcome, detail))
    return structured, out


@SETTINGS
@given(ex=exchanges(), data=st.data())
def test_replies_round_trip_in_any_order(
    ex: tuple[bool, list[tuple[Cmd, int, int, str, object]]], data: st.DataObject
) -> None:
    structured, items = ex
    client = ClientTransmission(structured=structured)
    server = ServerTransmission(structured=structured)
    replies: list[bytes] = []
    expect: dict[int, tuple[int, bytes | None, object]] = {}
    for cmd, offset, length, outcome, detail in items:
        payload = bytes(length) if cmd == Cmd.WRITE else None
        cookie, _ = client.request(cmd, offset, length, payload)
        if outcome == "error":
            assert isinstance(detail, Errno)
            replies.append(server.error(cookie, detail, "failed"))
            expect[cookie] = (int(detail), None, None)
        elif cmd == Cmd.READ:
            assert isinstance(detail, list)
            content = b"".join(bytes(n) if d is None else d for _, n, d in detail)
            raw = server.read_segments(cookie, detail) if detail else [server.read_empty(cookie)]
            replies.append(b"".join(bytes(b) for b in raw))
            expect[cookie] = (0, content, None)
        elif cmd == Cmd.BLOCK_STATUS:
            assert isinstance(detail, dict)
            replies.append(server.block_status(cookie, detail))
            ext = {cid: tuple(Extent(ln, fl) for ln, fl in e) for cid, e in detail.items()}
            expect[cookie] = (0, None, ext)
        else:
            replies.append(server.ok(cookie))
            expect[cookie] = (0, None, None)
    order = data.draw(st.permutations(replies))
    sizes = data.draw(st.lists(st.integers(1, 200), max_size=60))
    got = {}
    for chunk in _chunks(b"".join(order), sizes):
        client.receive_data(chunk)
        while (ev := client.next_event()) is not None:
            assert ev.cookie not in got
            got[ev.cookie] = ev
    assert set(got) == set(expect)
    for cookie, (err, content, ext) in expect.items():
        r = got[cookie]
        assert r.error == err
        assert r.data == content
        if ext is not None:
            assert r.extents == ext
    assert client.in_flight == 0


# ---------------------------------------------------------------- MemoryNode vs a bytearray


SIZE = 64 * 1024
offsets = st.integers(0, SIZE + 4096)
lengths = st.integers(0, 12 * 1024)
model_op = st.one_of(
    st.tuples(st.just("write"), offsets, st.binary(min_size=0, max_size=9000), st.booleans()),
    st.tuples(st.just("zero"), offsets, lengths, st.booleans()),
    st.tuples(st.just("trim"), offsets, lengths, st.booleans()),
    st.tuples(st.just("read"), offsets, lengths, st.booleans()),
    st.tuples(st.just("status"), offsets, lengths, st.booleans()),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.booleans()),
    st.tuples(st.just("cache"), offsets, lengths, st.booleans()),
)


async def _run_model(structured: bool, fast: bool, ops: list[tuple[str, int, object, bool]]) -> None:
    pair = NbdPair()
    pair.negotiate("disk", structured=structured)
    node = MemoryNode(SIZE)
    disp = make_dispatcher(pair, node, SIZE)
    model = bytearray(SIZE)
    for name, offset, arg, flag in ops:
        if name == "write":
            assert isinstance(arg, bytes)
            r = await execute(
                pair, disp, Cmd.WRITE, offset, data=arg, flags=CmdFlag.FUA if flag else 0, fast_path=fast
            )
            if offset + len(arg) > SIZE:
                assert r.error == Errno.ENOSPC
            else:
                assert r.error == 0
                model[offset : offset + len(arg)] = arg
            continue
        assert isinstance(arg, int)
        end = offset + arg
        if name in ("zero", "trim"):
            cmd = Cmd.WRITE_ZEROES if name == "zero" else Cmd.TRIM
            flags = CmdFlag.NO_HOLE if flag and name == "zero" else 0
            r = await execute(pair, disp, cmd, offset, arg, flags=flags)
            if end > SIZE:
                assert r.error == (Errno.ENOSPC if name == "zero" else Errno.EINVAL)
            else:
                assert r.error == 0
                model[offset:end] = bytes(arg)
        elif name == "read":
            df = CmdFlag.DF if flag and structured else 0
            r = await execute(pair, disp, Cmd.READ, offset, arg, flags=df, fast_path=fast)
            if end > SIZE:
                assert r.error == Errno.EINVAL and r.data is None
            else:
                assert r.error == 0
                assert r.data == bytes(model[offset:end])
        elif name == "status":
            r = await execute(pair, disp, Cmd.BLOCK_STATUS, offset, arg, flags=CmdFlag.REQ_ONE if flag else 0)
            if not structured:
                assert r.error == Errno.EINVAL  # no context can be negotiated without SR
                continue
            if end > SIZE or arg == 0:
                assert r.error == Errno.EINVAL
                continue
            assert r.error == 0 and r.extents is not None
            [extents] = r.extents.values()
            assert extents
            if flag:
                assert len(extents) == 1 and extents[0].length <= arg
            pos = offset
            for i, e in enumerate(extents):
                assert e.length > 0
                assert e.flags & ~(HOLE | ZERO) == 0
                if i < len(extents) - 1:
                    assert pos + e.length < end
                stop = min(pos + e.length, SIZE)
                assert pos + e.length <= SIZE
                if e.flags & ZERO:
                    assert model[pos:stop] == bytes(stop - pos)
                pos += e.length
            assert flag or pos >= end
        elif name == "flush":
            before = node.flushes
            r = await execute(pair, disp, Cmd.FLUSH)
            assert r.error == 0 and node.flushes == before + 1
        elif name == "cache":
            r = await execute(pair, disp, Cmd.CACHE, offset, arg)
            assert r.error == (Errno.EINVAL if end > SIZE else 0)
    assert bytes(node.data) == bytes(model)
    r = await execute(pair, disp, Cmd.READ, 0, SIZE)
    assert r.data == bytes(model)


@SETTINGS
@given(structured=st.booleans(), fast=st.booleans(), ops=st.lists(model_op, max_size=25))
def test_memory_node_matches_bytearray_model(
    structured: bool, fast: bool, ops: list[tuple[str, int, object, bool]]
) -> None:
    asyncio.run(_run_model(structured, fast, ops))


# ---------------------------------------------------------------- ReceiveBuffer vs bytes

buffer_op = st.one_of(
    st.tuples(st.just("feed"), st.binary(max_size=3000)),
    st.tuples(st.just("recv"), st.integers(-1, 300_000), st.integers(0, 70_000)),
    st.tuples(st.just("take"), st.integers(0, 4000)),
    st.tuples(st.just("skip"), st.integers(0, 4000)),
    st.tuples(st.just("take_into"), st.integers(0, 4000)),
    st.tuples(st.just("shrink"), st.just(0)),
)


@SETTINGS
@given(ops=st.lists(buffer_op, max_size=40), capacity=st.integers(1, 70_000))
def test_receive_buffer_matches_a_bytes_model(ops: list[tuple[object, ...]], capacity: int) -> None:
    buf = ReceiveBuffer(capacity)
    model = bytearray()
    counter = 0
    for op in ops:
        name = op[0]
        cap_before, len_before = len(buf.buf), len(buf)
        need = 0
        if name == "feed":
            data = op[1]
            assert isinstance(data, bytes)
            buf.feed(data)
            model += data
            need = len(data)
        elif name == "recv":
            hint, n = op[1], op[2]
            assert isinstance(hint, int) and isinstance(n, int)
            view = buf.get_buffer(hint)
            need = max(hint, MIN_FREE)
            assert len(view) >= need
            k = min(n, len(view))
            chunk = bytes((counter + i) % 251 for i in range(k))
            counter += k
            view[:k] = chunk
            del view
            buf.buffer_updated(k)
            model += chunk
        elif name in ("take", "take_into"):
            n = min(int(op[1]), len(model))  # type: ignore[call-overload]
            if name == "take":
                assert buf.take(n) == bytes(model[:n])
            else:
                dest = bytearray(n + 3)
                buf.take_into(dest, n)
                assert dest[:n] == model[:n]
            del model[:n]
        elif name == "skip":
            n = int(op[1])  # type: ignore[call-overload]
            assert buf.skip(n) == min(n, len(model))
            del model[: min(n, len(model))]
        else:
            buf.shrink()
        assert len(buf) == len(model)
        assert bytes(buf.buf[buf.pos : buf.end]) == bytes(model)
        # memory: grows only to what is buffered plus what was asked for
        assert len(buf.buf) <= max(cap_before, INITIAL_CAPACITY if name == "shrink" else 0, len_before + need)
