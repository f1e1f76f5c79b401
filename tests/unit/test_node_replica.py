"""NodeReplica (migrations between kinds of storage): a target that stalls or fails never
holds a guest's request longer than the mirror wait, and no guest change is lost on the
way to the switch."""

from __future__ import annotations

import asyncio
import time

from blockvirt.storage.drivers.memory import MemoryNode
from blockvirt.storage.node import Buffer, StorageError
from blockvirt.storage.transfer import CHUNK, NodeReplica

SIZE = 4 * CHUNK


class StallingNode(MemoryNode):
    """A target whose writes and flushes hang while `away` is set (a Ceph cluster that
    stopped answering), then fail, as librados fails them at its op timeout."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.away = False
        self.back = asyncio.Event()

    async def _gate(self) -> None:
        if self.away:
            await self.back.wait()
            raise StorageError(5, "write: timed out")

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self._gate()
        await super().write(offset, data, fua)

    async def zero(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        await self._gate()
        await super().zero(offset, length, may_trim, fua)

    async def flush(self) -> None:
        await self._gate()
        await super().flush()


class SlowNode(MemoryNode):
    """A target whose writes take a while: copies of one chunk would overlap."""

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await asyncio.sleep(0.01)
        await super().write(offset, data, fua)


async def guest_write(source: MemoryNode, replica: NodeReplica, offset: int, data: bytes) -> float:
    """What MirrorFilter.write does; returns how long the guest waited."""
    t0 = time.monotonic()
    await source.write(offset, data)
    await replica.changed(offset, len(data), fua=False)
    return time.monotonic() - t0


async def test_a_stalled_target_holds_a_guest_at_most_the_mirror_wait() -> None:
    source, target = MemoryNode(SIZE), StallingNode(SIZE)
    replica = NodeReplica(source, target, set(), mirror_wait=0.2)
    assert await guest_write(source, replica, 0, b"a" * 4096) < 0.1  # mirrored at once
    assert target.data[:4096] == b"a" * 4096 and replica.mirrored_writes == 1

    target.away = True
    waited = await guest_write(source, replica, CHUNK, b"b" * 4096)
    assert 0.15 < waited < 0.5, waited
    assert replica.degraded and replica.stalls == 1 and 1 in replica.dirty
    # Degraded: later changes do not wait at all, whatever chunk they touch (the stalled
    # copy still holds chunk 1's lock), and only mark their chunks dirty.
    for chunk in (0, 1, 2):
        assert await guest_write(source, replica, chunk * CHUNK + 8192, b"c" * 4096) < 0.05
    assert replica.dirty == {0, 1, 2}
    # A guest FLUSH does not wait for the target either.
    t0 = time.monotonic()
    await replica.changed(0, 4096, fua=True)
    assert time.monotonic() - t0 < 0.05
    assert replica.error is None

    # The target answers again: the stalled copy fails (counted), the pass copies every dirty
    # chunk from the source, and mirroring comes back.
    target.away = False
    target.back.set()
    await asyncio.sleep(0)
    for chunk in sorted(replica.dirty):
        await replica.copy_chunk(chunk)
    assert replica.clean and not replica.degraded and replica.failures == 0
    assert target.data == source.data
    assert await guest_write(source, replica, 3 * CHUNK, b"d" * 4096) < 0.1
    assert target.data == source.data and not replica.dirty


async def test_a_change_during_a_degraded_copy_keeps_its_chunk_dirty() -> None:
    # The pass reads the source, then a guest writes the same chunk while the copy is on its
    # way (degraded mirroring does not wait for the chunk's lock): the chunk must stay dirty,
    # or the switch would find the target without that write.
    source, target = MemoryNode(SIZE), MemoryNode(SIZE)
    replica = NodeReplica(source, target, {0}, mirror_wait=0.2)
    replica.degraded = True
    entered, release = asyncio.Event(), asyncio.Event()
    real_write = target.write

    async def slow_write(offset: int, data: Buffer, fua: bool = False) -> None:
        entered.set()
        await release.wait()
        await real_write(offset, data, fua)

    target.write = slow_write  # type: ignore[method-assign]
    await source.write(0, b"x" * 4096)
    copying = asyncio.ensure_future(replica.copy_chunk(0))
    await entered.wait()  # the pass has read the source: "x"
    assert await guest_write(source, replica, 0, b"y" * 4096) < 0.05
    release.set()
    await copying
    assert target.data[:4096] == b"x" * 4096
    assert replica.dirty == {0} and not replica.clean  # copied again before any switch
    target.write = real_write  # type: ignore[method-assign]
    await replica.copy_chunk(0)
    assert target.data[:4096] == b"y" * 4096 and replica.clean


async def test_failing_target_writes_end_the_move_after_five() -> None:
    source, target = MemoryNode(SIZE), StallingNode(SIZE)
    replica = NodeReplica(source, target, {0, 1, 2, 3}, mirror_wait=5.0)
    target.away = True
    target.back.set()  # each write fails at once
    for chunk in range(4):
        try:
            await replica.copy_chunk(chunk)
        except StorageError:
            pass
    assert replica.error is None and replica.failures == 4 and replica.dirty == {0, 1, 2, 3}
    assert await guest_write(source, replica, 0, b"z" * 4096) < 0.1  # the guest never fails
    assert replica.degraded and replica.error is None  # degraded: the guest wrote nothing there
    try:
        await replica.copy_chunk(0)
    except StorageError:
        pass
    assert replica.error is not None  # the fifth failure in a row: the job gives up


async def test_two_changes_of_a_chunk_in_one_turn_are_copied_in_order() -> None:
    # Each mirrored copy runs as a task (so a guest can stop waiting for it); the chunk is
    # locked before that task starts, so the second change waits for the first copy and the
    # target ends with the second.
    source, target = MemoryNode(SIZE), SlowNode(SIZE)
    replica = NodeReplica(source, target, set(), mirror_wait=1.0)
    await source.write(0, b"1" * 4096)
    first = asyncio.ensure_future(replica.changed(0, 4096, fua=False))
    second = asyncio.ensure_future(replica.changed(0, 4096, fua=False))
    await asyncio.gather(first, second)
    assert replica.failures == 0 and not replica.degraded and replica.clean
    assert replica.mirrored_writes == 2 and target.data[:4096] == b"1" * 4096
