"""Copying data between block nodes of any backends, and mirroring a live head's changes.

Used by migrations between kinds of storage (a file pool and an RBD pool): the data is read
through the source node (its block status tells data from holes, so holes stay holes) and
written through the target node. `NodeReplica` is the replica of a mirror filter over the
source head: a pass copies chunk after chunk while every guest change to a chunk already
copied is copied again before the guest's request completes (active mirroring), so the pass
converges whatever the write rate (see docs/migration.md).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable

from blockvirt.storage.node import HOLE, ZERO, BlockNode, StorageError

log = logging.getLogger("blockvirt.transfer")

#: Unit of the copy pass, of its locks and of the dirty set.
CHUNK = 1 << 20
#: A target that fails this many times in a row ends the move (the source stays authoritative).
MAX_TARGET_FAILURES = 5
#: How long a guest's request waits for its mirrored copy. A target that takes longer (an RBD
#: pool whose cluster stopped answering fails a write only after its op timeout, 30 s) is not
#: the guest's problem: its chunk is left to the pass, and mirroring stops until the pass
#: copies a chunk again.
MIRROR_WAIT = 1.0

#: A pause before copying n bytes (rate limit, QoS background admission).
Throttle = Callable[[int], Awaitable[None]]


async def copy_range(src: BlockNode, dst: BlockNode, offset: int, length: int) -> int:
    """Make dst's bytes [offset, offset + length) those of src; holes and zeros become zeros
    (space given back where dst can). Returns the bytes of data written."""
    written = 0
    end = offset + length
    pos = offset
    while pos < end:
        extents = await src.block_status(pos, end - pos)
        if not extents:
            raise StorageError(errno.EIO, "block status answered nothing")
        for n, flags in extents:
            n = min(n, end - pos)
            if n <= 0:
                break
            if flags & ZERO:
                await dst.zero(pos, n, may_trim=bool(flags & HOLE))
            else:
                done = 0
                while done < n:
                    piece = min(CHUNK, n - done)
                    await dst.write(pos + done, await src.read(pos + done, piece))
                    done += piece
                written += n
            pos += n
            if pos >= end:
                break
    return written


def chunks_of(extents: list[tuple[int, int]]) -> set[int]:
    """The chunks (index = offset // CHUNK) that byte ranges touch."""
    out: set[int] = set()
    for off, n in extents:
        if n > 0:
            out.update(range(off // CHUNK, (off + n - 1) // CHUNK + 1))
    return out


class NodeReplica:
    """Copies a live head (the source node) into a target node while guests write to it."""

    def __init__(
        self, source: BlockNode, target: BlockNode, dirty: set[int], *, mirror_wait: float = MIRROR_WAIT
    ) -> None:
        self.source = source
        self.target = target
        #: Chunks the pass has yet to copy.
        self.dirty = dirty
        self._locks: dict[int, asyncio.Future[None]] = {}
        self.failures = 0
        self.error: BaseException | None = None
        self.mirrored_writes = 0
        self.mirror_wait = mirror_wait
        #: The target failed or stalled, and the pass has not copied a chunk since: guest
        #: changes only mark their chunks dirty, and guests never wait for the target.
        self.degraded = False
        #: Times a mirrored copy outlasted mirror_wait (the guest went on without it).
        self.stalls = 0

    @property
    def clean(self) -> bool:
        return not self.dirty and not self._locks

    def _span(self, chunk: int) -> tuple[int, int]:
        start = chunk * CHUNK
        return start, max(0, min(CHUNK, self.source.size - start))

    def _lock(self, chunk: int) -> asyncio.Future[None]:
        """Lock a chunk at once (not at a task's first step: a second change of the chunk in
        the same turn must find it locked, or two copies of it could land out of order)."""
        fut = asyncio.get_running_loop().create_future()
        self._locks[chunk] = fut
        return fut

    async def _copy_locked(self, chunk: int, fut: asyncio.Future[None], offset: int, length: int) -> int:
        try:
            return await copy_range(self.source, self.target, offset, length)
        finally:
            del self._locks[chunk]
            fut.set_result(None)

    async def copy_chunk(self, chunk: int) -> int:
        """The pass: copy one dirty chunk (waits if a mirrored change holds it)."""
        while (lock := self._locks.get(chunk)) is not None:
            await asyncio.shield(lock)
        if chunk not in self.dirty:
            return 0
        # Clean from the moment its copy starts: a guest change during the copy (degraded
        # mirroring does not wait for the lock) marks it dirty again, and that mark stays.
        self.dirty.discard(chunk)
        start, n = self._span(chunk)
        try:
            copied = await self._copy_locked(chunk, self._lock(chunk), start, n) if n else 0
        except (OSError, StorageError) as e:
            self.dirty.add(chunk)
            self.degraded = True  # guests would meet the same target: they stop mirroring
            self._failed(e)
            raise
        self.failures = 0
        self.degraded = False  # the target answers again: mirror again
        return copied

    async def changed(self, offset: int, length: int, fua: bool) -> None:
        """A guest changed [offset, offset + length) of the source (Replica)."""
        for chunk in range(offset // CHUNK, (offset + max(length, 1) - 1) // CHUNK + 1):
            if self.degraded:
                self.dirty.add(chunk)  # the pass reads our change when it copies the chunk
                continue
            while (lock := self._locks.get(chunk)) is not None:
                await asyncio.shield(lock)  # being copied: mirror our part once it is done
            if chunk in self.dirty:
                continue  # the pass has yet to copy it, and will read our change then
            start, n = self._span(chunk)
            lo, hi = max(offset, start), min(offset + length, start + n)
            if hi <= lo:
                continue
            copy = self._copy_locked(chunk, self._lock(chunk), lo, hi - lo)
            if not await self._bounded(copy, chunk):
                continue
            self.mirrored_writes += 1
        if fua:
            await self.flush()

    async def flush(self) -> None:
        """After a guest FLUSH or FUA: the target too, as far as it answers in time. Not
        needed for safety (the switch flushes the target under its drain before promoting
        it), so a degraded or slow target is not waited for."""
        if not self.degraded:
            await self._bounded(self.target.flush(), None)

    async def _bounded(self, op: Awaitable[object], chunk: int | None) -> bool:
        """Run a copy (or flush) for a guest, waiting at most mirror_wait. False if it
        failed or is still running: then its chunk is dirty and mirroring degraded."""
        task = asyncio.ensure_future(op)
        try:
            await asyncio.wait({task}, timeout=self.mirror_wait)  # never cancels the copy
        finally:
            if not task.done():  # timed out, or the guest's request was cancelled
                task.add_done_callback(self._late)
        if not task.done():
            self.stalls += 1  # it goes on, holding its chunk's lock: the pass copies after it
        elif (e := task.exception()) is None:
            return True
        elif isinstance(e, OSError | StorageError):
            self._failed(e)  # never fail the guest: the pass copies it again
        else:
            raise e
        if chunk is not None:
            self.dirty.add(chunk)
        self.degraded = True
        return False

    def _late(self, task: asyncio.Future[object]) -> None:
        """A copy that outlived its guest's wait ended."""
        if task.cancelled():
            return
        e = task.exception()
        if isinstance(e, OSError | StorageError):
            self._failed(e)
        elif e is not None:
            log.error("mirrored copy failed: %r", e)

    def _failed(self, e: BaseException) -> None:
        self.failures += 1
        if self.failures >= MAX_TARGET_FAILURES and self.error is None:
            self.error = e
