"""Active mirroring as a filter (the QEMU mirror-top shape).

While a volume migrates, a `MirrorFilter` sits between the export's root and its backend node.
Every change a guest makes (write, zeroing, trim) completes on the source first and is then
copied to the replica before the guest's request completes; a guest FLUSH or FUA also makes
the replica durable. Reads pass through untouched. The filter is inserted and removed only
while the export is drained, so no request straddles either edit.

What "copy to the replica" means is the replica's business (`Replica`): a copy of the same
copy-on-write layer in another pool, or a volume in another kind of storage.
"""

from __future__ import annotations

from typing import Protocol

from blockvirt.storage.node import BlockNode, Buffer, FilterNode


class Replica(Protocol):
    """Where a mirror filter sends the guest's changes."""

    async def changed(self, offset: int, length: int, fua: bool) -> None:
        """The source's bytes [offset, offset + length) changed (the change is complete on
        the source). Must not fail the guest: a replica that cannot keep up says so itself."""

    async def flush(self) -> None:
        """Make the replica as durable as the source after a guest FLUSH."""


class MirrorFilter(FilterNode):
    def __init__(self, child: BlockNode, replica: Replica) -> None:
        super().__init__(child)
        self.replica = replica

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        return False  # every change waits for its copy: the async path

    def write_fua_nowait(self, offset: int, data: Buffer) -> bool:
        return False

    def sync_nowait(self) -> bool:
        return False  # the replica must be made durable too

    async def sync(self) -> None:
        await self.flush()

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self.child.write(offset, data, fua)
        await self.replica.changed(offset, len(data), fua)

    async def zero(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        await self.child.zero(offset, length, may_trim, fua)
        await self.replica.changed(offset, length, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.child.trim(offset, length, fua)
        await self.replica.changed(offset, length, fua)

    async def flush(self) -> None:
        await self.child.flush()
        await self.replica.flush()
