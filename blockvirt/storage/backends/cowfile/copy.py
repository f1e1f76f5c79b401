"""The data mover of a migration between file pools: copy layers into another pool, and mirror
the writes an active head takes meanwhile (as the `Replica` of a mirror filter).

A layer's copy has the same id, size and block states, in another pool directory; only the
catalog says which copy is live, so there is never more than one. Immutable layers are copied
once. The head is copied chunk by chunk (1 MiB) by a single pass over a dirty set that starts
as every chunk the head holds; from the first moment, every guest write, zeroing or trim of a
chunk that is already copied (clean) is copied again, synchronously, before the guest's
request completes (active mirroring). Dirty chunks are left to the pass, which reads the source
after the write. A chunk being copied is locked; a write that lands there waits for the lock
and then mirrors its blocks. So the dirty set only shrinks and the pass always ends: the copy
converges whatever the write rate.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, Iterator

from blockvirt.storage import executor
from blockvirt.storage.backends.cowfile.layer import Layer, WriteGuard, timed_pwrite
from blockvirt.storage.backends.cowfile.layer_map import (
    BLOCK,
    BLOCK_SHIFT,
    PAGE_BLOCKS,
    iter_bits,
)
from blockvirt.storage.node import StorageError

#: Reads and writes up to this size may be done inline on the loop (mirrored guest writes).
INLINE_MAX = 64 * 1024
#: Blocks per chunk of the dirty set (1 MiB): the unit of the copy pass and of its locks.
CHUNK_BLOCKS = 256
CHUNK_BYTES = CHUNK_BLOCKS * BLOCK
#: A target write that fails this many times in a row aborts the migration (the guest's
#: writes never fail because of the target: the source stays authoritative).
MAX_TARGET_FAILURES = 5

#: An async pause before copying `nbytes` (rate limit, QoS background admission).
Throttle = Callable[[int], Awaitable[None]]


def _runs(bits: int, offset: int) -> Iterator[tuple[int, int]]:
    """(first, count) runs of set bits, first shifted by `offset`."""
    start = prev = -2
    for i in iter_bits(bits):
        if i == prev + 1:
            prev = i
            continue
        if start >= 0:
            yield offset + start, prev - start + 1
        start = prev = i
    if start >= 0:
        yield offset + start, prev - start + 1


def _mask(first: int, count: int) -> int:
    return ((1 << count) - 1) << first


async def _call(layer: Layer, fn: Callable[..., object], *args: object) -> object:
    if layer.io.blocking:
        return await executor.run_in(layer.pool_dir, fn, *args)
    return fn(*args)


async def _read(src: Layer, nbytes: int, offset: int) -> bytes | bytearray:
    """Page-cache hits inline (a mirrored write reads back what was just written), the rest
    in the thread pool."""
    io = src.io
    if not io.blocking:
        return io.pread(src.fd, nbytes, offset)
    if nbytes <= INLINE_MAX:
        buf = bytearray(nbytes)
        if io.preadv_nowait(src.fd, memoryview(buf), offset):
            return buf
    return await executor.run_in(src.pool_dir, io.pread, src.fd, nbytes, offset)


async def _write(
    dst: Layer, data: bytes | bytearray | memoryview, offset: int, guard: WriteGuard | None
) -> None:
    """Small writes inline into the page cache while that stays quick (see WriteGuard)."""
    io = dst.io
    if not io.blocking:
        io.pwrite(dst.fd, data, offset)
    elif guard is not None and guard.inline and len(data) <= INLINE_MAX:
        guard.note(timed_pwrite(io, dst.fd, data, offset, False))
    else:
        await executor.run_in(dst.pool_dir, io.pwrite, dst.fd, data, offset)


async def copy_blocks(
    src: Layer,
    dst: Layer,
    first: int,
    count: int,
    *,
    zero_detect: bool = False,
    guard: WriteGuard | None = None,
) -> int:
    """Give `dst` the states and data `src` has for blocks [first, first + count).
    With a `guard`, small writes may go inline (mirrored guest writes).

    `dst` may be a thick (ALL_DATA) layer: blocks src does not hold become zeros in its file.
    With `zero_detect` (converting a thick source to thin), DATA blocks full of zeros are not
    copied: they become UNALLOC (the layer must have no parent). Returns the bytes of data
    copied. Blocks dst held as DATA that are no longer data are punched (space back)."""
    io = src.io
    copied = 0
    end = first + count
    block = first
    while block < end:
        page, i = divmod(block, PAGE_BLOCKS)
        n = min(end - block, PAGE_BLOCKS - i)
        want = _mask(i, n)
        sdata, szero = src.map.page_bits(page)
        sdata &= want
        szero &= want
        base = page * PAGE_BLOCKS
        ddata_before = dst.map.page_bits(page)[0] & want if not dst.map.all_data else 0
        for run_first, run_n in _runs(sdata, base):
            off, nbytes = run_first << BLOCK_SHIFT, run_n * BLOCK
            data = await _read(src, nbytes, off)
            if zero_detect and not dst.map.all_data:
                copied += await _copy_nonzero(dst, run_first, run_n, data)
                continue
            await _write(dst, data, off, guard)
            if not dst.map.all_data:
                dst.map.set_data(run_first, run_n)
            copied += nbytes
        rest = want & ~sdata
        if dst.map.all_data:
            # Thick copy: whatever src does not hold as data reads as zeros there.
            for run_first, run_n in _runs(rest, base):
                await _call(dst, io.zero_allocated, dst.fd, run_first << BLOCK_SHIFT, run_n * BLOCK)
        else:
            for run_first, run_n in _runs(szero, base):
                dst.map.set_zero(run_first, run_n)
            for run_first, run_n in _runs(rest & ~szero, base):
                dst.map.set_unalloc(run_first, run_n)
            for run_first, run_n in _runs(ddata_before & rest, base):
                await _call(dst, io.punch, dst.fd, run_first << BLOCK_SHIFT, run_n * BLOCK)
        block += n
    return copied


async def _copy_nonzero(dst: Layer, first: int, count: int, data: bytes | bytearray) -> int:
    """Write the blocks of `data` that are not all zeros; mark the zero ones UNALLOC."""
    zero = bytes(BLOCK)
    view = memoryview(data)
    copied = 0
    k = 0
    while k < count:
        is_zero = view[k * BLOCK : (k + 1) * BLOCK] == zero
        j = k + 1
        while j < count and (view[j * BLOCK : (j + 1) * BLOCK] == zero) == is_zero:
            j += 1
        if is_zero:
            dst.map.set_unalloc(first + k, j - k)
        else:
            await _write(dst, view[k * BLOCK : j * BLOCK], (first + k) << BLOCK_SHIFT, None)
            dst.map.set_data(first + k, j - k)
            copied += (j - k) * BLOCK
        k = j
    return copied


def held_chunks(layer: Layer) -> set[int]:
    """Chunks where the layer holds any block (DATA or ZERO): what a copy must visit."""
    nblocks = layer.map.nblocks
    nchunks = -(-nblocks // CHUNK_BLOCKS)
    if layer.map.all_data:
        return set(range(nchunks))
    per_page = PAGE_BLOCKS // CHUNK_BLOCKS
    chunk_mask = (1 << CHUNK_BLOCKS) - 1
    out: set[int] = set()
    for page, (data, zero) in layer.map.pages.items():
        used = data | zero
        for c in range(per_page):
            if used >> (c * CHUNK_BLOCKS) & chunk_mask:
                chunk = page * per_page + c
                if chunk < nchunks:
                    out.add(chunk)
    return out


def data_bytes(layer: Layer) -> int:
    """Bytes of data the layer holds (what copying it moves)."""
    return layer.map.data_blocks() * BLOCK


class MirrorFailed(Exception):
    """The target keeps failing: the migration must stop (the source is untouched)."""


class LayerMirror:
    """Copies a head layer into its target while the head takes writes: the replica of the
    mirror filter a migration puts over the volume's chain."""

    def __init__(self, source: Layer, target: Layer, *, zero_detect: bool = False) -> None:
        self.source = source
        self.target = target
        self.zero_detect = zero_detect
        self.dirty: set[int] = held_chunks(source)
        self._locks: dict[int, asyncio.Future[None]] = {}
        self.failures = 0  # target failures in a row
        self.error: BaseException | None = None
        self.mirrored_writes = 0
        #: Set when a mirror write failed and re-dirtied a chunk (the pass must look again).
        self.redirtied = asyncio.Event()
        self.guard = WriteGuard()  # mirrored writes go inline while the page cache is quick

    @property
    def clean(self) -> bool:
        return not self.dirty and not self._locks

    async def _locked_copy(self, chunk: int, first: int, count: int, *, inline: bool = False) -> int:
        fut = asyncio.get_running_loop().create_future()
        self._locks[chunk] = fut
        try:
            return await copy_blocks(
                self.source,
                self.target,
                first,
                count,
                zero_detect=self.zero_detect,
                guard=self.guard if inline else None,
            )
        finally:
            del self._locks[chunk]
            fut.set_result(None)

    async def copy_chunk(self, chunk: int) -> int:
        copied = await self._copy_chunk(chunk)
        if copied and self.target.io.blocking:
            # Start writing the chunk back now: the sync before the switch then finds little
            # left, and the filesystem never has to flush the whole copy at once (which
            # stalls every writer on it).
            first = chunk * CHUNK_BYTES
            tgt = self.target
            await executor.run_in(tgt.pool_dir, tgt.io.start_writeback, tgt.fd, first, CHUNK_BYTES)
        return copied

    async def _copy_chunk(self, chunk: int) -> int:
        """The pass: copy one dirty chunk (waits if a mirror write holds it). Raises on a
        target failure after re-dirtying the chunk."""
        while (lock := self._locks.get(chunk)) is not None:
            await asyncio.shield(lock)
        if chunk not in self.dirty:
            return 0
        first = chunk * CHUNK_BLOCKS
        count = min(CHUNK_BLOCKS, self.source.map.nblocks - first)
        try:
            copied = await self._locked_copy(chunk, first, count)
        except (OSError, StorageError) as e:
            self._failed(e)
            raise
        self.dirty.discard(chunk)
        self.failures = 0
        return copied

    async def changed(self, offset: int, length: int, fua: bool) -> None:
        first = offset >> BLOCK_SHIFT
        await self.after_write(first, ((offset + length - 1) >> BLOCK_SHIFT) - first + 1, fua)

    async def after_write(self, first: int, count: int, fua: bool) -> None:
        """A guest request changed blocks [first, first + count) of the source head."""
        last = (first + count - 1) // CHUNK_BLOCKS
        for chunk in range(first // CHUNK_BLOCKS, last + 1):
            while (lock := self._locks.get(chunk)) is not None:
                await asyncio.shield(lock)  # being copied: mirror our blocks once it is done
            if chunk in self.dirty:
                continue  # the pass has yet to copy it, and will read our write then
            lo = max(first, chunk * CHUNK_BLOCKS)
            hi = min(first + count, (chunk + 1) * CHUNK_BLOCKS)
            try:
                await self._locked_copy(chunk, lo, hi - lo, inline=True)
            except (OSError, StorageError) as e:
                self.dirty.add(chunk)  # never fail the guest: the pass copies it again
                self.redirtied.set()
                self._failed(e)
                continue
            self.mirrored_writes += 1
        if fua:
            await self.flush()

    async def flush(self) -> None:
        """Make the target as durable as the source (a guest FLUSH or FUA): after the
        switchover the target is all there is."""
        try:
            await self.target.commit()
        except (OSError, StorageError) as e:
            self._failed(e)

    def _failed(self, e: BaseException) -> None:
        self.failures += 1
        if self.failures >= MAX_TARGET_FAILURES and self.error is None:
            self.error = e


def target_error(e: BaseException) -> str:
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the target pool is full"
    return f"target I/O failed: {getattr(e, 'strerror', None) or e}"
