"""Which blocks changed between two points of a volume's history (pure).

A layer holds exactly the blocks written (DATA) or zeroed/trimmed (ZERO) while it was a head,
so the blocks that may differ between an older snapshot S1 and a newer point S2 of the same
branch are those held by the layers of S2's chain above S1's layer. Merges only ever move
blocks into a layer that stays in that range (or widen a layer), so the answer stays a
superset after snapshot deletes: more is allowed, never less.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from blockvirt.storage.backends.cowfile.layer_map import PAGE_BLOCKS, LayerMap

FULL = (1 << PAGE_BLOCKS) - 1


def changed_pages(maps: Sequence[LayerMap], nblocks: int) -> dict[int, int]:
    """page -> bitmask of blocks any of the layers holds (DATA or ZERO), within nblocks."""
    npages = -(-nblocks // PAGE_BLOCKS)
    out: dict[int, int] = {}
    for m in maps:
        if m.all_data:  # a preallocated layer holds everything
            return {p: FULL for p in range(npages)}
        for page, (data, zero) in m.pages.items():
            if page < npages:
                out[page] = out.get(page, 0) | data | zero
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
