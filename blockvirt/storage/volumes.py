"""Volumes: the catalog's records joined to open block nodes, one node per volume shared by
every connection (which is what makes CAN_MULTI_CONN's flush semantics hold)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from dataclasses import dataclass, field
from typing import Any

from blockvirt.storage import executor
from blockvirt.storage.catalog import DEFAULT_POOL, Catalog, CatalogError, VolumeRecord
from blockvirt.storage.drivers.raw import RawFileNode
from blockvirt.storage.node import BlockNode


@dataclass(slots=True)
class VolumeStats:
    """Absolute per-volume counters: plain ints bumped on the data path, read at scrape time."""

    ops: dict[str, int] = field(default_factory=dict)
    read_bytes: int = 0
    write_bytes: int = 0
    errors: int = 0

    def count(self, op: str) -> None:
        self.ops[op] = self.ops.get(op, 0) + 1


@dataclass(slots=True)
class Volume:
    record: VolumeRecord
    node: BlockNode
    #: Open NBD sessions on this volume (the registry counts them).
    users: int = 0
    stats: VolumeStats = field(default_factory=VolumeStats)


class VolumeManager:
    """Create, open, list and delete volumes. Management calls are serialised by one lock."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.catalog = Catalog(data_dir)
        self._open: dict[str, Volume] = {}
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ queries
    def record(self, name: str) -> VolumeRecord | None:
        return self.catalog.volume(name)

    def records(self) -> list[VolumeRecord]:
        return self.catalog.volumes()

    def volume(self, name: str) -> Volume | None:
        """The open volume, opening its node on first use (a quick, non-blocking open)."""
        vol = self._open.get(name)
        if vol is not None:
            return vol
        rec = self.catalog.volume(name)
        if rec is None:
            return None
        node = RawFileNode(self.catalog.volume_path(rec), thick=rec.thick)
        vol = Volume(rec, node)
        self._open[name] = vol
        return vol

    def info(self, name: str) -> dict[str, Any]:
        vol = self.volume(name)
        if vol is None:
            raise CatalogError("not-found", f"no volume named {name!r}")
        return volume_info(vol)

    def list_info(self) -> list[dict[str, Any]]:
        out = []
        for rec in self.records():
            vol = self.volume(rec.name)
            if vol is not None:
                out.append(volume_info(vol))
        return out

    # ------------------------------------------------------------ changes
    async def create(
        self, name: str, size: int, *, thick: bool = False, pool: str = DEFAULT_POOL
    ) -> dict[str, Any]:
        async with self._lock:
            rec = self.catalog.new_volume(name, size, thick, pool)
            path = self.catalog.volume_path(rec)
            try:
                # File first, fsynced, then the catalog row: a crash in between leaves only
                # an orphan file, never a record pointing at nothing.
                await executor.run(RawFileNode.create, path, size, thick=thick)
                await executor.run(_fsync_dir, os.path.dirname(path))
            except OSError as e:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CatalogError("no-space", f"pool {pool!r} has no room for {size} bytes") from e
                if e.errno == errno.EFBIG:
                    raise CatalogError("invalid", f"size {size} is too large for pool {pool!r}") from e
                raise
            await executor.run(self.catalog.insert_volume, rec)
        return self.info(name)

    async def delete(self, name: str) -> None:
        async with self._lock:
            rec = self.catalog.volume(name)
            if rec is None:
                raise CatalogError("not-found", f"no volume named {name!r}")
            vol = self._open.get(name)
            if vol is not None and vol.users:
                raise CatalogError(
                    "conflict", f"volume {name!r} has {vol.users} connected client(s); disconnect them first"
                )
            path = self.catalog.volume_path(rec)
            await executor.run(self.catalog.delete_volume, name)
            if vol is not None:
                del self._open[name]
                await vol.node.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def flush_all(self) -> None:
        for vol in list(self._open.values()):
            await vol.node.flush()

    async def close(self) -> None:
        for vol in list(self._open.values()):
            with contextlib.suppress(Exception):
                await vol.node.flush()
            await vol.node.close()
        self._open.clear()
        self.catalog.close()


def volume_info(vol: Volume) -> dict[str, Any]:
    rec = vol.record
    return {
        "name": rec.name,
        "size": rec.size,
        "thick": rec.thick,
        "pool": rec.pool,
        "allocated": vol.node.allocated_bytes(),
        "connections": vol.users,
        "created": rec.created,
    }


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
