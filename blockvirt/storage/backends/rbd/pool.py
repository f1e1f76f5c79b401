"""RbdPool: the images of the connection's pool (create, clone, remove, list) and its figures.

All calls are blocking in the bindings and run on the connection's control threads.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import rbd

from blockvirt.storage.backends.rbd.cluster import CephConnection
from blockvirt.storage.backends.rbd.errors import CephError, from_exception
from blockvirt.storage.backends.rbd.image import AsyncImage
from blockvirt.storage.node import StorageError

T = TypeVar("T")

#: layering, exclusive-lock, object-map, fast-diff, deep-flatten: clones, one writer at a
#: time, cheap diffs and allocation maps, snapshots that survive flattening.
DEFAULT_FEATURES = (
    rbd.RBD_FEATURE_LAYERING
    | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
    | rbd.RBD_FEATURE_OBJECT_MAP
    | rbd.RBD_FEATURE_FAST_DIFF
    | rbd.RBD_FEATURE_DEEP_FLATTEN
)


@dataclass(frozen=True, slots=True)
class PoolQuota:
    max_bytes: int  # 0: none
    max_objects: int
    full: bool  # the pool is flagged full (an OSD is full, or the quota is reached)
    full_quota: bool  # ... because of its quota


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Usage figures. Byte and object counts come from PG statistics, which a ceph-mgr
    reports: on a cluster without one they stay 0. Image figures are counted by librbd."""

    stored_bytes: int
    objects: int
    images: int
    provisioned_bytes: int  # sum of the images' sizes
    snapshots: int
    trash_images: int
    quota: PoolQuota


@dataclass(frozen=True, slots=True)
class TrashEntry:
    """An image in the pool's RBD trash."""

    id: str
    name: str
    #: Snapshots it still has (with clone v2, those that clones still read).
    snapshots: int
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class PoolUsage:
    """The pool's line of `ceph df` (PG statistics: a mgr must run) and its byte quota."""

    stored: int  # data in the pool, before replication
    max_avail: int  # what the pool can still take (replication and full ratios counted)
    objects: int
    quota_bytes: int  # 0: none


class RbdPool:
    """The RBD images of `conn`'s pool."""

    def __init__(self, conn: CephConnection) -> None:
        self.conn = conn
        self._rbd = rbd.RBD()

    @property
    def name(self) -> str:
        return self.conn.config.pool

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        session = self.conn.session

        def call() -> T:
            try:
                return fn(session.ioctx, *args, **kwargs)
            except Exception as e:
                raise from_exception(e, what) from e

        try:
            return await session.run(call)
        except StorageError as e:
            self.conn.note_error(session, e.errno)
            raise

    async def create(
        self, name: str, size: int, *, features: int | None = None, order: int | None = None
    ) -> None:
        """Create an image; `order` is log2 of the object size (default 22: 4 MiB)."""
        await self._call(
            f"create {name}",
            self._rbd.create,
            name,
            size,
            order=order,
            old_format=False,
            features=DEFAULT_FEATURES if features is None else features,
        )

    async def remove(self, name: str) -> None:
        """Delete an image and its data (its snapshots must be gone; it must not be open)."""
        await self._call(f"remove {name}", self._rbd.remove, name)

    async def trash_move(self, name: str, delay: int = 0) -> None:
        await self._call(f"trash {name}", self._rbd.trash_move, name, delay)

    async def trash(self) -> list[TrashEntry]:
        """The images in the trash, with what is left of their snapshots and metadata."""

        def do(ioctx: Any) -> list[TrashEntry]:
            out = []
            for t in self._rbd.trash_list(ioctx):
                try:
                    with rbd.Image(ioctx, image_id=t["id"], read_only=True) as img:
                        snaps = len(list(img.list_snaps()))
                        meta = {str(k): str(v) for k, v in img.metadata_list()}
                except rbd.ImageNotFound:  # removed meanwhile
                    continue
                out.append(TrashEntry(str(t["id"]), str(t["name"]), snaps, meta))
            return out

        return await self._call("trash list", do)

    async def trash_remove(self, image_id: str) -> None:
        """Delete an image from the trash (it must have no snapshots left)."""
        await self._call(f"trash remove {image_id}", self._rbd.trash_remove, image_id, True)

    async def rename(self, old: str, new: str) -> None:
        await self._call(f"rename {old}", self._rbd.rename, old, new)

    async def list(self) -> list[str]:
        names = await self._call("list images", self._rbd.list)
        return sorted(str(n) for n in names)

    async def exists(self, name: str) -> bool:
        return name in await self.list()

    async def clone(
        self,
        parent: str,
        parent_snap: str,
        name: str,
        *,
        features: int | None = None,
    ) -> None:
        """A copy-on-write child of `parent@parent_snap` (same pool). With clone format 2 the
        snapshot needs no protect, and removing it later moves it to the trash."""

        def do(ioctx: Any) -> None:
            self._rbd.clone(
                ioctx,
                parent,
                parent_snap,
                ioctx,
                name,
                features=DEFAULT_FEATURES if features is None else features,
            )

        await self._call(f"clone {parent}@{parent_snap} to {name}", do)

    async def open(self, name: str, **kwargs: Any) -> AsyncImage:
        """AsyncImage.open on this pool (snapshot=, read_only=, queue_depth=)."""
        return await AsyncImage.open(self.conn, name, **kwargs)

    async def trash_purge(self) -> None:
        await self._call("trash purge", self._rbd.trash_purge)

    # ------------------------------------------------------------------ figures

    async def quota(self) -> PoolQuota:
        """The pool's quota and full flags, from the OSD map (no mgr needed)."""
        pools = await self.conn.mon_command("osd pool ls", detail="detail")
        for p in pools or []:
            if p.get("pool_name") == self.name:
                flags = str(p.get("flags_names", "")).split(",")
                return PoolQuota(
                    max_bytes=int(p.get("quota_max_bytes", 0)),
                    max_objects=int(p.get("quota_max_objects", 0)),
                    full="full" in flags or "full_quota" in flags,
                    full_quota="full_quota" in flags,
                )
        raise CephError("no-pool", f"pool {self.name!r} does not exist", errno.ENOENT)

    async def usage(self) -> PoolUsage:
        """Per-pool usage, as `ceph df` shows it (all zero on a cluster without a mgr)."""
        df = await self.conn.mon_command("df")
        quota = await self.quota()
        for p in (df or {}).get("pools", []):
            if p.get("name") == self.name:
                st = p.get("stats", {})
                return PoolUsage(
                    int(st.get("stored", 0)), int(st.get("max_avail", 0)), int(st.get("objects", 0)),
                    quota.max_bytes,
                )  # fmt: skip
        raise CephError("no-pool", f"pool {self.name!r} does not exist", errno.ENOENT)

    async def stats(self) -> PoolStats:
        def do(ioctx: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            return dict(ioctx.get_stats()), dict(self._rbd.pool_stats_get(ioctx))

        raw, images = await self._call("pool stats", do)
        return PoolStats(
            stored_bytes=int(raw.get("num_bytes", 0)),
            objects=int(raw.get("num_objects", 0)),
            images=int(images.get("image_count", 0)),
            provisioned_bytes=int(images.get("image_provisioned_bytes", 0)),
            snapshots=int(images.get("image_snap_count", 0)),
            trash_images=int(images.get("trash_count", 0)),
            quota=await self.quota(),
        )
