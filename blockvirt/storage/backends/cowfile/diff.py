"""Which blocks changed between two points of a volume's history (pure).

A layer holds exactly the blocks written (DATA) or zeroed/trimmed (ZERO) while it was a head,
so the blocks that may differ between an older snapshot S1 and a newer point S2 of the same
branch are those held by the layers of S2's chain above S1's layer. Merges only ever move
blocks into a layer that stays in that range (or widen a layer), so the answer stays a
superset after snapshot deletes: more is allowed, never less.

The work runs on copies of the layers' page tables (`table`), so it can run off the event
loop while guests keep writing: a table copied after a write completed holds its blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from blockvirt.storage.backends.cowfile.layer_map import BLOCK, PAGE_BLOCKS, LayerMap

FULL = (1 << PAGE_BLOCKS) - 1

#: A layer's page table: (all_data, page -> (data bits, zero bits)).
PageTable = tuple[bool, Mapping[int, Sequence[int]]]


def table(m: LayerMap) -> PageTable:
    """A copy of the map's page table that later changes do not reach (cheap: one dict
    copy; the pages are immutable tuples)."""
    return m.all_data, m.pages.copy()


def changed_pages(maps: Sequence[PageTable], nblocks: int) -> dict[int, int]:
    """page -> bitmask of blocks any of the layers holds (DATA or ZERO), within nblocks."""
    npages = -(-nblocks // PAGE_BLOCKS)
    out: dict[int, int] = {}
    for all_data, pages in maps:
        if all_data:  # a preallocated layer holds everything
            return {p: FULL for p in range(npages)}
        for page, bits in pages.items():
            if page < npages:
                out[page] = out.get(page, 0) | bits[0] | bits[1]
    last = nblocks - (npages - 1) * PAGE_BLOCKS if npages else 0
    if npages and (npages - 1) in out and last < PAGE_BLOCKS:
        out[npages - 1] &= (1 << last) - 1
    return {p: bits for p, bits in out.items() if bits}


def runs(pages: dict[int, int]) -> Iterator[tuple[int, int]]:
    """(first block, count) runs of set bits over the page masks, in order, merged across
    page boundaries."""
    start = -1
    end = -1
    for page in sorted(pages):
        bits = pages[page]
        base = page * PAGE_BLOCKS
        while bits:
            low = (bits & -bits).bit_length() - 1
            inverted = ~(bits >> low)
            length = (inverted & -inverted).bit_length() - 1
            first = base + low
            if first == end:
                end = first + length
            else:
                if start >= 0:
                    yield start, end - start
                start, end = first, first + length
            bits &= ~(((1 << length) - 1) << low)
    if start >= 0:
        yield start, end - start


def changed_extents(maps: Sequence[PageTable], top_size: int, base_size: int) -> list[tuple[int, int]]:
    """(offset, length) byte ranges of a volume of `top_size` that the layers `maps` hold,
    plus everything past `base_size` (the older point's size) if it grew since, in order."""
    nblocks = -(-top_size // BLOCK)
    # A grown range counts whole: one range, not page masks (a volume can grow by TiBs).
    grown = base_size // BLOCK if top_size > base_size else nblocks
    out: list[tuple[int, int]] = []
    for first, count in runs(changed_pages(maps, grown)):
        out.append((first * BLOCK, count * BLOCK))
    if grown < nblocks:
        start = grown * BLOCK
        if out and out[-1][0] + out[-1][1] == start:
            start = out.pop()[0]
        out.append((start, nblocks * BLOCK - start))
    if out and out[-1][0] + out[-1][1] > top_size:  # a partial last block
        out[-1] = (out[-1][0], top_size - out[-1][0])
    return out
