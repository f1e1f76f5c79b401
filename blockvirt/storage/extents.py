"""A set of byte ranges (pure; no I/O): what changed in a volume since a snapshot.

Ranges are kept sorted, disjoint and merged wherever they touch, in two parallel lists of
starts and ends, so finding the ranges around an offset is a bisection and answering a span
costs only the runs it returns, however many ranges the set holds.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable


class ExtentSet:
    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        """`ranges`: (offset, length) pairs, in any order, overlapping or not."""
        self._starts: list[int] = []
        self._ends: list[int] = []
        for offset, length in ranges:
            self.add(offset, length)

    def add(self, offset: int, length: int) -> None:
        """Add [offset, offset + length), merging it with every range it overlaps or touches."""
        if length <= 0:
            return
        end = offset + length
        starts, ends = self._starts, self._ends
        i = bisect_left(ends, offset)  # the first range that ends at or after `offset`
        j = bisect_right(starts, end)  # past the last range that starts at or before `end`
        if i == j:
            starts.insert(i, offset)
            ends.insert(i, end)
            return
        starts[i:j] = [min(offset, starts[i])]
        ends[i:j] = [max(end, ends[j - 1])]

    def runs(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """(length, in the set) runs from `offset`, alternating, covering [offset, offset +
        length) or as much of it as `limit` runs reach."""
        starts, ends = self._starts, self._ends
        n = len(starts)
        end = offset + length
        pos = offset
        i = bisect_right(ends, offset)  # the first range that ends after `offset`
        out: list[tuple[int, bool]] = []
        while pos < end and len(out) < limit:
            if i < n and starts[i] <= pos:
                stop = min(ends[i], end)
                out.append((stop - pos, True))
                i += 1
            else:
                stop = min(starts[i], end) if i < n else end
                out.append((stop - pos, False))
            pos = stop
        return out

    def ranges(self) -> list[tuple[int, int]]:
        """(offset, length) of every range, in order."""
        return [(s, e - s) for s, e in zip(self._starts, self._ends, strict=True)]

    def clipped(self, size: int) -> list[tuple[int, int]]:
        """The ranges cut at `size` (what lies inside a volume of that size)."""
        return [(s, min(e, size) - s) for s, e in zip(self._starts, self._ends, strict=True) if s < size]

    @property
    def total(self) -> int:
        """Bytes in the set."""
        return sum(self._ends) - sum(self._starts)

    def __len__(self) -> int:
        return len(self._starts)
