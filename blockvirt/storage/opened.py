"""The cache of open exports: a volume's head or one of its snapshots, opened through its
backend on first use and shared by every session that opens the same name."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from blockvirt.storage.backend import VolumeBackend, VolumeRecord
from blockvirt.storage.export import Export
from blockvirt.storage.stats import VolumeStats

#: How long an edit waits for sessions whose clients left to finish (their last flush).
SETTLE_TIMEOUT = 10.0


class OpenExports:
    def __init__(self, *, metrics: bool) -> None:
        #: Per-export accounting on (off: `serve --no-metrics`, the data path counts nothing).
        self.metrics = metrics
        self._heads: dict[str, Export] = {}
        self._snaps: dict[tuple[str, str], Export] = {}
        self._owner: dict[int, VolumeBackend] = {}  # id(export) -> the backend that opened it

    def get(self, volume: str, snapshot: str | None = None) -> Export | None:
        """The export if it is open (never opens)."""
        return self._heads.get(volume) if snapshot is None else self._snaps.get((volume, snapshot))

    def open(self, backend: VolumeBackend, rec: VolumeRecord, snapshot: str | None = None) -> Export:
        """The open export, opened on first use."""
        exp = self.get(rec.name, snapshot)
        if exp is not None:
            return exp
        exp = Export(
            rec, backend.open(rec, snapshot), snapshot=snapshot, stats=VolumeStats(enabled=self.metrics)
        )
        if snapshot is None:
            self._heads[rec.name] = exp
        else:
            self._snaps[(rec.name, snapshot)] = exp
        self._owner[id(exp)] = backend
        return exp

    def __iter__(self) -> Iterator[Export]:
        yield from list(self._heads.values())
        yield from list(self._snaps.values())

    def of_volume(self, volume: str) -> list[Export]:
        """The volume's open exports: its head and its snapshots."""
        return [e for e in self if e.volume == volume]

    async def settle(self, volume: str) -> None:
        """Wait (at most SETTLE_TIMEOUT) for the volume's sessions whose clients have left to
        finish: a delete right after a client disconnected must not be refused because the
        server is still flushing that client's writes."""
        pending = [e.settled() for e in self.of_volume(volume) if e.leaving]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*pending), SETTLE_TIMEOUT)

    def users(self, volume: str, *, heads_only: bool = False) -> int:
        return sum(e.users for e in self.of_volume(volume) if not heads_only or e.snapshot is None)

    def rebind(self, export: Export, backend: VolumeBackend) -> None:
        """The export now serves from `backend`'s node (a migration switched it over)."""
        self._owner[id(export)] = backend

    def owner(self, export: Export) -> VolumeBackend:
        return self._owner[id(export)]

    def close(self, export: Export) -> None:
        """Forget the export and give its node back to its backend (nothing is flushed here)."""
        if export.snapshot is None:
            if self._heads.get(export.volume) is not export:
                return
            del self._heads[export.volume]
        else:
            key = (export.volume, export.snapshot)
            if self._snaps.get(key) is not export:
                return
            del self._snaps[key]
        self._owner.pop(id(export)).release(export.base)

    def close_volume(self, volume: str, *, keep: Callable[[Export], bool] = lambda e: False) -> None:
        for e in self.of_volume(volume):
            if not keep(e):
                self.close(e)

    def clear(self) -> None:
        """Forget every export without releasing (the backends close everything next)."""
        self._heads.clear()
        self._snaps.clear()
        self._owner.clear()
