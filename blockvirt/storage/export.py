"""An export: the root of one volume's (or one snapshot's) block graph.

    sessions ──> Export (gate: drain, in-flight count) ──> [filters: mirror, ...] ──> backend node

Every session of an export holds the same `Export`, so CAN_MULTI_CONN's flush semantics hold.
The export is also the gate of its graph: `drained()` holds new requests and waits for the
ones in flight, and graph edits happen inside it (a snapshot swaps the backend's layers, a
migration inserts its mirror filter). Because the gate sits above everything that may be
inserted, a request that was held sees the new graph when it resumes (the QEMU
BlockBackend shape: drain at the root, edit below it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from blockvirt.storage.backend import VolumeRecord
from blockvirt.storage.node import BlockNode, Buffer, FilterNode, ReadDone, Segment, StorageError, WriteDone
from blockvirt.storage.stats import VolumeStats

#: The synchronous paths that the root binds to the top node's own methods while it is open.
_FAST_PATHS = ("read_nowait", "read_sparse_nowait", "read_view_nowait", "write_nowait", "write_fua_nowait")


class Export(FilterNode):
    """The root node of an export; `base` is the backend's node at the bottom."""

    def __init__(
        self,
        record: VolumeRecord,
        base: BlockNode,
        *,
        snapshot: str | None = None,
        stats: VolumeStats | None = None,
    ) -> None:
        super().__init__(base)
        self.record = record
        self.base = base
        self.snapshot = snapshot
        #: Open NBD sessions on this export (the server counts them).
        self.users = 0
        #: Sessions whose client has left while their last requests and flush finish: they no
        #: longer count as users, but an edit waits for them (settled()) before it refuses.
        self.leaving = 0
        self._settled = asyncio.Event()
        self._settled.set()
        self.stats = stats if stats is not None else VolumeStats()
        self._paused = False
        self._resume = asyncio.Event()
        self._resume.set()
        self._inflight = 0
        self._idle: asyncio.Future[None] | None = None
        self._edit = asyncio.Lock()
        self._open_fast_paths()

    def leave(self) -> None:
        """A session's client left (DISC, or the connection closed); its ending runs on."""
        self.users -= 1
        self.leaving += 1
        self._settled.clear()

    def left(self) -> None:
        """A session that leave() counted has finished."""
        self.leaving -= 1
        if not self.leaving:
            self._settled.set()

    async def settled(self) -> None:
        await self._settled.wait()

    @property
    def export_name(self) -> str:
        return self.record.name if self.snapshot is None else f"{self.record.name}@{self.snapshot}"

    @property
    def volume(self) -> str:
        return self.record.name

    # ------------------------------------------------------------ the gate
    # While the gate is open, the synchronous fast paths cost nothing here: the instance's
    # read_nowait / read_sparse_nowait / read_view_nowait / write_nowait are the top node's
    # own bound methods (every inline request skips one call). Closing the gate drops them,
    # so the class's methods below answer, and refuse; opening it binds the (possibly new)
    # top again.
    def _open_fast_paths(self) -> None:
        child = self.child
        self.read_nowait = child.read_nowait  # type: ignore[method-assign]
        self.read_sparse_nowait = child.read_sparse_nowait  # type: ignore[method-assign]
        self.read_view_nowait = child.read_view_nowait  # type: ignore[method-assign]
        self.write_nowait = child.write_nowait  # type: ignore[method-assign]
        self.write_fua_nowait = child.write_fua_nowait  # type: ignore[method-assign]

    def _close_fast_paths(self) -> None:
        for name in _FAST_PATHS:
            self.__dict__.pop(name, None)

    @contextlib.asynccontextmanager
    async def drained(self) -> AsyncIterator[None]:
        """Hold new requests and wait for in-flight ones: graph edits happen inside."""
        async with self._edit:
            self._paused = True
            self._close_fast_paths()
            self._resume.clear()
            try:
                while self._inflight:
                    self._idle = asyncio.get_running_loop().create_future()
                    await self._idle
                yield
            finally:
                self._paused = False
                self._open_fast_paths()
                self._resume.set()

    async def _enter(self) -> None:
        while self._paused:
            await self._resume.wait()
        self._inflight += 1

    def _leave(self) -> None:
        self._inflight -= 1
        if not self._inflight and self._idle is not None:
            idle, self._idle = self._idle, None
            if not idle.done():
                idle.set_result(None)

    # ------------------------------------------------------------ graph edits (drained)
    def insert(self, node: FilterNode) -> None:
        """Put a filter right below the root (only while drained); its child must be the
        current top."""
        assert self._paused and node.child is self.child, "insert a filter over the top, drained"
        self.child = node

    def remove(self, node: FilterNode) -> None:
        """Take out a filter `insert` put in (only while drained)."""
        assert self._paused, "remove a filter while drained"
        parent: FilterNode = self
        while parent.child is not node:
            child = parent.child
            assert isinstance(child, FilterNode), "the filter is not in this graph"
            parent = child
        parent.child = node.child

    def replace_base(self, node: BlockNode) -> None:
        """Serve from another backend's node from now on (only while drained, with no filter
        left in between: a migration's switch)."""
        assert self._paused and self.child is self.base, "swap the base drained, filters out"
        self.base = node
        self.child = node

    def filters(self) -> list[FilterNode]:
        """The filters between the root and the base, top first."""
        out: list[FilterNode] = []
        node = self.child
        while node is not self.base:
            assert isinstance(node, FilterNode)
            out.append(node)
            node = node.child
        return out

    # ------------------------------------------------------------ I/O through the gate
    # Reads and changes are counted in flight; the *_nowait paths are synchronous (nothing
    # can interleave with them) and only refuse while an edit is under way (these are the
    # class's methods, reached only while the gate is closed: see _open_fast_paths).
    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        if self._paused:
            return None
        return self.child.read_nowait(offset, length)

    def read_sparse_nowait(self, offset: int, length: int) -> Sequence[Segment] | None:
        if self._paused:
            return None
        return self.child.read_sparse_nowait(offset, length)

    def read_view_nowait(self, offset: int, length: int) -> Sequence[Segment] | None:
        if self._paused:
            return None
        return self.child.read_view_nowait(offset, length)

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        if self._paused:
            return False
        return self.child.write_nowait(offset, data)

    def write_fua_nowait(self, offset: int, data: Buffer) -> bool:
        if self._paused:
            return False
        return self.child.write_fua_nowait(offset, data)

    # Submitted requests are counted in flight until their callback, so a drain waits for them.
    def read_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        if self._paused:
            return False
        self._inflight += 1

        def ended(data: Buffer | None, err: StorageError | None) -> None:
            self._leave()
            done(data, err)

        if self.child.read_submit(offset, length, ended):
            return True
        self._leave()
        return False

    def write_submit(self, offset: int, data: Buffer, done: WriteDone) -> bool:
        if self._paused:
            return False
        self._inflight += 1

        def ended(err: StorageError | None) -> None:
            self._leave()
            done(err)

        if self.child.write_submit(offset, data, ended):
            return True
        self._leave()
        return False

    async def read(self, offset: int, length: int) -> Buffer:
        await self._enter()
        try:
            return await self.child.read(offset, length)
        finally:
            self._leave()

    async def read_sparse(self, offset: int, length: int) -> Sequence[Segment]:
        await self._enter()
        try:
            return await self.child.read_sparse(offset, length)
        finally:
            self._leave()

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self._enter()
        try:
            await self.child.write(offset, data, fua)
        finally:
            self._leave()

    async def zero(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        await self._enter()
        try:
            await self.child.zero(offset, length, may_trim, fua)
        finally:
            self._leave()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._enter()
        try:
            await self.child.trim(offset, length, fua)
        finally:
            self._leave()

    # FLUSH (and sync_nowait, the second half of an inline FUA write), CACHE and block
    # status pass ungated, as they always did: none of them changes
    # what the graph holds, and a drain must not wait for an fdatasync (a snapshot under
    # write load would then stall every initiator for as long as the sync takes).

    async def close(self) -> None:
        """Nothing: the backend owns what its node holds (the export cache releases it)."""
