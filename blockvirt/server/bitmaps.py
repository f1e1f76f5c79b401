"""The qemu:dirty-bitmap contexts one session selected, answered from storage's change tracking.

Context `qemu:dirty-bitmap:S` reports what may differ between snapshot S and the exported
point in time, with qemu's encoding: NBD_STATE_DIRTY (1) on changed extents, 0 elsewhere. The
storage answer is taken at the context's first BLOCK_STATUS and held until the session ends
(shared with every other session asking the same of the same export); each request is
answered from it for the span asked only, in at most MAX_EXTENTS extents.
"""

from __future__ import annotations

import asyncio
import logging

from blockvirt.nbd.constants import DirtyState
from blockvirt.nbd.contexts import dirty_bitmap_name
from blockvirt.storage.changes import ChangedSince, ChangeTracking
from blockvirt.storage.export import Export

#: Extents per context in one reply at most (8 bytes each): a request over a finely
#: fragmented range is answered in part, and the client asks again from where it stopped.
MAX_EXTENTS = 16384

_DIRTY = int(DirtyState.DIRTY)

log = logging.getLogger("blockvirt.bitmaps")


class SessionBitmaps:
    def __init__(self, tracking: ChangeTracking, export: Export, since: dict[int, str]) -> None:
        self.tracking = tracking
        self.export = export
        #: context id -> the snapshot its changes count from
        self.since = since
        self._views: dict[int, ChangedSince] = {}
        self._lock = asyncio.Lock()

    @classmethod
    def select(
        cls, tracking: ChangeTracking, export: Export, contexts: dict[int, str]
    ) -> SessionBitmaps | None:
        """The dirty-bitmap contexts among a session's `contexts`; None if it has none."""
        since = {cid: snap for cid, name in contexts.items() if (snap := dirty_bitmap_name(name)) is not None}
        return cls(tracking, export, since) if since else None

    def __contains__(self, cid: int) -> bool:
        return cid in self.since

    async def extents(self, cid: int, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
        """(length, flags) extents of context `cid` from `offset`, never past the span."""
        view = self._views.get(cid)
        if view is None:
            view = await self._acquire(cid)
        runs = await view.runs(offset, length, 1 if req_one else MAX_EXTENTS)
        return [(n, _DIRTY if changed else 0) for n, changed in runs]

    async def _acquire(self, cid: int) -> ChangedSince:
        async with self._lock:  # two requests at once acquire it once
            view = self._views.get(cid)
            if view is None:
                view = self._views[cid] = await self.tracking.acquire(self.export, self.since[cid])
            return view

    async def close(self) -> None:
        """The session ended: give back what it held."""
        async with self._lock:
            views, self._views = self._views, {}
        for view in views.values():
            try:
                await self.tracking.release(view)
            except Exception:  # the session must still end: log, and release the others
                log.exception("releasing the changes of %s since %s", self.export.export_name, view.since)
