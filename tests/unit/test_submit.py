"""Requests started by submission (BlockNode.read_submit/write_submit): the dispatcher answers
them through `deliver` when the node's callback runs, the export's gate counts them in
flight, and a node that cannot start one sends the request the awaited way."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

import pytest

from blockvirt.nbd.constants import BASE_ALLOCATION, Errno
from blockvirt.nbd.events import Command, ExportInfo, ReadCmd, WriteCmd
from blockvirt.nbd.handshake import transmission_flags
from blockvirt.nbd.transmission import ServerTransmission
from blockvirt.server.dispatch import SUBMITTED, Dispatcher, Out
from blockvirt.storage.backend import VolumeRecord
from blockvirt.storage.drivers.memory import MemoryNode
from blockvirt.storage.export import Export
from blockvirt.storage.node import Buffer, ReadDone, StorageError, WriteDone

SIZE = 1 << 20


class SubmittingNode(MemoryNode):
    """A MemoryNode whose reads and writes end on a later loop turn, as librbd's do."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.accept = True
        self.fail: StorageError | None = None
        self.started = 0
        #: Writes' completions kept back until the test runs them (None: the next turn).
        self.held: list[Callable[[], None]] | None = None

    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        return None  # nothing completes inline, as on an RBD pool

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        return False

    def read_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        if not self.accept:
            return False
        self.started += 1
        data = bytes(self.data[offset : offset + length])
        err = self.fail
        asyncio.get_running_loop().call_soon(done, None if err else data, err)
        return True

    def write_submit(self, offset: int, data: Buffer, done: WriteDone) -> bool:
        if not self.accept:
            return False
        self.started += 1
        err = self.fail
        if err is None:
            self.data[offset : offset + len(data)] = data
        if self.held is not None:
            self.held.append(lambda: done(err))
        else:
            asyncio.get_running_loop().call_soon(done, err)
        return True


def make(node: SubmittingNode) -> tuple[Dispatcher, list[tuple[Out, Command]], ServerTransmission]:
    tx = ServerTransmission(False)
    tflags = transmission_flags(ExportInfo("x", SIZE), structured=False)
    d = Dispatcher(node, SIZE, tflags, tx, {1: BASE_ALLOCATION})
    delivered: list[tuple[Out, Command]] = []
    d.deliver = lambda out, cmd: delivered.append((out, cmd))
    return d, delivered, tx


def reply_errno(out: Out) -> int:
    head = b"".join(bytes(b) for b in out)
    return int.from_bytes(head[4:8], "big")


async def turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_write_then_a_read_are_answered_by_callback() -> None:
    node = SubmittingNode(SIZE)
    d, delivered, _ = make(node)
    w = WriteCmd(7, 0, 4096, 4096, b"w" * 4096)
    assert d.serve_inline(w) is SUBMITTED
    assert delivered == [] and not d.unflushed  # nothing is answered before the node says
    await turn()
    assert len(delivered) == 1 and delivered[0][1] is w and reply_errno(delivered[0][0]) == 0
    assert d.unflushed  # a completed write awaits a flush
    r = ReadCmd(8, 0, 4096, 4096)
    assert d.serve_inline(r) is SUBMITTED
    await turn()
    out, cmd = delivered[1]
    assert cmd is r and reply_errno(out) == 0
    assert b"".join(bytes(b) for b in out).endswith(b"w" * 4096)
    assert d.stats.read_bytes == 4096 and d.stats.write_bytes == 4096
    assert node.started == 2


async def test_a_failed_op_gets_an_error_reply_and_is_counted() -> None:
    node = SubmittingNode(SIZE)
    d, delivered, _ = make(node)
    node.fail = StorageError(errno.EIO, "the cluster went away")
    assert d.serve_inline(WriteCmd(1, 0, 0, 512, b"x" * 512)) is SUBMITTED
    assert d.serve_inline(ReadCmd(2, 0, 0, 512)) is SUBMITTED
    await turn()
    assert [reply_errno(out) for out, _ in delivered] == [Errno.EIO, Errno.EIO]
    assert d.stats.errors == 2
    assert not d.unflushed


async def test_a_node_that_cannot_start_sends_the_request_the_awaited_way() -> None:
    node = SubmittingNode(SIZE)
    node.accept = False
    d, delivered, _ = make(node)
    w = WriteCmd(1, 0, 0, 512, b"y" * 512)
    assert d.serve_inline(w) is None  # the session runs it as a task
    assert reply_errno(await d.run(w)) == 0 and bytes(node.data[:512]) == b"y" * 512
    assert delivered == []


async def test_without_deliver_nothing_is_submitted() -> None:
    node = SubmittingNode(SIZE)
    d, _, _ = make(node)
    d.deliver = None  # a dispatcher no session answers for (the golden harness, tests)
    assert d.serve_inline(ReadCmd(1, 0, 0, 512)) is None
    assert node.started == 0


def _export(node: SubmittingNode) -> Export:
    rec = VolumeRecord(name="v", size=SIZE, thick=False, pool="p", created=0.0)
    return Export(rec, node)


async def test_the_gate_counts_submitted_ops_and_holds_them_while_drained() -> None:
    node = SubmittingNode(SIZE)
    node.held = []
    export = _export(node)
    ended: list[StorageError | None] = []
    assert export.write_submit(0, b"a" * 512, ended.append)
    drained = asyncio.Event()

    async def edit() -> None:
        async with export.drained():
            drained.set()
            # While drained, nothing starts: the request would await the gate instead.
            assert not export.write_submit(0, b"b" * 512, ended.append)
            assert not export.read_submit(0, 512, lambda data, err: None)

    task = asyncio.create_task(edit())
    await turn()
    assert not drained.is_set()  # the write is still in flight: the drain waits for it
    node.held.pop()()
    await task
    assert ended == [None] and drained.is_set()
    assert bytes(node.data[:512]) == b"a" * 512


async def test_a_filter_below_the_gate_stops_submission() -> None:
    from blockvirt.storage.node import FilterNode

    node = SubmittingNode(SIZE)
    export = _export(node)
    async with export.drained():
        export.insert(FilterNode(node))
    # A filter that does not say otherwise sees every write (mirrors, change tracking).
    assert not export.write_submit(0, b"c" * 512, lambda err: None)
    assert node.started == 0


@pytest.mark.parametrize("length", [0])
async def test_empty_reads_are_not_submitted(length: int) -> None:
    node = SubmittingNode(SIZE)
    d, _, _ = make(node)
    assert d.serve_inline(ReadCmd(1, 0, 0, length)) is not SUBMITTED
