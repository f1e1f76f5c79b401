"""Copy-on-write layers and the chain node that serves a volume (or snapshot) from them.

A layer is two files in its pool: `<id>.data`, sparse, holding block b at offset b*4096
(the host file system allocates space as blocks are written), and `<id>.map`, the journal of
block states (see cow_layout.py). A chain is a head layer over its ancestors; the node reads
through a merged index (merged.py), so a read costs the same at any depth.

Durability is that of a disk with a volatile cache: a write's data goes to the data file
before any metadata that points at it, and metadata reaches the journal only on FLUSH (or
FUA), after an fdatasync of the data. A crash loses at most unflushed writes, and every block
then reads its old or its new contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from blockvirt.storage import buffers, executor
from blockvirt.storage.fileio import FileIO
from blockvirt.storage.formats import cow_layout as layout
from blockvirt.storage.formats.layer_map import BLOCK, BLOCK_SHIFT, CLUSTER_BLOCKS, DATA, LayerMap
from blockvirt.storage.formats.merged import DEFAULT_BUDGET_PAGES, ZERO_OWNER, MergedIndex
from blockvirt.storage.node import HOLE, ZERO, BlockNode, Buffer, Capabilities, Segment, StorageError

if TYPE_CHECKING:
    from blockvirt.jobs.mirror import Mirror

#: Writes up to this size are done inline on the loop (a copy into the page cache): handing
#: them to a thread costs more than the copy. See `WriteGuard` for when that stops.
INLINE_WRITE_MAX = 1024 * 1024
#: Reads at least this large look for zero runs to send as holes.
SPARSE_READ_MIN = 256 * 1024
#: Rewrite the journal as one compact batch once it is this large and mostly superseded.
COMPACT_AT = 8 * 1024 * 1024
#: At most this many bytes are mapped per block-status request (clients ask again).
BLOCK_STATUS_SPAN = 1 << 30


def layer_paths(pool_dir: str, layer_id: str) -> tuple[str, str]:
    return os.path.join(pool_dir, f"{layer_id}.data"), os.path.join(pool_dir, f"{layer_id}.map")


def remove_layer_files(io: FileIO, pool_dir: str, layer_id: str) -> None:
    """Remove a layer's files in one pool directory, and any temp file a write left (blocking;
    missing files are fine)."""
    for path in layer_paths(pool_dir, layer_id):
        io.unlink(path)
        io.unlink(path + ".tmp")


class _Slots:
    """Small integer ids for open layers (the merged index stores these, 2 bytes each)."""

    def __init__(self) -> None:
        self._next = 1
        self._free: list[int] = []

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next > 0xFFFF:
            raise StorageError(errno.EMFILE, "too many open layers")
        self._next += 1
        return self._next - 1

    def give(self, slot: int) -> None:
        self._free.append(slot)


SLOTS = _Slots()


def _oserror(e: OSError, what: str) -> StorageError:
    return StorageError(e.errno or errno.EIO, f"{what}: {e.strerror or e}")


class Layer:
    """One layer: its data file descriptor, its block map and (if writable) its journal."""

    def __init__(
        self,
        layer_id: str,
        pool_dir: str,
        size: int,
        lmap: LayerMap,
        fd: int,
        map_fd: int | None,
        map_end: int,
        seq: int,
        io: FileIO,
    ) -> None:
        self.id = layer_id
        self.pool_dir = pool_dir
        self.size = size
        self.map = lmap
        self.fd = fd
        self.map_fd = map_fd
        self.map_end = map_end
        self.seq = seq
        self.io = io
        self.slot = SLOTS.take()
        self.refs = 0  # chains using this layer (the registry closes it at zero)
        self._flusher = executor.FlushCoalescer(self._commit)
        self._committing = False  # a commit's entries are taken but not yet journaled
        #: (first, count) block ranges guest writes are filling: a stream leaves them alone.
        self.filling: list[tuple[int, int]] = []

    @property
    def writable(self) -> bool:
        return self.map_fd is not None

    # ------------------------------------------------------------ files
    @staticmethod
    def create(io: FileIO, pool_dir: str, layer_id: str, size: int, *, thick: bool = False) -> None:
        """Create an empty layer (blocking). Thick layers preallocate and hold every block."""
        data_path, map_path = layer_paths(pool_dir, layer_id)
        fd = io.open(data_path, write=True, create=True)
        try:
            io.truncate(fd, size)
            if thick and size:
                io.preallocate(fd, size)
            io.fsync(fd)
        finally:
            io.close(fd)
        flags = layout.FLAG_ALL_DATA if thick else 0
        header = layout.Header(flags, BLOCK, bytes.fromhex(layer_id)[:16].ljust(16, b"\0"))
        io.write_file_atomic(map_path, layout.encode_header(header))

    @classmethod
    def open(cls, io: FileIO, pool_dir: str, layer_id: str, size: int, *, writable: bool) -> Layer:
        """Open and replay the journal (blocking). A torn tail is cut off when writable."""
        data_path, map_path = layer_paths(pool_dir, layer_id)
        raw = io.read_file(map_path)
        header = layout.decode_header(raw)
        nblocks = -(-size // BLOCK)
        lmap = LayerMap(nblocks, all_data=header.all_data)
        replay = layout.decode_journal(raw)
        for cluster, data, zero in replay.entries:
            lmap.apply_cluster(cluster, data, zero)
        lmap.clip()
        lmap.dirty.clear()
        # The data file is always opened read-write: a merge may stream into an immutable
        # layer; whether the layer takes guest writes is the chain's business.
        fd = io.open(data_path, write=True)
        map_fd = None
        if writable:
            map_fd = io.open(map_path, write=True)
            if replay.torn:
                io.truncate(map_fd, replay.valid_end)
                io.fsync(map_fd)
        return cls(layer_id, pool_dir, size, lmap, fd, map_fd, replay.valid_end, replay.next_seq, io)

    def close(self) -> None:
        if self.fd >= 0:
            self.io.close(self.fd)
            self.fd = -1
        if self.map_fd is not None:
            self.io.close(self.map_fd)
            self.map_fd = None
        SLOTS.give(self.slot)

    def close_journal(self) -> None:
        """Stop appending (a copy that is complete and committed stays read-only)."""
        if self.map_fd is not None:
            self.io.close(self.map_fd)
            self.map_fd = None

    def open_journal(self) -> None:
        """Start appending to the journal (a merge writing into an immutable layer)."""
        if self.map_fd is None:
            _, map_path = layer_paths(self.pool_dir, self.id)
            self.map_fd = self.io.open(map_path, write=True)

    def allocated_bytes(self) -> int:
        return self.io.allocated(self.fd) if self.fd >= 0 else 0

    def resize_file(self, size: int) -> None:
        """Set the data file's size (blocking): growing keeps it sparse, or preallocates the
        new range for a thick layer; shrinking frees everything past the end."""
        old = self.io.size(self.fd)
        if size > old and self.map.all_data:
            self.io.preallocate(self.fd, size)
        self.io.truncate(self.fd, size)
        self.size = size

    @contextlib.contextmanager
    def fill(self, first: int, count: int) -> Iterator[None]:
        """Around a guest write's pwrite and state change, when it may await in between:
        a stream copying into this layer must not write these blocks meanwhile (its older
        data could land after the guest's)."""
        span = (first, count)
        self.filling.append(span)
        try:
            yield
        finally:
            self.filling.remove(span)

    def states_durable(self, first: int, count: int) -> bool:
        """Whether the journal already holds the states of these blocks (none changed since
        the last commit, and no commit is still writing them)."""
        if self._committing:
            return False
        dirty = self.map.dirty
        return not dirty or not any(
            c in dirty for c in range(first // CLUSTER_BLOCKS, (first + count - 1) // CLUSTER_BLOCKS + 1)
        )

    # ------------------------------------------------------------ commit
    async def commit(self) -> None:
        """Make every completed write durable: data first, then the journal (group commit).

        A cancelled caller (a stopped job, a shutdown) does not cancel the commit: it has
        taken the changed block states, which would be lost, and its file I/O goes on in a
        thread anyway. It runs to the end; the next commit waits for it."""
        await asyncio.shield(self._flusher.flush())

    async def _commit(self) -> None:
        if self.map_fd is None:
            return
        # Taken before the data sync, on the loop: every state change included here belongs
        # to a write whose data the sync below covers.
        entries = self.map.take_dirty()
        compact = None
        if entries and self.map_end > COMPACT_AT:
            live = list(self.map.clusters())
            if len(live) * layout.ENTRY_SIZE * 4 < self.map_end:
                compact = live
        self._committing = True
        try:
            await self._run(self.io.fdatasync, self.fd)
            if compact is not None:
                await self._run(self._compact, compact)
            elif entries:
                await self._run(self._append, entries)
        except OSError as e:
            # Not journaled: keep the entries dirty so the next commit retries them.
            self.map.dirty.update(c for c, _, _ in entries)
            raise _oserror(e, "commit") from e
        finally:
            self._committing = False

    async def _run(self, fn: object, *args: object) -> None:
        if self.io.blocking:
            await executor.run_in(self.pool_dir, fn, *args)  # type: ignore[arg-type]
        else:
            fn(*args)  # type: ignore[operator]

    def _append(self, entries: list[tuple[int, int, int]]) -> None:
        assert self.map_fd is not None
        raw, seq = layout.encode_batches(self.seq, entries)
        self.io.pwrite(self.map_fd, raw, self.map_end)
        self.io.fdatasync(self.map_fd)
        self.map_end += len(raw)
        self.seq = seq

    def _compact(self, live: list[tuple[int, int, int]]) -> None:
        """Replace the journal by one batch of the current state (atomic rename)."""
        assert self.map_fd is not None
        _, map_path = layer_paths(self.pool_dir, self.id)
        header = layout.decode_header(self.io.read_file(map_path)[: layout.HEADER_SIZE])
        raw, seq = layout.encode_batches(self.seq, live)
        self.io.write_file_atomic(map_path, layout.encode_header(header) + raw)
        self.io.close(self.map_fd)
        self.map_fd = self.io.open(map_path, write=True)
        self.map_end = layout.HEADER_SIZE + len(raw)
        self.seq = seq


class WriteGuard:
    """Decides whether buffered writes may run inline on the event loop.

    A page-cache write normally takes microseconds, but the kernel can stall a writer (dirty
    page throttling, a slow disk). One inline write slower than STALL sends every write of
    this node to the thread pool, where only that volume waits; inline writes resume once
    the pool has seen FAST_STREAK quick writes in a row.
    """

    STALL = 0.005
    QUICK = 0.001
    FAST_STREAK = 256

    __slots__ = ("inline", "stalls", "streak")

    def __init__(self) -> None:
        self.inline = True
        self.streak = 0
        self.stalls = 0

    def note(self, seconds: float) -> None:
        if seconds > self.STALL:
            if self.inline:
                self.stalls += 1
            self.inline = False
            self.streak = 0
        elif not self.inline and seconds < self.QUICK:
            self.streak += 1
            if self.streak >= self.FAST_STREAK:
                self.inline = True


def timed_pwrite(io: FileIO, fd: int, data: Buffer, offset: int, dsync: bool) -> float:
    t0 = time.perf_counter()
    io.pwrite(fd, data, offset, dsync=dsync)
    return time.perf_counter() - t0


class ChainNode(BlockNode):
    """A volume head (writable) or a snapshot (read-only) served from a chain of layers."""

    def __init__(
        self,
        layers: Sequence[Layer],
        size: int,
        *,
        writable: bool,
        budget_pages: int = DEFAULT_BUDGET_PAGES,
    ) -> None:
        assert layers, "a chain has at least its head"
        self.layers = list(layers)
        self._size = size
        self.writable = writable
        self.io = self.layers[0].io
        self.merged = MergedIndex([(lay.slot, lay.map) for lay in self.layers], budget_pages)
        self._fds = {lay.slot: lay.fd for lay in self.layers}
        self._depth = {lay.slot: i + 1 for i, lay in enumerate(self.layers)}
        self._paused = False
        self._resume = asyncio.Event()
        self._resume.set()
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._edit = asyncio.Lock()
        self._locks: dict[int, asyncio.Future[None]] = {}  # blocks under read-modify-write
        self.guard = WriteGuard()
        self._frozen: list[Layer] = []  # former heads whose final commit is owed
        #: A live migration's mirror (jobs/mirror.py): every change to the head is copied
        #: to the head's new home before the request completes. Set and cleared only while
        #: drained.
        self.mirror: Mirror | None = None
        #: Why the volume is failed (writes refused), or None. See _commit_head.
        self.failed: str | None = None

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
        self.layers = list(layers)
        self.merged.set_chain([(lay.slot, lay.map) for lay in self.layers], keep=keep_index)
        self._fds = {lay.slot: lay.fd for lay in self.layers}
        self._depth = {lay.slot: i + 1 for i, lay in enumerate(self.layers)}

    def allocated_bytes(self) -> int:
        return self.head.allocated_bytes()

    @contextlib.asynccontextmanager
    async def drained(self) -> AsyncIterator[None]:
        """Hold new requests and wait for in-flight ones: graph edits happen inside."""
        async with self._edit:
            self._paused = True
            self._resume.clear()
            try:
                while self._inflight:
                    self._idle = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
                    await self._idle  # type: ignore[misc]
                yield
            finally:
                self._paused = False
                self._resume.set()

    async def _enter(self) -> None:
        while self._paused:
            await self._resume.wait()
        self._inflight += 1

    def _leave(self) -> None:
        self._inflight -= 1
        if not self._inflight and self._idle is not None:
            idle, self._idle = self._idle, None
            if not idle.done():  # type: ignore[attr-defined]
                idle.set_result(None)  # type: ignore[attr-defined]

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
        if self._paused:
            return None
        buf = buffers.get(length)
        view = memoryview(buf)
        for fd, off, n in self._plan(offset, length):
            part = view[off - offset : off - offset + n]
            if fd < 0:
                buffers.zero(part)
            elif not self.io.preadv_nowait(fd, part, off):
                return None
        return buf

    def read_sparse_nowait(self, offset: int, length: int) -> Sequence[Segment] | None:
        if length < SPARSE_READ_MIN:
            data = self.read_nowait(offset, length)
            return None if data is None else [(offset, length, data)]
        if self._paused:
            return None
        out: list[Segment] = []
        for fd, off, n in self._plan(offset, length):
            if fd < 0:
                out.append((off, n, None))
                continue
            buf = buffers.get(n)
            if not self.io.preadv_nowait(fd, memoryview(buf), off):
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
        await self._enter()
        try:
            plan = self._plan(offset, length)
            if self.io.blocking:
                data: bytearray = await self._exec(self._read_blocking, plan, offset, length)
                return data
            return self._read_blocking(plan, offset, length)
        except OSError as e:
            raise _oserror(e, "read") from e
        finally:
            self._leave()

    async def read_sparse(self, offset: int, length: int) -> Sequence[Segment]:
        if length < SPARSE_READ_MIN:
            return [(offset, length, await self.read(offset, length))]
        await self._enter()
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
            raise _oserror(e, "read") from e
        finally:
            self._leave()

    # ------------------------------------------------------------ writes
    def write_nowait(self, offset: int, data: Buffer) -> bool:
        n = len(data)
        if (
            self._paused
            or self._locks
            or n > INLINE_WRITE_MAX
            or not n
            or not self.guard.inline
            or self.mirror is not None
            or self.failed is not None
            or (self.io.faulty and self.io.slow_writes(self.layers[0].fd))
        ):
            return False
        head = self.head
        first = offset >> BLOCK_SHIFT
        count = ((offset + n - 1) >> BLOCK_SHIFT) - first + 1
        in_place = head.map.all_data_in(first, count)
        if not in_place and (offset | n) & (BLOCK - 1):
            return False  # a partial block not held by the head: read-modify-write (async)
        try:
            self.guard.note(timed_pwrite(self.io, head.fd, data, offset, False))
        except OSError as e:
            raise _oserror(e, "write") from e
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
            self.guard.note(timed_pwrite(self.io, fd, data, offset, dsync))

    async def _current_block(self, block: int) -> bytes:
        """The block's contents as the chain reads it now."""
        plan = self._plan(block << BLOCK_SHIFT, BLOCK)
        if self.io.blocking:
            return bytes(await self._exec(self._read_blocking, plan, block << BLOCK_SHIFT, BLOCK))
        return bytes(self._read_blocking(plan, block << BLOCK_SHIFT, BLOCK))

    async def _write(self, offset: int, data: Buffer, fua: bool) -> None:
        """The general write path (inside _enter)."""
        n = len(data)
        head = self.head
        first = offset >> BLOCK_SHIFT
        last = (offset + n - 1) >> BLOCK_SHIFT
        count = last - first + 1
        await self._wait_locks(first, last)
        if head.map.all_data_in(first, count):
            if fua and not head.states_durable(first, count):
                # In place, but the blocks' DATA state is not journaled yet: a dsync write
                # alone would not survive a crash. Write, then commit.
                await self._pwrite(head.fd, data, offset)
                await self._commit_head()
            else:
                await self._pwrite(head.fd, data, offset, dsync=fua)
            return
        head_part = offset & (BLOCK - 1)
        tail_part = (offset + n) & (BLOCK - 1)
        rmw = [
            b
            for b, partial in ((first, head_part), (last, tail_part))
            if partial and head.map.state(b) != DATA
        ]
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
        await self._enter()
        try:
            if not fua and self.write_nowait(offset, data):
                return
            await self._write(offset, data, fua)
            if self.mirror is not None:
                first = offset >> BLOCK_SHIFT
                await self.mirror.after_write(
                    first, ((offset + len(data) - 1) >> BLOCK_SHIFT) - first + 1, fua
                )
        except OSError as e:
            raise _oserror(e, "write") from e
        finally:
            self._leave()

    async def zero(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        if not self.writable:
            raise StorageError(errno.EROFS, "read-only snapshot")
        self._check_failed()
        await self._enter()
        try:
            await self._zero(offset, length, may_trim)
            if fua:
                await self._commit_head()
            if self.mirror is not None:
                await self.mirror.after_write(*_block_span(offset, length), fua)
        except OSError as e:
            raise _oserror(e, "write zeroes") from e
        finally:
            self._leave()

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
        try:
            await self.head.commit()
        except StorageError as e:
            if e.errno == errno.EIO and self.failed is None:
                self.failed = f"a commit failed ({e}); writes are refused until the volume is reset"
            raise

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
        if self.mirror is not None:
            await self.mirror.flush()

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
        """Nothing: layers belong to the registry, which closes them when unused."""


def _block_span(offset: int, length: int) -> tuple[int, int]:
    """(first block, block count) a byte range touches."""
    first = offset >> BLOCK_SHIFT
    return first, ((offset + length - 1) >> BLOCK_SHIFT) - first + 1


async def _call(fn: Callable[..., None], *args: object) -> None:
    fn(*args)
