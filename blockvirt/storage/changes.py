"""What changed in an open export since an older snapshot, kept current while it is asked.

A `ChangedSince` is the answer for one (export, snapshot) pair, shared by everyone who holds
it. It starts from the backend's `changed_extents` (what may differ between the snapshot and
the export's point in time) and, for a volume's head, grows with every change a guest makes
afterwards: the first holder of a head puts a `ChangeFilter` into its graph, the last one
takes it out. A snapshot export never changes, so its answer is computed once.

Edits that change a head's contents behind its graph (a revert, a resize) make its answers
stale (`invalidate`); the next question rebuilds them. Merges, flattens and migrations move
data without changing what the head reads, so an answer stays true across them. When the
backend cannot answer any more (the snapshot was deleted, or a revert or flatten left it off
the head's branch), everything counts as changed: more is allowed, never less.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from blockvirt.storage import executor
from blockvirt.storage.backend import VolumeBackend, VolumeRecord
from blockvirt.storage.catalog import CatalogError
from blockvirt.storage.export import Export
from blockvirt.storage.extents import ExtentSet
from blockvirt.storage.filters.changes import ChangeFilter

log = logging.getLogger("blockvirt.changes")

#: What "everything changed" covers: past the end of any volume.
EVERYTHING = 1 << 64

Locate = Callable[[str], tuple[VolumeBackend, VolumeRecord]]


class ChangedSince:
    """Byte ranges of `export` that may differ from snapshot `since` of its volume."""

    def __init__(self, tracking: ChangeTracking, export: Export, since: str) -> None:
        self.tracking = tracking
        self.export = export
        self.since = since
        self.holders = 0
        #: The answer, or None while it must be (re)built.
        self.extents: ExtentSet | None = None
        #: Bumped when the answer goes stale, so a build that straddled the edit is dropped.
        self.generation = 0
        self._lock = asyncio.Lock()

    async def current(self) -> ExtentSet:
        """The answer now (built from storage first if it is stale)."""
        extents = self.extents
        if extents is not None:
            return extents
        async with self._lock:
            while self.extents is None:
                await self.tracking.build(self)
            return self.extents

    async def runs(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """(length, changed) runs from `offset`: at most `limit`, none past the span."""
        return (await self.current()).runs(offset, length, limit)


class ChangeTracking:
    """Every `ChangedSince` held in the process, and the filters that keep heads' answers
    current."""

    def __init__(self, locate: Locate) -> None:
        self.locate = locate
        self._views: dict[tuple[Export, str], ChangedSince] = {}
        self._filters: dict[Export, ChangeFilter] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, export: Export, since: str) -> ChangedSince:
        """The shared answer for (export, since), held until `release`."""
        async with self._lock:
            view = self._views.get((export, since))
            if view is None:
                if export.snapshot is None and export not in self._filters:
                    # Drained: no change may be under way that the filter would not see.
                    async with export.drained():
                        filt = ChangeFilter(export.child)
                        export.insert(filt)
                    self._filters[export] = filt
                view = self._views[(export, since)] = ChangedSince(self, export, since)
            view.holders += 1
        try:
            await view.current()
        except BaseException:
            await self.release(view)
            raise
        return view

    async def release(self, view: ChangedSince) -> None:
        async with self._lock:
            view.holders -= 1
            if view.holders:
                return
            export = view.export
            del self._views[(export, view.since)]
            filt = self._filters.get(export)
            if filt is None:
                return
            if view.extents is not None and view.extents in filt.sets:
                filt.sets.remove(view.extents)
            if any(v.export is export for v in self._views.values()):
                return
            del self._filters[export]
            async with export.drained():
                export.remove(filt)

    def invalidate(self, volume: str) -> None:
        """The volume's head changed behind its graph (a revert, a resize): rebuild its
        answers at their next use."""
        for (export, _), view in self._views.items():
            if export.volume == volume and export.snapshot is None:
                self._forget(view)

    def _forget(self, view: ChangedSince) -> None:
        filt = self._filters.get(view.export)
        if filt is not None and view.extents is not None and view.extents in filt.sets:
            filt.sets.remove(view.extents)
        view.extents = None
        view.generation += 1

    async def build(self, view: ChangedSince) -> None:
        """Ask the backend for `view`'s answer; changes made meanwhile are added to it."""
        export = view.export
        generation = view.generation
        marks = ExtentSet()
        filt = self._filters.get(export)
        if filt is not None:
            filt.sets.append(marks)  # from now on, before storage is asked
        try:
            try:
                backend, rec = self.locate(export.volume)
                extents = await backend.changed_extents(rec, view.since, export.snapshot)
            except CatalogError as e:
                log.warning(
                    "changes of %s since %s: %s; everything counts as changed",
                    export.export_name,
                    view.since,
                    e.message,
                    extra={"volume": export.volume},
                )
                extents = [(0, EVERYTHING)]
            answer = await executor.run(ExtentSet, extents)  # many extents take a while
        finally:
            if filt is not None:
                filt.sets.remove(marks)
        if view.generation != generation:  # an edit made this answer stale already
            return
        # No await from here on: `answer` takes the marks' place in one step.
        for offset, length in marks.ranges():
            answer.add(offset, length)
        if filt is not None:
            filt.sets.append(answer)
        view.extents = answer
