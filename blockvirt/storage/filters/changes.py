"""Change tracking as a filter: while someone asks what changed in a live volume since a
snapshot, a `ChangeFilter` sits below the export's root and adds the range of every write,
zeroing and trim to the sets that watch it.

A range is added once the change has returned from the node below (failed ones too: they may
have changed part of it), so a set built from storage at any moment, then watched, misses
nothing: a change that completed before the build is in storage's answer, any later one is
added here. The filter is only in the graph while a set watches it: the data path pays
nothing otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

from blockvirt.storage.extents import ExtentSet
from blockvirt.storage.node import BlockNode, Buffer, FilterNode

#: Ranges are widened to this grain, the finest any backend tracks (file pools: their 4 KiB
#: block), so a live set and one rebuilt from storage give the same answer.
GRAIN = 4096


class ChangeFilter(FilterNode):
    def __init__(self, child: BlockNode) -> None:
        super().__init__(child)
        #: The sets every change is added to.
        self.sets: list[ExtentSet] = []

    def _mark(self, offset: int, length: int) -> None:
        start = offset - offset % GRAIN
        end = -(-(offset + length) // GRAIN) * GRAIN
        for s in self.sets:
            s.add(start, end - start)

    def _marked(self, write: Callable[[int, Buffer], bool], offset: int, data: Buffer) -> bool:
        """A synchronous write through `write`: marked if done, or if it failed midway."""
        try:
            done = write(offset, data)
        except BaseException:
            self._mark(offset, len(data))
            raise
        if done:
            self._mark(offset, len(data))
        return done

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        return self._marked(self.child.write_nowait, offset, data)

    def write_fua_nowait(self, offset: int, data: Buffer) -> bool:
        return self._marked(self.child.write_fua_nowait, offset, data)

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        try:
            await self.child.write(offset, data, fua)
        finally:
            self._mark(offset, len(data))

    async def zero(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        try:
            await self.child.zero(offset, length, may_trim, fua)
        finally:
            self._mark(offset, length)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        try:
            await self.child.trim(offset, length, fua)
        finally:
            self._mark(offset, length)
