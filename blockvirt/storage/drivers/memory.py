"""RAM-backed node for tests and benchmarks: sparse at 4 KiB granularity."""

from __future__ import annotations

from collections.abc import Sequence

from blockvirt.storage.node import HOLE, ZERO, BlockNode, Buffer, Capabilities

BLOCK = 4096


class MemoryNode(BlockNode):
    def __init__(self, size: int, *, read_only: bool = False) -> None:
        self._size = size
        self.read_only = read_only
        self.data = bytearray(size)
        self.allocated: set[int] = set()
        self.flushes = 0

    @property
    def size(self) -> int:
        return self._size

    def capabilities(self) -> Capabilities:
        return Capabilities(writable=not self.read_only)

    def allocated_bytes(self) -> int:
        return len(self.allocated) * BLOCK

    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        return bytes(self.data[offset : offset + length])

    async def read(self, offset: int, length: int) -> Buffer:
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.data[offset : offset + len(data)] = data
        self.allocated.update(range(offset // BLOCK, (offset + len(data) + BLOCK - 1) // BLOCK))

    async def zero(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        self.data[offset : offset + length] = bytes(length)
        first, last = -(-offset // BLOCK), (offset + length) // BLOCK
        if may_trim:
            self.allocated.difference_update(range(first, last))

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.zero(offset, length, may_trim=True)

    async def flush(self) -> None:
        self.flushes += 1

    async def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos, end = offset, min(offset + length, self._size)
        while pos < end:
            blk = pos // BLOCK
            flags = 0 if blk in self.allocated else HOLE | ZERO
            stop = min((blk + 1) * BLOCK, end)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + stop - pos, flags)
            else:
                out.append((stop - pos, flags))
            pos = stop
        return out
