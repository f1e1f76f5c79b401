"""The chain node: a volume head (writable) or a snapshot (read-only) served from a chain of
copy-on-write layers (layer.py). A chain is a head layer over its ancestors; the node reads
through a merged index (merged.py), so a read costs the same at any depth.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, Sequence
from time import perf_counter
from typing import Any

from blockvirt.storage import buffers, executor
from blockvirt.storage.backends.cowfile.layer import Layer, WriteGuard, no_small_sync, oserror, timed_pwrite
from blockvirt.storage.backends.cowfile.layer_map import BLOCK, BLOCK_SHIFT, DATA
from blockvirt.storage.backends.cowfile.merged import DEFAULT_BUDGET_PAGES, ZERO_OWNER, MergedIndex
from blockvirt.storage.fileio import VIEW_MIN
from blockvirt.storage.node import (
    HOLE,
    SPARSE_READ_MIN,
    ZERO,
    BlockNode,
    Buffer,
    Capabilities,
    Segment,
    StorageError,
)

#: Writes up to this size are done inline on the loop (a copy into the page cache): handing
#: them to a thread costs more than the copy. See `WriteGuard` for when that stops.
INLINE_WRITE_MAX = 1024 * 1024
#: At most this many bytes are mapped per block-status request (clients ask again).
BLOCK_STATUS_SPAN = 1 << 30


class ChainNode(BlockNode):
    """A volume head (writable) or a snapshot (read-only) served from a chain of layers."""

    def __init__(
        self,
        layers: Sequence[Layer],
        size: int,
        *,
        writable: bool,
        budget_pages: int = DEFAULT_BUDGET_PAGES,
        alloc_unit: int = 0,
    ) -> None:
        assert layers, "a chain has at least its head"
        self.layers = list(layers)
        self._size = size
        self.writable = writable
        self.io = self.layers[0].io
        self.merged = MergedIndex([(lay.slot, lay.map) for lay in self.layers], budget_pages)
        self._fds = {lay.slot: lay.fd for lay in self.layers}
        self._depth = {lay.slot: i + 1 for i, lay in enumerate(self.layers)}
        self._locks: dict[int, asyncio.Future[None]] = {}  # blocks under read-modify-write
        self.guard = WriteGuard()
        self._frozen: list[Layer] = []  # former heads whose final commit is owed
        #: Buffered (non-FUA) writes so far, and how many of them a finished commit of the
        #: head covers: equal, the head's file holds no dirty data but FUA writes' (see _write).
        self._buffered = 0
        self._sync_waiters = 0  # requests in _commit_head
        self._synced = 0
        #: Why the volume is failed (writes refused), or None. See _commit_head.
        self.failed: str | None = None
        self._small_sync = self._only_fua_unsynced  # one bound method, compared by identity
        #: The pool's allocation unit, for a thin head with nothing below it (see _own_head).
        self.alloc_unit = alloc_unit
        if writable:
            self._own_head()

    def _own_head(self) -> None:
        """Hook the writable head up to this chain. Only a base layer (nothing below it) grows
        by allocation units: a delta's size is what its snapshot costs, and padding each
        change to a unit would multiply it."""
        head = self.head
        head.small_sync = self._small_sync
        head.unit = self.alloc_unit if len(self.layers) == 1 and not head.map.all_data else 0

    def _only_fua_unsynced(self) -> bool:
        """The head's file holds no dirty data but FUA writes' (a sync of it is short), and
        one request at most waits for the sync: with more, a sync in a thread lets the loop
        take the next requests meanwhile, which serves a deep queue better than saving the
        hand-over to the thread."""
        return self._buffered == self._synced and self._sync_waiters <= 1

    async def _exec(self, fn: Callable[..., Any], *args: object) -> Any:
        """A blocking call on the threads of the head's pool (a slow pool stalls only its own
        volumes)."""
        return await executor.run_in(self.layers[0].pool_dir, fn, *args)

    # ------------------------------------------------------------ chain
    @property
    def head(self) -> Layer:
        return self.layers[0]

    @property
    def size(self) -> int:
        return self._size

    def set_size(self, size: int) -> None:
        """The head changed under the node (a revert to a snapshot of another size; drained)."""
        self._size = size

    def capabilities(self) -> Capabilities:
        return Capabilities(writable=self.writable)

    def freeze_head(self, new_head: Layer) -> None:
        """Put an empty layer on top (only while drained). The old head's last commit is
        owed: FLUSH makes it (see commit_frozen)."""
        self._frozen.append(self.head)
        self.set_layers([new_head, *self.layers], keep_index=True)

    async def commit_frozen(self) -> None:
        """Commit former heads that still hold uncommitted writes."""
        for lay in list(self._frozen):
            await lay.commit()
            if lay in self._frozen:
                self._frozen.remove(lay)

    def set_layers(self, layers: Sequence[Layer], *, keep_index: bool) -> None:
        """Swap the chain (only while drained). `keep_index` when an empty head was added."""
        self._forget_head()  # a former head's dirty data is not counted here
        self.layers = list(layers)
        if self.writable:
            self._own_head()
        self.merged.set_chain([(lay.slot, lay.map) for lay in self.layers], keep=keep_index)
        self._fds = {lay.slot: lay.fd for lay in self.layers}
        self._depth = {lay.slot: i + 1 for i, lay in enumerate(self.layers)}

    def allocated_bytes(self) -> int:
        return self.head.allocated_bytes()

    # ------------------------------------------------------------ reads
    def _plan(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(fd or -1 for zeros, offset, length) pieces of a read, from the merged index."""
        first = offset >> BLOCK_SHIFT
        last = (offset + length - 1) >> BLOCK_SHIFT
        out: list[tuple[int, int, int]] = []
        end = offset + length
        block = first
        fds = self._fds
        for owner, n in self.merged.runs(first, last - first + 1):
            start = max(block << BLOCK_SHIFT, offset)
            stop = min((block + n) << BLOCK_SHIFT, end)
            out.append((fds[owner] if owner else -1, start, stop - start))
            block += n
        return out

    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        buf = bytearray(length) if length < buffers.MIN_POOLED else buffers.get(length)
        first = offset >> BLOCK_SHIFT
        owner = self.merged.sole_owner(first, ((offset + length - 1) >> BLOCK_SHIFT) - first + 1)
        if owner > 0:  # one layer holds the whole range (the common small read): one call
            return buf if self.io.preadv_nowait(self._fds[owner], buf, offset) else None
        view = memoryview(buf)
        for fd, off, n in self._plan(offset, length):
            part = view[off - offset : off - offset + n]
            if fd < 0:
                buffers.zero(part)
            elif not self.io.preadv_nowait(fd, part, off):
                return None
        return buf

    def read_sparse_nowait(self, offset: int, length: int) -> Sequence[Segment] | None:
        return self._segments_nowait(offset, length, views=False)

    def read_view_nowait(self, offset: int, length: int) -> Sequence[Segment] | None:
        return self._segments_nowait(offset, length, views=True)

    def _segments_nowait(self, offset: int, length: int, *, views: bool) -> Sequence[Segment] | None:
        if length < SPARSE_READ_MIN:
            data = self.read_nowait(offset, length)
            return None if data is None else [(offset, length, data)]
        io = self.io
        out: list[Segment] = []
        for fd, off, n in self._plan(offset, length):
            if fd < 0:
                out.append((off, n, None))
                continue
            # With views, a large cached run goes to the socket straight from the page
            # cache: one copy of the data (into the socket) instead of two.
            view = io.view_nowait(fd, off, n) if views and n >= VIEW_MIN else None
            if view is not None:
                out.append((off, n, view))
                continue
            buf = buffers.get(n)
            if not io.preadv_nowait(fd, memoryview(buf), off):
                return None
            out.append((off, n, buf))
        return out

    def _read_blocking(self, plan: list[tuple[int, int, int]], offset: int, length: int) -> bytearray:
        buf = buffers.get(length)
        view = memoryview(buf)
        for fd, off, n in plan:
            part = view[off - offset : off - offset + n]
            if fd >= 0:
                part[:] = self.io.pread(fd, n, off)
            else:
                buffers.zero(part)
        return buf

    async def read(self, offset: int, length: int) -> Buffer:
        try:
            plan = self._plan(offset, length)
            if self.io.blocking:
                data: bytearray = await self._exec(self._read_blocking, plan, offset, length)
                return data
            return self._read_blocking(plan, offset, length)
        except OSError as e:
            raise oserror(e, "read") from e

    async def read_sparse(self, offset: int, length: int) -> Sequence[Segment]:
        if length < SPARSE_READ_MIN:
            return [(offset, length, await self.read(offset, length))]
        try:
            plan = self._plan(offset, length)
            out: list[Segment] = []
            for fd, off, n in plan:
                if fd < 0:
                    out.append((off, n, None))
                elif self.io.blocking:
                    out.append((off, n, await self._exec(self.io.pread, fd, n, off)))
                else:
                    out.append((off, n, self.io.pread(fd, n, off)))
            return out
        except OSError as e:
            raise oserror(e, "read") from e

    # ------------------------------------------------------------ writes
    def write_nowait(self, offset: int, data: Buffer) -> bool:
        if not self._write_inline(offset, data):
            return False
        self._buffered += 1
        return True

    def write_fua_nowait(self, offset: int, data: Buffer) -> bool:
        """Only while the head's file holds no dirty data but FUA writes' (and no commit is
        waited for): the sync that follows (sync_nowait, or flush) is then short. Otherwise
        the general path picks a write of its own with O_DSYNC semantics (see _write)."""
        if self._buffered != self._synced or self._sync_waiters or not self.writable:
            return False
        return self._write_inline(offset, data)

    def sync_nowait(self) -> bool:
        """Sync the head on the loop if its file holds no dirty data but FUA writes' and
        their block states are journaled already (Layer.commit_nowait); False: sync()."""
        if not self.writable:
            return False
        self._check_failed()
        if self._sync_waiters:  # the rest of the condition is Layer.small_sync's
            return False
        try:
            return self.head.commit_nowait()
        except StorageError as e:
            if e.errno == errno.EIO and self.failed is None:
                self.failed = f"a commit failed ({e}); writes are refused until the volume is reset"
            raise

    def _write_inline(self, offset: int, data: Buffer) -> bool:
        n = len(data)
        if (
            self._locks
            or n > INLINE_WRITE_MAX
            or not n
            or not self.guard.inline
            or self.failed is not None
            or (self.io.faulty and self.io.slow_writes(self.layers[0].fd))
        ):
            return False
        head = self.layers[0]
        first = offset >> BLOCK_SHIFT
        count = ((offset + n - 1) >> BLOCK_SHIFT) - first + 1
        in_place = head.map.all_data_in(first, count)
        if not in_place and (offset | n) & (BLOCK - 1):
            return False  # a partial block not held by the head: read-modify-write (async)
        try:
            t0 = perf_counter()
            if not in_place and n < head.unit:
                head.reserve(offset, n)
            self.io.pwrite(head.fd, data, offset)
            seconds = perf_counter() - t0
        except OSError as e:
            raise oserror(e, "write") from e
        guard = self.guard
        if guard.suspect or seconds > WriteGuard.STALL:  # else the guard has nothing to learn
            guard.note_inline(seconds)
        if not in_place:
            head.map.set_data(first, count)
            self.merged.set_owner(first, count, head.slot)
        return True

    async def _wait_locks(self, first: int, last: int) -> None:
        while True:
            busy = [f for b, f in self._locks.items() if first <= b <= last]
            if not busy:
                return
            await asyncio.wait(busy)

    async def _pwrite(self, fd: int, data: Buffer, offset: int, dsync: bool = False) -> None:
        io = self.io
        if io.blocking and (
            dsync
            or len(data) > INLINE_WRITE_MAX
            or not self.guard.inline
            or (io.faulty and io.slow_writes(fd))
        ):
            seconds = await self._exec(timed_pwrite, self.io, fd, data, offset, dsync)
            if not dsync:
                self.guard.note(seconds)
        else:
            self.guard.note_inline(timed_pwrite(self.io, fd, data, offset, dsync))

    def _reserve(self, head: Layer, offset: int, n: int) -> None:
        """Reserve allocation units for a small write into blocks the head does not hold, if
        the write will run on the loop; one sent to threads (a stalling device) allocates as
        it goes."""
        io = self.io
        if n < head.unit and self.guard.inline and not (io.faulty and io.slow_writes(head.fd)):
            head.reserve(offset, n)

    async def _current_block(self, block: int) -> bytes:
        """The block's contents as the chain reads it now."""
        plan = self._plan(block << BLOCK_SHIFT, BLOCK)
        if self.io.blocking:
            return bytes(await self._exec(self._read_blocking, plan, block << BLOCK_SHIFT, BLOCK))
        return bytes(self._read_blocking(plan, block << BLOCK_SHIFT, BLOCK))

    async def _write(self, offset: int, data: Buffer, fua: bool) -> None:
        """The general write path."""
        n = len(data)
        head = self.head
        first = offset >> BLOCK_SHIFT
        last = (offset + n - 1) >> BLOCK_SHIFT
        count = last - first + 1
        if not fua:
            self._buffered += 1
        await self._wait_locks(first, last)
        if head.map.all_data_in(first, count):
            if fua and (self._buffered == self._synced or not head.states_durable(first, count)):
                # Write to the page cache, then commit (group commit: FUA writes in flight
                # together share one fdatasync). Needed when the blocks' DATA state is not
                # journaled yet (a dsync write alone would not survive a crash); and cheaper
                # than a dsync write of its own per request in a thread when the file holds
                # no other dirty data (qemu's default cache mode makes every write FUA).
                await self._pwrite(head.fd, data, offset)
                await self._commit_head()
            else:  # other writes' dirty data would be synced too: sync just this one
                await self._pwrite(head.fd, data, offset, dsync=fua)
            return
        head_part = offset & (BLOCK - 1)
        tail_part = (offset + n) & (BLOCK - 1)
        rmw = [
            b
            for b, partial in ((first, head_part), (last, tail_part))
            if partial and head.map.state(b) != DATA
        ]
        self._reserve(head, offset, n)
        if not rmw:
            with head.fill(first, count):
                await self._pwrite(head.fd, data, offset)
                head.map.set_data(first, count)
            self.merged.set_owner(first, count, head.slot)
        else:
            rmw = sorted(set(rmw))
            loop = asyncio.get_running_loop()
            mine = {b: loop.create_future() for b in rmw}
            self._locks.update(mine)
            try:
                with head.fill(first, count):
                    blocks = {b: await self._current_block(b) for b in rmw}
                    base = first << BLOCK_SHIFT if first in blocks else offset
                    buf = bytearray()
                    if first in blocks:
                        buf += blocks[first][:head_part]
                    buf += data
                    if last in blocks and tail_part:  # (first == last may be in only for its head)
                        buf += blocks[last][tail_part:]
                    await self._pwrite(head.fd, buf, base)
                    head.map.set_data(first, count)
                self.merged.set_owner(first, count, head.slot)
            finally:
                for b, fut in mine.items():
                    del self._locks[b]
                    fut.set_result(None)
        if fua:
            await self._commit_head()

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if not self.writable:
            raise StorageError(errno.EROFS, "read-only snapshot")
        self._check_failed()
        try:
            if not fua and self.write_nowait(offset, data):
                return
            await self._write(offset, data, fua)
        except OSError as e:
            raise oserror(e, "write") from e

    async def zero(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        if not self.writable:
            raise StorageError(errno.EROFS, "read-only snapshot")
        self._check_failed()
        try:
            await self._zero(offset, length, may_trim)
            if fua:
                await self._commit_head()
        except OSError as e:
            raise oserror(e, "write zeroes") from e

    async def _zero(self, offset: int, length: int, may_trim: bool) -> None:
        end = offset + length
        full_first = -(-offset // BLOCK)
        full_end = end // BLOCK
        if full_first >= full_end:  # inside one block (or two partial ones)
            await self._write(offset, bytes(length), False)
            return
        if offset < full_first * BLOCK:
            await self._write(offset, bytes(full_first * BLOCK - offset), False)
        if end > full_end * BLOCK:
            await self._write(full_end * BLOCK, bytes(end - full_end * BLOCK), False)
        first, count = full_first, full_end - full_first
        self._buffered += 1  # the head's file (its metadata at least) holds unsynced changes
        await self._wait_locks(first, full_end - 1)
        head = self.head
        start, nbytes = first * BLOCK, count * BLOCK
        run: Callable[..., Awaitable[None]] = self._exec if self.io.blocking else _call
        if head.map.all_data:
            await run(self.io.zero_allocated, head.fd, start, nbytes)
        elif not may_trim:
            with head.fill(first, count):
                await run(self.io.zero_allocated, head.fd, start, nbytes)
                head.map.set_data(first, count)
            self.merged.set_owner(first, count, head.slot)
        else:
            await run(self.io.punch, head.fd, start, nbytes)
            if len(self.layers) > 1:
                head.map.set_zero(first, count)  # hide the parents' data
            else:
                head.map.set_unalloc(first, count)
            self.merged.set_owner(first, count, ZERO_OWNER)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.zero(offset, length, may_trim=True, fua=fua)

    async def _commit_head(self) -> None:
        """Commit the head. A commit that fails with EIO marks the volume failed: after a
        failed sync the kernel may have dropped the dirty data (Linux does), so nothing
        written since the last good commit can be promised any more."""
        covered = self._buffered
        self._sync_waiters += 1
        try:
            await self.head.commit()
            if covered > self._synced:
                self._synced = covered
        except StorageError as e:
            if e.errno == errno.EIO and self.failed is None:
                self.failed = f"a commit failed ({e}); writes are refused until the volume is reset"
            raise
        finally:
            self._sync_waiters -= 1

    def _check_failed(self) -> None:
        if self.failed is not None:
            raise StorageError(errno.EIO, f"volume failed: {self.failed}")

    async def flush(self) -> None:
        if not self.writable:
            return
        self._check_failed()
        await self._commit_head()
        if self._frozen:  # writes completed before a snapshot live in the frozen head
            await self.commit_frozen()

    async def cache(self, offset: int, length: int) -> None:
        return None

    # ------------------------------------------------------------ allocation
    def _extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, owner) runs clipped to the request (at most BLOCK_STATUS_SPAN bytes)."""
        length = min(length, BLOCK_STATUS_SPAN, self._size - offset)
        first = offset >> BLOCK_SHIFT
        last = (offset + length - 1) >> BLOCK_SHIFT
        out: list[tuple[int, int]] = []
        block = first
        end = offset + length
        for owner, n in self.merged.runs(first, last - first + 1):
            start = max(block << BLOCK_SHIFT, offset)
            stop = min((block + n) << BLOCK_SHIFT, end)
            out.append((stop - start, owner))
            block += n
        return out

    async def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        return [(n, 0 if owner else HOLE | ZERO) for n, owner in self._extents(offset, length)]

    async def allocation_depth(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        """(length, depth) runs: 1 = the head, 2 = its parent, ...; 0 = nowhere."""
        depth = self._depth
        return [(n, depth.get(owner, 0) if owner else 0) for n, owner in self._extents(offset, length)]

    async def resize(self, new_size: int) -> None:
        """Change the head's size (only while drained; the caller journals and records it).

        Growing exposes blocks the head never held: they must read as zeros, even where an
        older, larger snapshot below holds data (it was cut by an earlier shrink), and even
        where the head's own file still has data from before such a shrink. So the new range
        is punched and marked ZERO over ancestors (UNALLOC elsewhere), and the tail of a
        partial last block is zeroed."""
        old = self._size
        head = self.head
        old_blocks = -(-old // BLOCK)
        new_blocks = -(-new_size // BLOCK)
        run: Callable[..., Awaitable[None]] = self._exec if self.io.blocking else _call
        if new_size > old:
            await run(head.resize_file, new_size)
            head.map.grow(new_blocks)
            count = new_blocks - old_blocks
            if count:
                start, nbytes = old_blocks * BLOCK, count * BLOCK
                if head.map.all_data:
                    await run(self.io.zero_allocated, head.fd, start, nbytes)
                else:
                    await run(self.io.punch, head.fd, start, nbytes)
                    below = max((-(-lay.size // BLOCK) for lay in self.layers[1:]), default=0)
                    zero_end = max(old_blocks, min(new_blocks, below))
                    if zero_end > old_blocks:
                        head.map.set_zero(old_blocks, zero_end - old_blocks)
                    if new_blocks > zero_end:
                        head.map.set_unalloc(zero_end, new_blocks - zero_end)
            self.merged.invalidate(max(old_blocks - 1, 0), count + 1)
            self._size = new_size
            if old % BLOCK:  # bytes past the old end inside its last block
                await self._write(old, bytes(min(new_size, old_blocks * BLOCK) - old), False)
        else:
            head.map.truncate(new_blocks)
            await run(head.resize_file, new_size)
            self.merged.invalidate(max(new_blocks - 1, 0), old_blocks - new_blocks + 1)
            self._size = new_size

    def data_blocks_beyond(self, size: int) -> int:
        """Blocks past `size` that hold data in this node's view (what a shrink would cut)."""
        first = -(-size // BLOCK)
        last = -(-self._size // BLOCK)
        if last <= first:
            return 0
        return sum(n for owner, n in self.merged.runs(first, last - first) if owner)

    async def close(self) -> None:
        """Layers belong to the registry, which closes them when unused; the head forgets
        this node's count of unsynced writes."""
        self._forget_head()

    def _forget_head(self) -> None:
        """The head no longer asks this node whether its file holds only FUA writes."""
        if self.head.small_sync is self._small_sync:
            self.head.small_sync = no_small_sync
            self.head.unit = 0


async def _call(fn: Callable[..., None], *args: object) -> None:
    fn(*args)
