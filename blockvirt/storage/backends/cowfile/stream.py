"""Stream: copy into a target layer what it currently reads from some of its ancestors, so
those ancestors can leave the chain (snapshot delete) or the chain can end at the target
(flatten). The target's reads never change while this runs, and a guest write to the target
always wins: each block is checked and written in one step of the event loop, with no await
between the check and the write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from blockvirt.storage import executor
from blockvirt.storage.backends.cowfile.layer import Layer
from blockvirt.storage.backends.cowfile.layer_map import BLOCK, BLOCK_SHIFT, FULL_PAGE, PAGE_BLOCKS, iter_bits

#: Longest run of blocks copied in one read.
MAX_RUN = 64


def _runs(bits: int) -> list[tuple[int, int]]:
    """(first index, length) runs of set bits, each at most MAX_RUN long."""
    out: list[tuple[int, int]] = []
    start = prev = -2
    for i in iter_bits(bits):
        if i == prev + 1 and i - start < MAX_RUN:
            prev = i
            continue
        if start >= 0:
            out.append((start, prev - start + 1))
        start = prev = i
    if start >= 0:
        out.append((start, prev - start + 1))
    return out


def pages_to_copy(sources: Sequence[Layer], npages: int) -> list[int]:
    if any(s.map.all_data for s in sources):
        return list(range(npages))
    pages: set[int] = set()
    for s in sources:
        pages.update(s.map.pages)
    return sorted(p for p in pages if p < npages)


Notify = Callable[[int, int, bool], None]
#: Called with the number of blocks just brought in: progress within a 16 MiB page, which
#: may be all there is of a small volume (a rate needs more than one step).
Moved = Callable[[int], None]


async def stream_page(
    target: Layer,
    sources: Sequence[Layer],
    page: int,
    keep_zeros: bool,
    notify: Notify | None = None,
    moved_blocks: Moved | None = None,
) -> int:
    """Copy one 16 MiB page's worth; returns the number of blocks copied or zeroed."""
    tdata, tzero = target.map.page_bits(page)
    remaining = FULL_PAGE & ~(tdata | tzero)
    base_block = page * PAGE_BLOCKS
    nblocks = target.map.nblocks
    if base_block + PAGE_BLOCKS > nblocks:
        remaining &= (1 << max(0, nblocks - base_block)) - 1
    moved = 0
    for src in sources:
        if not remaining:
            break
        sdata, szero = src.map.page_bits(page)
        want_data = sdata & remaining
        want_zero = szero & remaining
        remaining &= ~(sdata | szero)
        for i, n in _runs(want_data):
            first = base_block + i
            data = await _read(src, first << BLOCK_SHIFT, n * BLOCK)
            put = _put(target, first, n, data, notify)
            moved += put
            if moved_blocks is not None:
                moved_blocks(put)
        if keep_zeros and want_zero:
            for i, n in _runs(want_zero):
                put = _put(target, base_block + i, n, None, notify)
                moved += put
                if moved_blocks is not None:
                    moved_blocks(put)
    return moved


async def _read(src: Layer, offset: int, length: int) -> bytes:
    if src.io.blocking:
        return await executor.run_in(src.pool_dir, src.io.pread, src.fd, length, offset)
    return src.io.pread(src.fd, length, offset)


def _put(target: Layer, first: int, n: int, data: bytes | None, notify: Notify | None) -> int:
    """Write the blocks the target still does not hold (no await: atomic on the loop).

    `notify(first, count, is_data)` lets a chain whose head is the target point its merged
    index at the target, so later in-place writes there are read back."""
    tdata, tzero = target.map.page_bits(first // PAGE_BLOCKS)
    i0 = first % PAGE_BLOCKS
    free = ~(tdata | tzero) >> i0 & ((1 << n) - 1)
    for f, c in target.filling:  # a guest write is filling these: its data wins
        lo, hi = max(f, first), min(f + c, first + n)
        if lo < hi:
            free &= ~(((1 << (hi - lo)) - 1) << (lo - first))
    done = 0
    for i, k in _runs(free):
        if data is None:
            target.map.set_zero(first + i, k)
        else:
            target.io.pwrite(
                target.fd, memoryview(data)[i * BLOCK : (i + k) * BLOCK], (first + i) << BLOCK_SHIFT
            )
            target.map.set_data(first + i, k)
        if notify is not None:
            notify(first + i, k, data is not None)
        done += k
    return done


async def stream(
    target: Layer,
    sources: Sequence[Layer],
    *,
    keep_zeros: bool,
    start_page: int = 0,
    on_progress: Callable[[int, int], object] | None = None,
    checkpoint: Callable[[int], object] | None = None,
    checkpoint_every: int = 64,
    notify: Notify | None = None,
) -> None:
    """Copy every page from `start_page` on; `checkpoint(next_page)` after durable commits.
    `on_progress(done, total)` counts bytes of blocks brought into the target."""
    npages = -(-target.map.nblocks // PAGE_BLOCKS)
    pages = [p for p in pages_to_copy(sources, npages) if p >= start_page]
    total = blocks_to_bring(target, sources, pages, keep_zeros=keep_zeros) * BLOCK
    moved_blocks = _counter(total, on_progress)
    for k, page in enumerate(pages):
        await stream_page(target, sources, page, keep_zeros, notify, moved_blocks)
        if checkpoint is not None and (k + 1) % checkpoint_every == 0:
            await target.commit()
            await _maybe_await(checkpoint(page + 1))
    await target.commit()


def _counter(total: int, on_progress: Callable[[int, int], object] | None) -> Moved:
    """Blocks moved -> `on_progress(bytes done, total bytes)`, told the total at once."""
    done = 0

    def moved_blocks(n: int) -> None:
        nonlocal done
        done += n * BLOCK
        if on_progress is not None:
            on_progress(min(done, total), total)

    moved_blocks(0)
    return moved_blocks


async def _maybe_await(value: object) -> None:
    if hasattr(value, "__await__"):
        await value  # type: ignore[misc]


async def overlay_page(target: Layer, source: Layer, page: int, moved_blocks: Moved | None = None) -> int:
    """Commit direction: copy every block `source` holds (DATA or ZERO) over `target`.

    Used to merge a small immutable child into its parent; only blocks the child holds are
    touched, and those are read from the child by everyone until the child leaves the chain.
    """
    sdata, szero = source.map.page_bits(page)
    base_block = page * PAGE_BLOCKS
    moved = 0
    for i, n in _runs(sdata):
        first = base_block + i
        data = await _read(source, first << BLOCK_SHIFT, n * BLOCK)
        target.io.pwrite(target.fd, data, first << BLOCK_SHIFT)
        if not target.map.all_data:
            target.map.set_data(first, n)
        moved += n
        if moved_blocks is not None:
            moved_blocks(n)
    for i, n in _runs(szero):
        first = base_block + i
        if target.map.all_data:
            target.io.zero_allocated(target.fd, first << BLOCK_SHIFT, n * BLOCK)
        else:
            target.map.set_zero(first, n)
        moved += n
        if moved_blocks is not None:
            moved_blocks(n)
    return moved


async def overlay(
    target: Layer,
    source: Layer,
    *,
    start_page: int = 0,
    on_progress: Callable[[int, int], object] | None = None,
    checkpoint: Callable[[int], object] | None = None,
    checkpoint_every: int = 64,
) -> None:
    """`on_progress(done, total)` counts bytes of blocks laid over the target."""
    pages = [p for p in sorted(source.map.pages) if p >= start_page]
    total = sum(sum(map(int.bit_count, source.map.page_bits(p))) for p in pages) * BLOCK
    moved_blocks = _counter(total, on_progress)
    for k, page in enumerate(pages):
        await overlay_page(target, source, page, moved_blocks)
        if checkpoint is not None and (k + 1) % checkpoint_every == 0:
            await target.commit()
            await _maybe_await(checkpoint(page + 1))
    await target.commit()


def blocks_to_bring(
    target: Layer, sources: Sequence[Layer], pages: Sequence[int], *, keep_zeros: bool = True
) -> int:
    """Blocks of `pages` a stream brings into the target (its progress total): what the
    first source that holds each block holds there, where the target holds nothing, within
    the target's size, and ZERO blocks only if the stream keeps zeros (as stream_page)."""
    nblocks = target.map.nblocks
    total = 0
    for page in pages:
        td, tz = target.map.page_bits(page)
        remaining = FULL_PAGE & ~(td | tz)
        base_block = page * PAGE_BLOCKS
        if base_block + PAGE_BLOCKS > nblocks:
            remaining &= (1 << max(0, nblocks - base_block)) - 1
        for s in sources:
            if not remaining:
                break
            d, z = s.map.page_bits(page)
            total += (d & remaining).bit_count()
            if keep_zeros:
                total += (z & remaining).bit_count()
            remaining &= ~(d | z)
    return total


def blocks_held(layer: Layer) -> int:
    """DATA and ZERO blocks of a layer (what an overlay of it moves)."""
    if layer.map.all_data:
        return layer.map.nblocks
    return sum((d | z).bit_count() for d, z in layer.map.pages.values())


def blocks_to_stream(target: Layer, source: Layer) -> int:
    """Blocks `source` holds that `target` does not (what streaming it into target moves)."""
    nall = -(-source.map.nblocks // PAGE_BLOCKS)
    pages = list(range(nall)) if source.map.all_data else list(source.map.pages)
    total = 0
    for page in pages:
        sd, sz = source.map.page_bits(page)
        td, tz = target.map.page_bits(page)
        total += ((sd | sz) & ~(td | tz)).bit_count()
    return total
