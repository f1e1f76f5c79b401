"""Dispatcher: the validation matrix of check(), and run() on a MemoryNode."""

from __future__ import annotations

import asyncio
import errno as host_errno
from collections.abc import Sequence

import pytest

from blockvirt.nbd.constants import (
    BASE_ALLOCATION,
    MAX_PAYLOAD_ADVERTISED,
    MAX_PAYLOAD_SERVED,
    QEMU_ALLOCATION_DEPTH,
    Cmd,
    CmdFlag,
    Errno,
    TransmissionFlag,
)
from blockvirt.nbd.events import (
    BlockStatusCmd,
    CacheCmd,
    Command,
    ExportInfo,
    Extent,
    FlushCmd,
    ReadCmd,
    TrimCmd,
    UnknownCmd,
    WriteCmd,
    WriteZeroesCmd,
)
from blockvirt.nbd.handshake import transmission_flags
from blockvirt.nbd.transmission import ServerTransmission
from blockvirt.server.dispatch import Dispatcher
from blockvirt.storage.drivers.memory import BLOCK, MemoryNode
from blockvirt.storage.node import HOLE, ZERO, StorageError
from tests.helpers import FakeCatalog, NbdPair, execute, make_dispatcher

TF = TransmissionFlag
SIZE = 1 << 20
ALL_FLAGS = transmission_flags(ExportInfo("x", SIZE), structured=True)
CTX = {1: BASE_ALLOCATION}


def disp(
    *,
    tflags: int = ALL_FLAGS,
    size: int = SIZE,
    contexts: dict[int, str] | None = None,
    structured: bool = True,
) -> Dispatcher:
    return Dispatcher(
        MemoryNode(4096), size, tflags, ServerTransmission(structured), CTX if contexts is None else contexts
    )


def errno_of(d: Dispatcher, cmd: Command) -> int:
    err = d.check(cmd)
    return 0 if err is None else int(err.errno)


def W(offset: int, length: int, flags: int = 0, data: bytes | None = b"") -> WriteCmd:
    return WriteCmd(1, flags, offset, length, bytes(length) if data == b"" else data)


# ---------------------------------------------------------------- check(): commands and flags


def test_unknown_command_is_einval() -> None:
    assert errno_of(disp(), UnknownCmd(1, 0, 0, 0, 42)) == Errno.EINVAL
    assert errno_of(disp(), UnknownCmd(1, 0, 0, 0, 8)) == Errno.EINVAL  # RESIZE: not offered


VALID = [
    ReadCmd(1, 0, 0, 512),
    W(0, 512),
    FlushCmd(1, 0, 0, 0),
    TrimCmd(1, 0, 0, 512),
    CacheCmd(1, 0, 0, 512),
    WriteZeroesCmd(1, 0, 0, 512),
    BlockStatusCmd(1, 0, 0, 512),
]


@pytest.mark.parametrize("cmd", VALID, ids=lambda c: type(c).__name__)
def test_valid_commands_pass_and_fua_is_accepted_everywhere(cmd: Command) -> None:
    d = disp()
    assert d.check(cmd) is None
    fua = type(cmd)(**{**_fields(cmd), "flags": int(CmdFlag.FUA)})
    assert d.check(fua) is None


def _fields(cmd: Command) -> dict[str, object]:
    return {k: getattr(cmd, k) for k in cmd.__dataclass_fields__}


@pytest.mark.parametrize(
    ("cmd", "flag"),
    [
        (ReadCmd(1, 0, 0, 512), CmdFlag.REQ_ONE),
        (ReadCmd(1, 0, 0, 512), CmdFlag.NO_HOLE),
        (ReadCmd(1, 0, 0, 512), CmdFlag.FAST_ZERO),
        (W(0, 512), CmdFlag.DF),
        (W(0, 512), CmdFlag.NO_HOLE),
        (W(0, 512), CmdFlag.FAST_ZERO),
        (FlushCmd(1, 0, 0, 0), CmdFlag.NO_HOLE),
        (TrimCmd(1, 0, 0, 512), CmdFlag.NO_HOLE),
        (CacheCmd(1, 0, 0, 512), CmdFlag.DF),
        (WriteZeroesCmd(1, 0, 0, 512), CmdFlag.DF),
        (WriteZeroesCmd(1, 0, 0, 512), CmdFlag.REQ_ONE),
        (BlockStatusCmd(1, 0, 0, 512), CmdFlag.DF),
        (BlockStatusCmd(1, 0, 0, 512), CmdFlag.NO_HOLE),
        (ReadCmd(1, 0, 0, 512), 1 << 5),
        (ReadCmd(1, 0, 0, 512), 1 << 15),
        (W(0, 512), 0x80),
    ],
    ids=repr,
)
def test_flag_on_wrong_command_is_einval(cmd: Command, flag: int) -> None:
    bad = type(cmd)(**{**_fields(cmd), "flags": int(flag)})
    assert errno_of(disp(), bad) == Errno.EINVAL


def test_df_only_when_advertised() -> None:
    read_df = ReadCmd(1, int(CmdFlag.DF), 0, 512)
    assert errno_of(disp(), read_df) == 0
    no_df = transmission_flags(ExportInfo("x", SIZE), structured=False)
    assert not no_df & TF.SEND_DF
    assert errno_of(disp(tflags=no_df, structured=False), read_df) == Errno.EINVAL


def test_fast_zero_only_when_advertised() -> None:
    fz = WriteZeroesCmd(1, int(CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE), 0, 512)
    assert errno_of(disp(), fz) == 0
    tflags = transmission_flags(ExportInfo("x", SIZE, can_fast_zero=False), structured=True)
    assert errno_of(disp(tflags=tflags), fz) == Errno.EINVAL


def test_unknown_flags_checked_before_range() -> None:
    assert errno_of(disp(), ReadCmd(1, 1 << 7, SIZE, 512)) == Errno.EINVAL


# ---------------------------------------------------------------- check(): read-only


RO = transmission_flags(ExportInfo("x", SIZE, read_only=True), structured=True)


@pytest.mark.parametrize(
    "cmd", [W(0, 512), TrimCmd(1, 0, 0, 512), WriteZeroesCmd(1, 0, 0, 512)], ids=lambda c: type(c).__name__
)
def test_read_only_refuses_mutations_with_eperm(cmd: Command) -> None:
    d = disp(tflags=RO)
    assert errno_of(d, cmd) == Errno.EPERM
    assert d.stats.errors == 1


@pytest.mark.parametrize(
    "cmd",
    [ReadCmd(1, 0, 0, 512), FlushCmd(1, 0, 0, 0), CacheCmd(1, 0, 0, 512), BlockStatusCmd(1, 0, 0, 512)],
    ids=lambda c: type(c).__name__,
)
def test_read_only_allows_reads(cmd: Command) -> None:
    assert errno_of(disp(tflags=RO), cmd) == 0


# ---------------------------------------------------------------- check(): ranges


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        (W(SIZE - 511, 512), Errno.ENOSPC),
        (W(SIZE, 1), Errno.ENOSPC),
        (WriteZeroesCmd(1, 0, SIZE - 512, 1024), Errno.ENOSPC),
        (WriteZeroesCmd(1, 0, 2**64 - 1, 2**32 - 1), Errno.ENOSPC),
        (ReadCmd(1, 0, SIZE, 1), Errno.EINVAL),
        (ReadCmd(1, 0, 2**64 - 1, 1), Errno.EINVAL),
        (TrimCmd(1, 0, SIZE - 1, 2), Errno.EINVAL),
        (CacheCmd(1, 0, SIZE + 512, 0), Errno.EINVAL),
        (BlockStatusCmd(1, 0, SIZE, 1), Errno.EINVAL),
        (ReadCmd(1, 0, SIZE + 1, 0), Errno.EINVAL),
    ],
    ids=repr,
)
def test_out_of_range(cmd: Command, expected: Errno) -> None:
    assert errno_of(disp(), cmd) == expected


@pytest.mark.parametrize(
    "cmd",
    [
        W(SIZE - 512, 512),
        ReadCmd(1, 0, SIZE, 0),
        ReadCmd(1, 0, 0, SIZE),
        TrimCmd(1, 0, 0, SIZE),
        WriteZeroesCmd(1, 0, SIZE - 1, 1),
        BlockStatusCmd(1, 0, SIZE - 1, 1),
        W(SIZE, 0),
    ],
    ids=repr,
)
def test_ranges_up_to_the_end_are_fine(cmd: Command) -> None:
    assert errno_of(disp(), cmd) == 0


def test_flush_ignores_offset_and_length() -> None:
    assert errno_of(disp(), FlushCmd(1, 0, 2**64 - 1, 2**32 - 1)) == 0


def test_block_status_without_contexts_is_einval() -> None:
    assert errno_of(disp(contexts={}), BlockStatusCmd(1, 0, 0, 512)) == Errno.EINVAL


def test_block_status_of_empty_range_is_einval() -> None:
    assert errno_of(disp(), BlockStatusCmd(1, 0, 0, 0)) == Errno.EINVAL


def test_oversized_write_payload_is_einval() -> None:
    big = MAX_PAYLOAD_SERVED + 1
    assert errno_of(disp(size=2**40), WriteCmd(1, 0, 0, big, None)) == Errno.EINVAL


def test_oversized_read_is_einval() -> None:
    assert errno_of(disp(size=2**40), ReadCmd(1, 0, 0, MAX_PAYLOAD_SERVED + 1)) == Errno.EINVAL
    assert errno_of(disp(size=2**40), ReadCmd(1, 0, 0, MAX_PAYLOAD_SERVED)) == 0


def test_oversized_df_read_is_eoverflow() -> None:
    d = disp(size=2**40)
    assert errno_of(d, ReadCmd(1, int(CmdFlag.DF), 0, MAX_PAYLOAD_ADVERTISED + 1)) == Errno.EOVERFLOW
    assert errno_of(d, ReadCmd(1, int(CmdFlag.DF), 0, MAX_PAYLOAD_ADVERTISED)) == 0


def test_large_trim_and_zero_are_not_limited_by_payload_size() -> None:
    d = disp(size=2**40)
    assert errno_of(d, TrimCmd(1, 0, 0, 2**32 - 1)) == 0
    assert errno_of(d, WriteZeroesCmd(1, 0, 0, 2**32 - 1)) == 0


async def test_answered_requests_count_ops_bytes_and_errors() -> None:
    pair, d, _ = session()
    await execute(pair, d, Cmd.READ, 0, 100, fast_path=True)
    await execute(pair, d, Cmd.WRITE, 0, data=bytes(50), fast_path=True)
    await execute(pair, d, Cmd.WRITE, 0, data=bytes(30))
    await execute(pair, d, Cmd.FLUSH)
    r = await execute(pair, d, Cmd.READ, SIZE, 100)  # refused by validation: an error, not a read
    assert r.error
    assert d.stats.ops == {"read": 1, "write": 2, "flush": 1}
    assert (d.stats.read_bytes, d.stats.write_bytes, d.stats.errors) == (100, 80, 1)


# ---------------------------------------------------------------- run() on a MemoryNode


def session(
    *,
    structured: bool = True,
    contexts: Sequence[str] = (BASE_ALLOCATION,),
    node: MemoryNode | None = None,
    export: ExportInfo | None = None,
) -> tuple[NbdPair, Dispatcher, MemoryNode]:
    exp = export or ExportInfo("disk", SIZE, contexts=(BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH))
    pair = NbdPair(FakeCatalog(exp))
    pair.negotiate(exp.name, structured=structured, contexts=contexts if structured else ())
    node = node or MemoryNode(exp.size)
    return pair, make_dispatcher(pair, node), node


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("fast", [False, True])
async def test_write_then_read(structured: bool, fast: bool) -> None:
    pair, d, node = session(structured=structured)
    data = bytes(range(256)) * 40
    r = await execute(pair, d, Cmd.WRITE, 1000, data=data, fast_path=fast)
    assert r.error == 0
    assert node.data[1000 : 1000 + len(data)] == data
    r = await execute(pair, d, Cmd.READ, 1000, len(data), fast_path=fast)
    assert r.error == 0 and r.data == data
    assert d.unflushed


async def test_read_df_is_one_data_chunk() -> None:
    pair, d, _ = session()
    r = await execute(pair, d, Cmd.READ, 0, 8192, flags=CmdFlag.DF)
    assert r.error == 0 and r.data == bytes(8192)
    assert r.chunks == (("data", 0, 8192),)


@pytest.mark.parametrize("structured", [False, True])
async def test_zero_length_read(structured: bool) -> None:
    pair, d, _ = session(structured=structured)
    r = await execute(pair, d, Cmd.READ, SIZE, 0, fast_path=True)
    assert r.error == 0 and r.data == b""


async def test_out_of_range_read_structured_is_an_error_chunk() -> None:
    pair, d, _ = session()
    r = await execute(pair, d, Cmd.READ, SIZE - 1, 2)
    assert r.error == Errno.EINVAL and r.data is None
    assert "beyond" in r.message


async def test_fua_write_and_flush() -> None:
    pair, d, node = session()
    r = await execute(pair, d, Cmd.WRITE, 0, data=b"x" * 512, flags=CmdFlag.FUA)
    assert r.error == 0 and not d.unflushed
    await execute(pair, d, Cmd.WRITE, 0, data=b"y" * 512)
    assert d.unflushed
    await execute(pair, d, Cmd.WRITE, 512, data=b"z" * 512, flags=CmdFlag.FUA)
    assert d.unflushed  # the FUA write does not cover the earlier one
    r = await execute(pair, d, Cmd.FLUSH)
    assert r.error == 0 and node.flushes == 1 and not d.unflushed


class GatedFlushNode(MemoryNode):
    """A node whose flush waits for a gate, to interleave other requests with it."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()
        self.flush_started = asyncio.Event()

    async def flush(self) -> None:
        self.flush_started.set()
        await self.gate.wait()
        await super().flush()


async def test_write_completing_during_flush_stays_unflushed() -> None:
    node = GatedFlushNode(SIZE)
    pair, d, _ = session(node=node)
    _, flush = pair.request(Cmd.FLUSH)
    assert d.check(flush) is None
    flushing = asyncio.ensure_future(d.run(flush))
    await node.flush_started.wait()
    await execute(pair, d, Cmd.WRITE, 0, data=b"late" * 128)
    assert d.unflushed
    node.gate.set()
    pair.reply(await flushing)
    # The write finished after the flush started, so the flush need not cover it.
    assert d.unflushed


async def test_write_zeroes_with_and_without_no_hole() -> None:
    pair, d, node = session()
    await execute(pair, d, Cmd.WRITE, 0, data=b"\xff" * (4 * BLOCK))
    r = await execute(pair, d, Cmd.WRITE_ZEROES, 0, 2 * BLOCK, flags=CmdFlag.NO_HOLE)
    assert r.error == 0
    assert node.allocated == {0, 1, 2, 3}
    r = await execute(pair, d, Cmd.WRITE_ZEROES, 2 * BLOCK, 2 * BLOCK)
    assert r.error == 0
    assert node.allocated == {0, 1}
    r = await execute(pair, d, Cmd.READ, 0, 4 * BLOCK)
    assert r.data == bytes(4 * BLOCK)


class SlowZeroNode(MemoryNode):
    async def fast_zero_possible(self) -> bool:
        return False


async def test_fast_zero_not_possible_is_enotsup_and_leaves_data() -> None:
    pair, d, node = session(node=SlowZeroNode(SIZE))
    await execute(pair, d, Cmd.WRITE, 0, data=b"\x01" * 512)
    r = await execute(pair, d, Cmd.WRITE_ZEROES, 0, 512, flags=CmdFlag.FAST_ZERO)
    assert r.error == Errno.ENOTSUP
    assert node.data[:512] == b"\x01" * 512
    r = await execute(pair, d, Cmd.WRITE_ZEROES, 0, 512)
    assert r.error == 0 and node.data[:512] == bytes(512)


async def test_fast_zero_possible_succeeds() -> None:
    pair, d, node = session()
    await execute(pair, d, Cmd.WRITE, 0, data=b"\x01" * 512)
    r = await execute(pair, d, Cmd.WRITE_ZEROES, 0, 512, flags=CmdFlag.FAST_ZERO)
    assert r.error == 0 and node.data[:512] == bytes(512)


async def test_trim_and_cache() -> None:
    pair, d, node = session()
    await execute(pair, d, Cmd.WRITE, 0, data=b"\x02" * (2 * BLOCK))
    assert (await execute(pair, d, Cmd.CACHE, 0, 2 * BLOCK)).error == 0
    assert node.data[: 2 * BLOCK] == b"\x02" * (2 * BLOCK)
    r = await execute(pair, d, Cmd.TRIM, 0, BLOCK)
    assert r.error == 0
    assert node.allocated == {1}
    assert (await execute(pair, d, Cmd.READ, 0, BLOCK)).data == bytes(BLOCK)


async def test_read_only_write_is_eperm_on_the_wire() -> None:
    exp = ExportInfo("ro", SIZE, read_only=True)
    pair, d, node = session(export=exp)
    r = await execute(pair, d, Cmd.WRITE, 0, data=b"nope")
    assert r.error == Errno.EPERM
    assert node.data[:4] == bytes(4)


async def test_unknown_command_and_bad_flags_on_the_wire() -> None:
    pair, d, _ = session(structured=False)
    r = await execute(pair, d, 42)
    assert r.error == Errno.EINVAL
    r = await execute(pair, d, Cmd.READ, 0, 512, flags=CmdFlag.REQ_ONE)
    assert r.error == Errno.EINVAL and r.data is None
    r = await execute(pair, d, Cmd.READ, 0, 4)
    assert r.error == 0 and r.data == bytes(4)  # the connection goes on


# ---------------------------------------------------------------- block status


async def _layout(pair: NbdPair, d: Dispatcher) -> None:
    # blocks: 0 data, 1-2 hole, 3 data, rest hole
    await execute(pair, d, Cmd.WRITE, 0, data=b"a" * BLOCK)
    await execute(pair, d, Cmd.WRITE, 3 * BLOCK, data=b"b" * BLOCK)


async def test_block_status_extents() -> None:
    pair, d, _ = session()
    await _layout(pair, d)
    r = await execute(pair, d, Cmd.BLOCK_STATUS, 0, 6 * BLOCK)
    assert r.error == 0 and r.extents is not None
    [(cid, ext)] = r.extents.items()
    assert pair.negotiated is not None and pair.negotiated.contexts[cid] == BASE_ALLOCATION
    assert ext == (
        Extent(BLOCK, 0),
        Extent(2 * BLOCK, HOLE | ZERO),
        Extent(BLOCK, 0),
        Extent(2 * BLOCK, HOLE | ZERO),
    )


async def test_block_status_req_one() -> None:
    pair, d, _ = session()
    await _layout(pair, d)
    r = await execute(pair, d, Cmd.BLOCK_STATUS, BLOCK, 6 * BLOCK, flags=CmdFlag.REQ_ONE)
    assert r.extents is not None
    assert list(r.extents.values()) == [(Extent(2 * BLOCK, HOLE | ZERO),)]
    # shorter than the first extent: clamped to the request
    r = await execute(pair, d, Cmd.BLOCK_STATUS, BLOCK, 100, flags=CmdFlag.REQ_ONE)
    assert r.extents is not None
    assert list(r.extents.values()) == [(Extent(100, HOLE | ZERO),)]


async def test_block_status_allocation_depth_context() -> None:
    pair, d, _ = session(contexts=(BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH))
    await _layout(pair, d)
    r = await execute(pair, d, Cmd.BLOCK_STATUS, 0, 4 * BLOCK)
    assert pair.negotiated is not None and r.extents is not None
    by_name = {pair.negotiated.contexts[cid]: ext for cid, ext in r.extents.items()}
    assert by_name[QEMU_ALLOCATION_DEPTH] == (Extent(BLOCK, 1), Extent(2 * BLOCK, 0), Extent(BLOCK, 1))
    assert len(by_name[BASE_ALLOCATION]) == 3


async def test_block_status_without_context_on_the_wire() -> None:
    pair, d, _ = session(contexts=())
    r = await execute(pair, d, Cmd.BLOCK_STATUS, 0, 512)
    assert r.error == Errno.EINVAL


class NoExtentsNode(MemoryNode):
    async def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        return []


async def test_block_status_node_answering_nothing_reports_data() -> None:
    pair, d, _ = session(node=NoExtentsNode(SIZE))
    r = await execute(pair, d, Cmd.BLOCK_STATUS, SIZE - 100, 100)
    assert r.extents is not None
    assert list(r.extents.values()) == [(Extent(100, 0),)]


# ---------------------------------------------------------------- storage errors


class FailingNode(MemoryNode):
    def __init__(self, size: int, exc: Exception) -> None:
        super().__init__(size)
        self.exc = exc

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (StorageError(host_errno.ENOSPC, "full"), Errno.ENOSPC),
        (StorageError(host_errno.EDQUOT, "quota"), Errno.ENOSPC),
        (StorageError(host_errno.EIO, "disk"), Errno.EIO),
        (StorageError(host_errno.ENOENT, "gone"), Errno.EIO),
        (OSError(host_errno.EACCES, "denied"), Errno.EPERM),
        (OSError(host_errno.EROFS, "ro fs"), Errno.EPERM),
    ],
    ids=repr,
)
async def test_storage_errors_map_to_nbd_errnos(exc: Exception, expected: Errno) -> None:
    pair, d, _ = session(node=FailingNode(SIZE, exc))
    r = await execute(pair, d, Cmd.WRITE, 0, data=b"x")
    assert r.error == expected
    assert d.stats.errors == 1
    assert not d.unflushed
