"""The merged index of a layer chain: for every block, which layer to read it from (pure).

Reads must not get slower as chains grow, so instead of walking head -> parent -> ... per
request, each 16 MiB page of the chain is resolved once into an array of owners (a layer's
slot number, or 0 for "reads as zeros"), and kept in an LRU under a fixed page budget that
does not depend on the chain's depth. Writes to the head update resolved pages in place;
adding an empty head (a snapshot) changes nothing, since every owner is still right.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence

from blockvirt.storage.backends.cowfile.layer_map import FULL_PAGE, PAGE_BLOCKS, LayerMap, iter_bits

ZERO_OWNER = 0
#: Default budget: 4096 pages x 8 KiB = 32 MiB of owners, covering 64 GiB of guest space.
DEFAULT_BUDGET_PAGES = 4096

_ZERO_PAGE = array("H", bytes(2 * PAGE_BLOCKS))


class MergedIndex:
    """Owners of blocks for one chain. `chain` is head first: [(slot, map), ...]."""

    def __init__(
        self, chain: Sequence[tuple[int, LayerMap]], budget_pages: int = DEFAULT_BUDGET_PAGES
    ) -> None:
        self.chain = list(chain)
        self.budget = max(1, budget_pages)
        self._pages: OrderedDict[int, array[int]] = OrderedDict()
        self.builds = 0  # pages resolved so far (for tests and metrics)

    def set_chain(self, chain: Sequence[tuple[int, LayerMap]], *, keep: bool) -> None:
        """Replace the chain; `keep` the resolved pages only if every owner is still right
        (true when an empty layer was put on top)."""
        self.chain = list(chain)
        if not keep:
            self._pages.clear()

    def invalidate(self, first: int | None = None, count: int = 0) -> None:
        """Forget resolved pages (all, or those overlapping a block range)."""
        if first is None:
            self._pages.clear()
            return
        for page in range(first // PAGE_BLOCKS, (first + max(count, 1) - 1) // PAGE_BLOCKS + 1):
            self._pages.pop(page, None)

    def _resolve(self, page: int) -> array[int]:
        owners = array("H", _ZERO_PAGE)
        remaining = FULL_PAGE
        for slot, lmap in self.chain:
            data, zero = lmap.page_bits(page)
            hit_data = data & remaining
            if hit_data == FULL_PAGE:
                owners = array("H", [slot]) * PAGE_BLOCKS
                break
            for i in iter_bits(hit_data):
                owners[i] = slot
            remaining &= ~(data | zero)
            if not remaining:
                break
        self.builds += 1
        return owners

    def page(self, page: int) -> array[int]:
        pages = self._pages
        owners = pages.get(page)
        if owners is None:
            owners = self._resolve(page)
            pages[page] = owners
            if len(pages) > self.budget:
                pages.popitem(last=False)
        else:
            pages.move_to_end(page)
        return owners

    def owner(self, block: int) -> int:
        return self.page(block // PAGE_BLOCKS)[block % PAGE_BLOCKS]

    def sole_owner(self, first: int, count: int) -> int:
        """The owner of every block of a range inside one page, or -1 if they differ (or the
        range crosses a page): the common small read, answered without building runs."""
        page, i = divmod(first, PAGE_BLOCKS)
        if i + count > PAGE_BLOCKS:
            return -1
        owners = self._pages.get(page)
        if owners is None:
            owners = self.page(page)
        else:
            self._pages.move_to_end(page)  # page() written out: this runs for every read
        v = owners[i]
        return v if count == 1 or _uniform(owners, i, i + count, v) else -1

    def runs(self, first: int, count: int) -> list[tuple[int, int]]:
        """(owner, blocks) runs covering the range, in order."""
        out: list[tuple[int, int]] = []
        while count > 0:
            page, i = divmod(first, PAGE_BLOCKS)
            n = min(count, PAGE_BLOCKS - i)
            owners = self.page(page)
            end = i + n
            j = i
            while j < end:
                v = owners[j]
                if _uniform(owners, j, end, v):
                    k = end
                else:
                    k = j + 1
                    while k < end and owners[k] == v:
                        k += 1
                if out and out[-1][0] == v:
                    out[-1] = (v, out[-1][1] + k - j)
                else:
                    out.append((v, k - j))
                j = k
            first += n
            count -= n
        return out

    def set_owner(self, first: int, count: int, slot: int) -> None:
        """Blocks now come from `slot` (a write to the head, or ZERO_OWNER for zeroing)."""
        pages = self._pages
        if count == 1:  # an allocating 4 KiB write
            owners = pages.get(first // PAGE_BLOCKS)
            if owners is not None:
                owners[first % PAGE_BLOCKS] = slot
            return
        while count > 0:
            page, i = divmod(first, PAGE_BLOCKS)
            n = min(count, PAGE_BLOCKS - i)
            owners = pages.get(page)
            if owners is not None:
                if n == 1:
                    owners[i] = slot
                else:
                    owners[i : i + n] = array("H", [slot]) * n
            first += n
            count -= n


def _uniform(owners: array[int], start: int, end: int, value: int) -> bool:
    """Whether owners[start:end] are all `value` (checked at C speed)."""
    if end - start <= 1:
        return True
    seg = owners[start:end]
    return seg.count(value) == len(seg)
