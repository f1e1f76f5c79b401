"""The block graph's node interface.

A node answers reads, writes, zeroing, trims, flushes and allocation queries for a byte range.
Callers (the server's dispatch) have validated ranges already; nodes assert, they do not
re-check peer input. A node may also offer a synchronous fast path (`read_nowait`), which
returns None whenever the data cannot be had without blocking, so the caller falls back to
the async method.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Buffer = bytes | bytearray | memoryview
#: How a submitted read ends: its data, or the error.
ReadDone = Callable[[Buffer | None, "StorageError | None"], None]
#: How a submitted write ends: None, or the error.
WriteDone = Callable[["StorageError | None"], None]

#: A piece of a sparse read: (offset, length, data), data None meaning "reads as zeros".
Segment = tuple[int, int, Buffer | None]

#: Reads shorter than this are one data segment on every node (looking for holes does not
#: pay below it): read_sparse(_nowait) answers them as read(_nowait) would, so a caller may
#: call read(_nowait) for them directly.
SPARSE_READ_MIN = 256 * 1024

#: base:allocation flags, mirrored here so storage does not import the protocol package.
HOLE = 1
ZERO = 2


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a node can do; export flags and block sizes are derived from this."""

    writable: bool = True
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    #: One shared cache for every connection (so FLUSH on one covers all): true for our nodes.
    can_multi_conn: bool = True
    can_extents: bool = True
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 32 * 1024 * 1024


class StorageError(Exception):
    """A storage operation failed; `errno` is the host errno (mapped to NBD at the edge)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class BlockNode(abc.ABC):
    """Base of every node. Subclasses implement the abstract operations."""

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        """Data if available without blocking the loop, else None."""
        return None

    def read_sparse_nowait(self, offset: int, length: int) -> Sequence[Segment] | None:
        """Like read_sparse, if possible without blocking the loop, else None (see
        SPARSE_READ_MIN)."""
        data = self.read_nowait(offset, length)
        return None if data is None else [(offset, length, data)]

    def read_view_nowait(self, offset: int, length: int) -> Sequence[Segment] | None:
        """Like read_sparse_nowait, but the data may be views of storage's own cache
        (no copy), which show later writes: the caller hands them on (a socket send copies
        them) before it next yields to the event loop, and keeps no reference."""
        return self.read_sparse_nowait(offset, length)

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        """Complete a (non-FUA) write without blocking the loop if possible; True if done."""
        return False

    def write_fua_nowait(self, offset: int, data: Buffer) -> bool:
        """The write half of a FUA write without blocking the loop, if the node can make it
        durable later by sync_nowait or sync; True if written. The caller must not answer
        the request before one of those has succeeded."""
        return False

    def sync_nowait(self) -> bool:
        """Make every write completed so far durable without awaiting, if that is quick
        (see write_fua_nowait); True if done, False: await sync() instead."""
        return False

    # Started now, answered by a callback: for nodes whose I/O completes elsewhere (librbd),
    # a request needs no task of its own. `done` runs on the loop once the op has ended,
    # never from within the call that started it. False: not started, use read()/write().
    def read_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        """Start a read; `done(data, None)` or `done(None, error)` when it ends."""
        return False

    def write_submit(self, offset: int, data: Buffer, done: WriteDone) -> bool:
        """Start a (non-FUA) write of `data` (left untouched until `done`); `done(None)` or
        `done(error)` when it ends."""
        return False

    async def sync(self) -> None:
        """Make every write completed so far durable: the second half of FUA writes taken
        by write_fua_nowait (not a client's FLUSH, though it may cost one)."""
        await self.flush()

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> Buffer: ...

    async def read_sparse(self, offset: int, length: int) -> Sequence[Segment]:
        """Read as segments so holes can be sent as holes. Default: one data segment."""
        return [(offset, length, await self.read(offset, length))]

    @abc.abstractmethod
    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None: ...

    @abc.abstractmethod
    async def zero(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None: ...

    async def fast_zero_possible(self) -> bool:
        """Whether `zero` is cheaper than writing zeros (for NBD_CMD_FLAG_FAST_ZERO)."""
        return self.capabilities().can_fast_zero

    @abc.abstractmethod
    async def trim(self, offset: int, length: int, fua: bool = False) -> None: ...

    @abc.abstractmethod
    async def flush(self) -> None: ...

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch hint; must not change contents."""

    async def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        """(length, HOLE|ZERO flags) extents from `offset`, covering at least one byte."""
        return [(length, 0)]

    async def allocation_depth(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        """(length, depth) extents for qemu:allocation-depth: 1 = this node, 0 = unallocated."""
        return [(ln, 0 if flags & HOLE else 1) for ln, flags in await self.block_status(offset, length)]

    async def close(self) -> None:
        """Release resources; data already flushed by the caller."""

    def allocated_bytes(self) -> int:
        return self.size


class FilterNode(BlockNode):
    """A node over one `child`: forwards every operation it does not override."""

    def __init__(self, child: BlockNode) -> None:
        self.child = child

    @property
    def size(self) -> int:
        return self.child.size

    def capabilities(self) -> Capabilities:
        return self.child.capabilities()

    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        return self.child.read_nowait(offset, length)

    def read_sparse_nowait(self, offset: int, length: int) -> Sequence[Segment] | None:
        return self.child.read_sparse_nowait(offset, length)

    def read_view_nowait(self, offset: int, length: int) -> Sequence[Segment] | None:
        # A filter that changes what reads return overrides this too (or makes it answer
        # read_sparse_nowait's copies).
        return self.child.read_view_nowait(offset, length)

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        return self.child.write_nowait(offset, data)

    def write_fua_nowait(self, offset: int, data: Buffer) -> bool:
        return self.child.write_fua_nowait(offset, data)

    def sync_nowait(self) -> bool:
        return self.child.sync_nowait()

    async def sync(self) -> None:
        await self.child.sync()

    async def read(self, offset: int, length: int) -> Buffer:
        return await self.child.read(offset, length)

    async def read_sparse(self, offset: int, length: int) -> Sequence[Segment]:
        return await self.child.read_sparse(offset, length)

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self.child.write(offset, data, fua)

    async def zero(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        await self.child.zero(offset, length, may_trim, fua)

    async def fast_zero_possible(self) -> bool:
        return await self.child.fast_zero_possible()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.child.trim(offset, length, fua)

    async def flush(self) -> None:
        await self.child.flush()

    async def cache(self, offset: int, length: int) -> None:
        await self.child.cache(offset, length)

    async def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        return await self.child.block_status(offset, length)

    async def allocation_depth(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        return await self.child.allocation_depth(offset, length)

    async def close(self) -> None:
        await self.child.close()

    def allocated_bytes(self) -> int:
        return self.child.allocated_bytes()
