"""Which 4 KiB blocks a copy-on-write layer holds (pure; no I/O).

Every block of a layer is in one of three states: UNALLOC (look in the parent), DATA (this
layer's data file holds it, at the same offset) or ZERO (reads as zeros, hiding the parent).
States live in pages of 4096 blocks (16 MiB), each a pair of 4096-bit integers (data, zero),
so whole-range tests and updates are a few big-integer operations. Changed 64 KiB clusters
(16 blocks) are remembered until the next commit, which journals exactly those.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import compress

BLOCK = 4096
BLOCK_SHIFT = 12
PAGE_BLOCKS = 4096  # 16 MiB of guest space per page
CLUSTER_BLOCKS = 16  # 64 KiB: the journal's unit
CLUSTERS_PER_PAGE = PAGE_BLOCKS // CLUSTER_BLOCKS
FULL_PAGE = (1 << PAGE_BLOCKS) - 1
CLUSTER_MASK = (1 << CLUSTER_BLOCKS) - 1

UNALLOC, DATA, ZERO = 0, 1, 2


def _mask(i: int, n: int) -> int:
    return ((1 << n) - 1) << i


#: Below this many changed clusters in a page, shifting per cluster is cheaper than words.
_FEW = 4


def _words(bits: int) -> array[int]:
    """A page's 4096-bit integer as 256 16-bit words, cluster 0 first."""
    words = array("H", bits.to_bytes(PAGE_BLOCKS // 8, "little"))
    if sys.byteorder == "big":
        words.byteswap()
    return words


def _page_spans(first: int, count: int) -> Iterator[tuple[int, int, int]]:
    """(page, index in page, blocks) pieces of a block range."""
    while count > 0:
        page, i = divmod(first, PAGE_BLOCKS)
        n = min(count, PAGE_BLOCKS - i)
        yield page, i, n
        first += n
        count -= n


def iter_bits(bits: int) -> Iterator[int]:
    """Indexes of the set bits, lowest first."""
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low


class LayerMap:
    """Block states of one layer. `all_data` layers (thick, preallocated) hold every block."""

    __slots__ = ("all_data", "dirty", "nblocks", "pages")

    def __init__(self, nblocks: int, *, all_data: bool = False) -> None:
        self.nblocks = nblocks
        self.all_data = all_data
        # page -> (data bits, zero bits): tuples of ints, which the cyclic garbage collector
        # stops tracking (lists it would walk at every full collection: a million of them
        # on a big chain made the loop stall for tens of milliseconds).
        self.pages: dict[int, tuple[int, int]] = {}
        #: Clusters changed since the last commit (the keys). A dict of ints rather than a
        #: set: the garbage collector leaves it alone, where it would walk a set's every key.
        self.dirty: dict[int, None] = {}

    # ------------------------------------------------------------ queries
    def page_bits(self, page: int) -> tuple[int, int]:
        if self.all_data:
            return FULL_PAGE, 0
        return self.pages.get(page, (0, 0))

    def state(self, block: int) -> int:
        if self.all_data:
            return DATA
        bits = self.pages.get(block // PAGE_BLOCKS)
        if bits is None:
            return UNALLOC
        i = block % PAGE_BLOCKS
        if bits[0] >> i & 1:
            return DATA
        return ZERO if bits[1] >> i & 1 else UNALLOC

    def all_data_in(self, first: int, count: int) -> bool:
        """True if every block of the range is DATA here (writes can go in place)."""
        if self.all_data:
            return True
        pages = self.pages
        if count == 1:  # the common small write: one bit, no masks of a 4096-bit page
            bits = pages.get(first // PAGE_BLOCKS)
            if bits is None:
                return False
            data = bits[0]
            # A full page (a disk written through) compares without the shift's new integer.
            return data == FULL_PAGE or bool(data >> (first % PAGE_BLOCKS) & 1)
        for page, i, n in _page_spans(first, count):
            bits = pages.get(page)
            m = _mask(i, n)
            if bits is None or bits[0] & m != m:
                return False
        return True

    def data_blocks(self) -> int:
        if self.all_data:
            return self.nblocks
        return sum(bits[0].bit_count() for bits in self.pages.values())

    def cluster(self, cluster: int) -> tuple[int, int]:
        """(data, zero) 16-bit masks of one cluster."""
        page, c = divmod(cluster, CLUSTERS_PER_PAGE)
        data, zero = self.page_bits(page)
        shift = c * CLUSTER_BLOCKS
        return data >> shift & CLUSTER_MASK, zero >> shift & CLUSTER_MASK

    def clusters(self) -> Iterator[tuple[int, int, int]]:
        """Every cluster that is not entirely UNALLOC: (cluster, data, zero)."""
        yield from self.live_states(sorted(self.pages))

    def _set(self, first: int, count: int, data_on: bool, zero_on: bool) -> None:
        assert not self.all_data, "preallocated layers never change state"
        assert first >= 0 and first + count <= self.nblocks, (first, count, self.nblocks)
        pages = self.pages
        if count == 1:  # the common small write (an allocating 4 KiB write): one bit
            page, i = divmod(first, PAGE_BLOCKS)
            bits = pages.get(page)
            bit = 1 << i
            if bits is None:
                if data_on or zero_on:
                    pages[page] = (bit, 0) if data_on else (0, bit)
            else:
                # Touch only the bit: clearing through a mask (x & ~bit) builds two more
                # 4096-bit integers per call, even where the bit is not set.
                data, zero = bits
                if data_on:
                    data |= bit
                elif data and data & bit:
                    data ^= bit
                if zero_on:
                    zero |= bit
                elif zero and zero & bit:
                    zero ^= bit
                if data or zero:
                    pages[page] = (data, zero)
                else:
                    del pages[page]
            self.dirty[first // CLUSTER_BLOCKS] = None
            return
        for page, i, n in _page_spans(first, count):
            m = _mask(i, n)
            bits = pages.get(page)
            if bits is None:
                if not (data_on or zero_on):
                    continue
                bits = (0, 0)
            data = bits[0] | m if data_on else bits[0] & ~m
            zero = bits[1] | m if zero_on else bits[1] & ~m
            if data or zero:
                pages[page] = (data, zero)
            else:
                pages.pop(page, None)
        if count:
            last = (first + count - 1) // CLUSTER_BLOCKS
            self.dirty.update(dict.fromkeys(range(first // CLUSTER_BLOCKS, last + 1)))

    def set_data(self, first: int, count: int) -> None:
        self._set(first, count, True, False)

    def set_zero(self, first: int, count: int) -> None:
        self._set(first, count, False, True)

    def set_unalloc(self, first: int, count: int) -> None:
        self._set(first, count, False, False)

    def apply_cluster(self, cluster: int, data: int, zero: int) -> None:
        """Replay one journal entry (the cluster's complete state)."""
        assert not data & zero, "a block cannot be both DATA and ZERO"
        page, c = divmod(cluster, CLUSTERS_PER_PAGE)
        shift = c * CLUSTER_BLOCKS
        m = CLUSTER_MASK << shift
        bits = self.pages.get(page)
        if bits is None:
            if not (data or zero):
                return
            bits = (0, 0)
        d = bits[0] & ~m | data << shift
        z = bits[1] & ~m | zero << shift
        if d or z:
            self.pages[page] = (d, z)
        else:
            del self.pages[page]

    def swap_dirty(self) -> dict[int, None]:
        """The changed clusters; the dirty set starts afresh."""
        out, self.dirty = self.dirty, {}
        return out

    def states(self, clusters: Iterable[int]) -> list[tuple[int, int, int]]:
        """(cluster, data, zero) of these clusters, sorted, as `cluster` gives them. Where
        many share a page, its two integers are cut into 16-bit words once rather than
        shifted per cluster."""
        cl = sorted(clusters)
        out: list[tuple[int, int, int]] = []
        i, n = 0, len(cl)
        while i < n:
            page = cl[i] // CLUSTERS_PER_PAGE
            base = page * CLUSTERS_PER_PAGE
            j = bisect_left(cl, base + CLUSTERS_PER_PAGE, i)
            data, zero = self.page_bits(page)
            if j - i < _FEW:
                for c in cl[i:j]:
                    shift = (c - base) * CLUSTER_BLOCKS
                    out.append((c, data >> shift & CLUSTER_MASK, zero >> shift & CLUSTER_MASK))
            elif j - i == CLUSTERS_PER_PAGE:  # the whole page changed
                out += zip(range(base, base + CLUSTERS_PER_PAGE), _words(data), _words(zero), strict=True)
            else:
                d, z = _words(data), _words(zero)
                out += [(c, d[c - base], z[c - base]) for c in cl[i:j]]
            i = j
        return out

    def live_states(self, pages: Iterable[int]) -> list[tuple[int, int, int]]:
        """(cluster, data, zero) of every cluster of these pages that is not entirely
        UNALLOC (the journal's compacted form)."""
        out: list[tuple[int, int, int]] = []
        for page in pages:
            data, zero = self.page_bits(page)
            used = data | zero
            if not used:
                continue
            base = page * CLUSTERS_PER_PAGE
            held = list(compress(range(base, base + CLUSTERS_PER_PAGE), _words(used)))
            d, z = _words(data), _words(zero)
            out += [(c, d[c - base], z[c - base]) for c in held]
        return out

    def truncate(self, nblocks: int) -> None:
        """Forget every block at or past `nblocks` (shrinking); the change is journaled."""
        if nblocks < self.nblocks and not self.all_data:
            self.set_unalloc(nblocks, self.nblocks - nblocks)
        self.nblocks = nblocks

    def grow(self, nblocks: int) -> None:
        """Make room for `nblocks`; the caller sets the new blocks' states."""
        assert nblocks >= self.nblocks
        self.nblocks = nblocks

    def clip(self) -> None:
        """Drop states at or past `nblocks` without journaling them. A journal may hold such
        entries when a resize was interrupted by a crash; they mean nothing at this size, and
        the next grow overwrites them (it sets every new block's state)."""
        last_page = self.nblocks // PAGE_BLOCKS
        for page in [p for p in self.pages if p >= last_page]:
            keep = (1 << max(0, self.nblocks - page * PAGE_BLOCKS)) - 1
            data, zero = self.pages[page]
            if data & keep or zero & keep:
                self.pages[page] = (data & keep, zero & keep)
            else:
                del self.pages[page]
