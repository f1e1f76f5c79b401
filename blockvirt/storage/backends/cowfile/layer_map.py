"""Which 4 KiB blocks a copy-on-write layer holds (pure; no I/O).

Every block of a layer is in one of three states: UNALLOC (look in the parent), DATA (this
layer's data file holds it, at the same offset) or ZERO (reads as zeros, hiding the parent).
States live in pages of 4096 blocks (16 MiB), each a pair of 4096-bit integers (data, zero),
so whole-range tests and updates are a few big-integer operations. Changed 64 KiB clusters
(16 blocks) are remembered until the next commit, which journals exactly those.
"""

from __future__ import annotations

from collections.abc import Iterator

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
        self.pages: dict[int, list[int]] = {}  # page -> [data bits, zero bits]
        self.dirty: set[int] = set()  # clusters changed since the last commit

    # ------------------------------------------------------------ queries
    def page_bits(self, page: int) -> tuple[int, int]:
        if self.all_data:
            return FULL_PAGE, 0
        bits = self.pages.get(page)
        return (bits[0], bits[1]) if bits is not None else (0, 0)

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
            return bits is not None and bool(bits[0] >> (first % PAGE_BLOCKS) & 1)
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
        for page in sorted(self.pages):
            data, zero = self.pages[page]
            used = data | zero
            for c in range(CLUSTERS_PER_PAGE):
                shift = c * CLUSTER_BLOCKS
                if used >> shift & CLUSTER_MASK:
                    yield (
                        page * CLUSTERS_PER_PAGE + c,
                        data >> shift & CLUSTER_MASK,
                        zero >> shift & CLUSTER_MASK,
                    )

    # ------------------------------------------------------------ changes
    def _set(self, first: int, count: int, data_on: bool, zero_on: bool) -> None:
        assert not self.all_data, "preallocated layers never change state"
        assert first >= 0 and first + count <= self.nblocks, (first, count, self.nblocks)
        pages = self.pages
        if count == 1:  # the common small write (an allocating 4 KiB write): one bit
            page, i = divmod(first, PAGE_BLOCKS)
            bits = pages.get(page)
            if bits is None and (data_on or zero_on):
                bits = pages[page] = [0, 0]
            if bits is not None:
                bit = 1 << i
                bits[0] = bits[0] | bit if data_on else bits[0] & ~bit
                bits[1] = bits[1] | bit if zero_on else bits[1] & ~bit
                if not bits[0] and not bits[1]:
                    del pages[page]
            self.dirty.add(first // CLUSTER_BLOCKS)
            return
        for page, i, n in _page_spans(first, count):
            m = _mask(i, n)
            bits = pages.get(page)
            if bits is None:
                if not (data_on or zero_on):
                    continue
                bits = pages[page] = [0, 0]
            bits[0] = bits[0] | m if data_on else bits[0] & ~m
            bits[1] = bits[1] | m if zero_on else bits[1] & ~m
            if not bits[0] and not bits[1]:
                del pages[page]
        if count:
            self.dirty.update(range(first // CLUSTER_BLOCKS, (first + count - 1) // CLUSTER_BLOCKS + 1))

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
            bits = self.pages[page] = [0, 0]
        bits[0] = bits[0] & ~m | data << shift
        bits[1] = bits[1] & ~m | zero << shift
        if not bits[0] and not bits[1]:
            del self.pages[page]

    def take_dirty(self) -> list[tuple[int, int, int]]:
        """The changed clusters' complete states, for the journal; clears the dirty set."""
        out = [(c, *self.cluster(c)) for c in sorted(self.dirty)]
        self.dirty.clear()
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
            bits = self.pages[page]
            bits[0] &= keep
            bits[1] &= keep
            if not bits[0] and not bits[1]:
                del self.pages[page]
