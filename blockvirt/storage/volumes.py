"""Volumes, snapshots and clones: catalog records joined to open chain nodes.

Every volume is a chain of copy-on-write layers with one node shared by all its connections
(which is what makes CAN_MULTI_CONN's flush semantics hold). Tree edits (snapshot, revert,
clone, delete) change the catalog in one transaction and swap a node's layers only while
the node is drained, so an initiator never sees half an edit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from blockvirt.jobs.manager import CANCELLED, Job, JobManager
from blockvirt.storage import executor, migration
from blockvirt.storage.backends.cowfile import stream as streaming
from blockvirt.storage.backends.cowfile.chain import ChainNode
from blockvirt.storage.backends.cowfile.layer import Layer, layer_paths, remove_layer_files
from blockvirt.storage.backends.cowfile.layer_map import BLOCK, FULL_PAGE
from blockvirt.storage.backends.cowfile.registry import LayerRegistry
from blockvirt.storage.catalog import (
    DEFAULT_POOL,
    Catalog,
    CatalogError,
    LayerRecord,
    PoolRecord,
    SnapshotRecord,
    VolumeRecord,
    new_layer_id,
    validate_name,
    validate_size,
)
from blockvirt.storage.fileio import REAL, FileIO
from blockvirt.storage.node import StorageError
from blockvirt.storage.pools import LAYER_FILE_RE, Pools
from blockvirt.storage.stats import VolumeStats

log = logging.getLogger("blockvirt.volumes")

#: Refuse to grow a chain past this many layers (the merged index holds 16-bit owners, and
#: deep chains are a smell: flatten or delete snapshots).
MAX_CHAIN_DEPTH = 250
#: Warn (in the API answer and the log) past this depth.
WARN_CHAIN_DEPTH = 16


@dataclass(slots=True)
class Volume:
    """An export: a volume's head, or a snapshot (read-only)."""

    record: VolumeRecord
    node: ChainNode
    snapshot: str | None = None
    #: Open NBD sessions on this export (the registry counts them).
    users: int = 0
    stats: VolumeStats = field(default_factory=VolumeStats)

    @property
    def export_name(self) -> str:
        return self.record.name if self.snapshot is None else f"{self.record.name}@{self.snapshot}"


class VolumeManager:
    """Create, open, list and delete volumes and their snapshots. Tree edits are serialised."""

    def __init__(
        self, data_dir: str, *, io: FileIO = REAL, warn_depth: int = WARN_CHAIN_DEPTH, metrics: bool = True
    ) -> None:
        self.data_dir = data_dir
        #: Per-export accounting on (off: `serve --no-metrics`, the data path counts nothing).
        self.metrics = metrics
        self.io = io
        self.catalog = Catalog(data_dir)
        self.layers = LayerRegistry(self.catalog, io)
        self.jobs = JobManager(self.catalog)
        self.pools = Pools(self.catalog, self.layers, self.jobs)
        self.warn_depth = warn_depth
        self._open: dict[str, Volume] = {}
        self._snaps: dict[tuple[str, str], Volume] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._unlinks: set[asyncio.Future[None]] = set()  # file removals close() waits for
        #: Set by the server: disconnect every session of an export (for --force edits).
        self.disconnect: Any = None
        #: Set by the service: storage I/O control (blockvirt.qos.manager.QosManager).
        self.qos: Any = None

    async def start(self) -> None:
        """Resume interrupted jobs and collect garbage left by a crash."""
        await executor.run(self._collect_orphan_files)
        for job in self.jobs.pending():
            log.info("resuming job %s (%s on %s)", job.id, job.kind, job.volume, extra=job.log_extra())
            self.jobs.run(job, self._runner(job.kind))
        async with self._lock:
            await self._collect(start_merges=True)

    # ------------------------------------------------------------ lookups
    def record(self, name: str) -> VolumeRecord | None:
        return self.catalog.volume(name)

    def records(self) -> list[VolumeRecord]:
        return self.catalog.volumes()

    def _require(self, name: str) -> VolumeRecord:
        rec = self.catalog.volume(name)
        if rec is None:
            raise CatalogError("not-found", f"no volume named {name!r}")
        return rec

    def volume(self, name: str) -> Volume | None:
        """The open volume (or `VOL@SNAP` snapshot export), opened on first use."""
        if "@" in name:
            vol_name, _, snap = name.partition("@")
            return self.snapshot_export(vol_name, snap)
        vol = self._open.get(name)
        if vol is not None:
            return vol
        rec = self.catalog.volume(name)
        if rec is None:
            return None
        layers = self.layers.acquire_chain(rec.head, writable_head=True)
        vol = Volume(rec, ChainNode(layers, rec.size, writable=True), stats=VolumeStats(enabled=self.metrics))
        self._open[name] = vol
        return vol

    def snapshot_export(self, volume: str, snap: str) -> Volume | None:
        key = (volume, snap)
        vol = self._snaps.get(key)
        if vol is not None:
            return vol
        rec = self.catalog.volume(volume)
        srec = self.catalog.snapshot(volume, snap)
        if rec is None or srec is None:
            return None
        lrec = self.catalog.layer(srec.layer)
        assert lrec is not None
        layers = self.layers.acquire_chain(srec.layer, writable_head=False)
        vol = Volume(
            rec,
            ChainNode(layers, lrec.size, writable=False),
            snapshot=snap,
            stats=VolumeStats(enabled=self.metrics),
        )
        self._snaps[key] = vol
        return vol

    def open_nodes(self) -> list[Volume]:
        return [*self._open.values(), *self._snaps.values()]

    # ------------------------------------------------------------ info
    def info(self, name: str) -> dict[str, Any]:
        vol = self.volume(name)
        if vol is None or vol.snapshot is not None:
            raise CatalogError("not-found", f"no volume named {name!r}")
        return self._info(vol)

    def list_info(self) -> list[dict[str, Any]]:
        out = []
        for rec in self.records():
            vol = self.volume(rec.name)
            if vol is not None:
                out.append(self._info(vol))
        return out

    def _info(self, vol: Volume) -> dict[str, Any]:
        rec = vol.record
        snaps = self.catalog.snapshots(rec.name)
        allocated = vol.node.head.allocated_bytes() + sum(self.layer_allocated(s.layer) for s in snaps)
        snap_users = sum(v.users for (vname, _), v in self._snaps.items() if vname == rec.name)
        job = self.jobs.busy(rec.name)
        return {
            "name": rec.name,
            "size": rec.size,
            "thick": rec.thick,
            "pool": rec.pool,
            "allocated": allocated,
            "head_allocated": vol.node.head.allocated_bytes(),
            "chain_depth": len(vol.node.layers),
            "snapshots": len(snaps),
            "connections": vol.users + snap_users,
            "job": job.id if job else None,
            "created": rec.created,
            "state": "failed" if vol.node.failed else "ok",
            "error": vol.node.failed,
        }

    def layer_allocated(self, layer_id: str) -> int:
        """Bytes a layer's data file holds in its pool: fstat if open, else stat. Never opens
        a layer (metrics and pool figures call this at scrape time)."""
        lay = self.layers.get(layer_id)
        if lay is not None:
            return lay.allocated_bytes()
        rec = self.catalog.layer(layer_id)
        if rec is None:
            return 0
        try:
            return os.stat(layer_paths(self.catalog.layer_dir(rec), rec.id)[0]).st_blocks * 512
        except OSError:
            return 0

    def pool_info(self, name: str) -> dict[str, Any]:
        return self.pools.info(self.pools.require(name), self.layer_allocated)

    def pool_list(self) -> list[dict[str, Any]]:
        return [self.pools.info(p, self.layer_allocated) for p in self.catalog.pools()]

    def snapshot_list(self, name: str) -> list[dict[str, Any]]:
        """The volume's snapshots as a tree: each with its tree parent and space use."""
        rec = self._require(name)
        snaps = self.catalog.snapshots(name)
        by_layer = {s.layer: s for s in snaps}
        out = []
        head_chain = [r.id for r in self.catalog.chain(rec.head)]
        for s in snaps:
            chain = self.catalog.chain(s.layer)
            parent = next((by_layer[r.id].name for r in chain[1:] if r.id in by_layer), None)
            unique, shared = self._space(chain)
            out.append(
                {
                    "name": s.name,
                    "parent": parent,
                    "created": s.created,
                    "size": chain[0].size,
                    "unique_bytes": unique,
                    "shared_bytes": shared,
                    "current": s.layer in head_chain[1:2],  # the head sits right on it
                }
            )
        return out

    def _space(self, chain: list[LayerRecord]) -> tuple[int, int]:
        """(bytes stored in the top layer, bytes of its view held by ancestors)."""
        layers = self.layers.acquire_chain(chain[0].id, writable_head=False)
        try:
            top = layers[0].map
            unique = top.data_blocks() * BLOCK
            pages: set[int] = set()
            npages = -(-top.nblocks // 4096)
            if any(lay.map.all_data for lay in layers):
                pages = set(range(npages))
            else:
                for lay in layers:
                    pages.update(lay.map.pages)
            visible = 0
            for page in pages:
                remaining = FULL_PAGE
                for lay in layers:
                    data, zero = lay.map.page_bits(page)
                    visible += (data & remaining).bit_count()
                    remaining &= ~(data | zero)
                    if not remaining:
                        break
            return unique, visible * BLOCK - unique
        finally:
            self.layers.release_all(layers)

    # ------------------------------------------------------------ volumes
    async def create(
        self, name: str, size: int, *, thick: bool = False, pool: str = DEFAULT_POOL
    ) -> dict[str, Any]:
        async with self._lock:
            self.catalog.check_new_volume(name, size, pool)
            prec = self.catalog.pool(pool)
            assert prec is not None
            layer_id = new_layer_id()
            try:
                # Files first, then the catalog rows: a crash in between leaves only orphan
                # files (which `check --repair` and start-up collection remove).
                await executor.run(Layer.create, self.io, prec.path, layer_id, size, thick=thick)
            except OSError as e:
                await executor.run(remove_layer_files, self.io, prec.path, layer_id)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CatalogError("no-space", f"pool {pool!r} has no room for {size} bytes") from e
                if e.errno == errno.EFBIG:
                    raise CatalogError("invalid", f"size {size} is too large for pool {pool!r}") from e
                raise
            now = time.time()
            with self.catalog.transaction() as db:
                db.execute(
                    "INSERT INTO layers VALUES (?, ?, NULL, ?, ?, ?)", (layer_id, pool, size, int(thick), now)
                )
                db.execute(
                    "INSERT INTO volumes VALUES (?, ?, ?, ?, ?, ?)",
                    (name, size, int(thick), pool, layer_id, now),
                )
        return self.info(name)

    async def delete(self, name: str) -> None:
        async with self._lock:
            self._require(name)
            self._check_idle(name, "delete the volume")
            with self.catalog.transaction() as db:
                db.execute("DELETE FROM snapshots WHERE volume = ?", (name,))
                db.execute("DELETE FROM acl_rules WHERE volume = ?", (name,))
                db.execute("DELETE FROM volume_qos WHERE volume = ?", (name,))
                db.execute("DELETE FROM volumes WHERE name = ?", (name,))
            self._close_exports(name)
            if self.qos is not None:
                self.qos.volume_deleted(name)
            await self._collect(start_merges=True)

    def _check_idle(self, name: str, what: str) -> None:
        users = sum(v.users for v in self.open_nodes() if v.record.name == name)
        if users:
            raise CatalogError(
                "conflict",
                f"cannot {what}: volume {name!r} has {users} connected client(s); disconnect them first",
            )
        job = self.jobs.busy(name)
        if job is not None:
            raise CatalogError("conflict", f"cannot {what}: job {job.id} ({job.kind}) is running on {name!r}")

    def _close_exports(self, name: str) -> None:
        for key in [k for k in self._snaps if k[0] == name]:
            self.layers.release_all(self._snaps.pop(key).node.layers)
        vol = self._open.pop(name, None)
        if vol is not None:
            self.layers.release_all(vol.node.layers)

    # ------------------------------------------------------------ snapshots
    async def snapshot_create(self, name: str, snap: str) -> dict[str, Any]:
        """O(1): put an empty head on top while drained; clients stay connected.

        The snapshot is crash-consistent: it holds every write completed before it, and
        those are durable once the frozen head's commit (started right away) is done, or
        the next FLUSH returns, like any other write."""
        validate_name(snap, "snapshot")
        async with self._lock:
            rec = self._require(name)
            self._refuse_migrating(name, "snapshot it")
            if self.catalog.snapshot(name, snap) is not None:
                raise CatalogError("conflict", f"volume {name!r} already has a snapshot named {snap!r}")
            vol = self.volume(name)
            assert vol is not None
            node = vol.node
            depth = len(node.layers) + 1
            if depth > MAX_CHAIN_DEPTH:
                raise CatalogError(
                    "conflict",
                    f"chain of {name!r} is {depth - 1} layers deep (limit {MAX_CHAIN_DEPTH}): "
                    "delete snapshots or flatten first",
                )
            prec = self.catalog.pool(rec.pool)
            assert prec is not None
            started = time.perf_counter()
            # Everything slow happens outside the drain: the new layer's files are made (and
            # synced) first, and the frozen head's final commit (an fdatasync that can take a
            # while under write load) runs after I/O has resumed. FLUSH waits for it.
            new_id = new_layer_id()
            await executor.run(Layer.create, self.io, prec.path, new_id, rec.size, thick=False)
            async with node.drained():
                old = node.head
                now = time.time()
                with self.catalog.transaction() as db:
                    db.execute(
                        "INSERT INTO layers VALUES (?, ?, ?, ?, 0, ?)",
                        (new_id, rec.pool, old.id, rec.size, now),
                    )
                    db.execute("INSERT INTO snapshots VALUES (?, ?, ?, ?)", (name, snap, old.id, now))
                    db.execute("UPDATE volumes SET head = ? WHERE name = ?", (new_id, name))
                lrec = self.catalog.layer(new_id)
                assert lrec is not None
                head = self.layers.acquire(lrec, writable=True)
                node.freeze_head(head)
                vol.record = dataclasses.replace(rec, head=new_id)
            self._background(node.commit_frozen())
            elapsed = time.perf_counter() - started
        out: dict[str, Any] = {"volume": name, "name": snap, "created": now, "seconds": round(elapsed, 6)}
        if depth > self.warn_depth:
            out["warning"] = f"chain depth is {depth}: consider deleting snapshots or flattening"
            log.warning(
                "volume %s: chain depth %d after snapshot %s", name, depth, snap, extra={"volume": name}
            )
        return out

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    def _snap(self, name: str, snap: str) -> SnapshotRecord:
        srec = self.catalog.snapshot(name, snap)
        if srec is None:
            raise CatalogError("not-found", f"volume {name!r} has no snapshot named {snap!r}")
        return srec

    async def snapshot_revert(self, name: str, snap: str, *, force: bool = False) -> dict[str, Any]:
        """Put the volume on a new empty head over SNAP. Newer snapshots stay (a branch); the
        current head's unsnapshotted data is discarded."""
        async with self._lock:
            rec = self._require(name)
            srec = self._snap(name, snap)
            self._refuse_migrating(name, "revert it")
            vol = self.volume(name)
            assert vol is not None
            if vol.users:
                if not force:
                    raise CatalogError(
                        "conflict",
                        f"volume {name!r} has {vol.users} connected client(s): "
                        "disconnect them or use --force to disconnect them",
                    )
                if self.disconnect is not None:
                    await self.disconnect(name)
            job = self.jobs.busy(name)
            if job is not None:
                raise CatalogError("conflict", f"job {job.id} ({job.kind}) is running on {name!r}")
            lrec = self.catalog.layer(srec.layer)
            assert lrec is not None
            prec = self.catalog.pool(rec.pool)
            assert prec is not None
            node = vol.node
            await node.commit_frozen()
            async with node.drained():
                new_id = new_layer_id()
                await executor.run(Layer.create, self.io, prec.path, new_id, lrec.size, thick=False)
                now = time.time()
                with self.catalog.transaction() as db:
                    db.execute(
                        "INSERT INTO layers VALUES (?, ?, ?, ?, 0, ?)",
                        (new_id, rec.pool, srec.layer, lrec.size, now),
                    )
                    db.execute(
                        "UPDATE volumes SET head = ?, size = ? WHERE name = ?", (new_id, lrec.size, name)
                    )
                old_layers = node.layers
                layers = self.layers.acquire_chain(new_id, writable_head=True)
                node.set_layers(layers, keep_index=False)
                node._size = lrec.size
                self.layers.release_all(old_layers)
                new_rec = self.catalog.volume(name)
                assert new_rec is not None
                vol.record = new_rec
            await self._collect(start_merges=True)
        return {"volume": name, "reverted_to": snap}

    async def snapshot_delete(self, name: str, snap: str) -> dict[str, Any]:
        """Forget the snapshot; its layer is merged into its one child (a job), or kept
        hidden while several children share it, or removed if nothing reads it."""
        async with self._lock:
            self._require(name)
            srec = self._snap(name, snap)
            self._refuse_migrating(name, "delete its snapshots")
            exp = self._snaps.get((name, snap))
            if exp is not None and exp.users:
                raise CatalogError(
                    "conflict",
                    f"snapshot {name}@{snap} is exported to {exp.users} client(s); disconnect them first",
                )
            with self.catalog.transaction() as db:
                db.execute("DELETE FROM snapshots WHERE volume = ? AND name = ?", (name, snap))
            exp = self._snaps.pop((name, snap), None)
            if exp is not None:
                self.layers.release_all(exp.node.layers)
            children = self.catalog.children(srec.layer)
            jobs = await self._collect(start_merges=True)
        out: dict[str, Any] = {"volume": name, "deleted": snap}
        if jobs:
            out["job"] = jobs[0].id
        elif len(children) > 1 and not self.catalog.snapshots_of_layer(srec.layer):
            out["note"] = (
                f"its data is still shared by {len(children)} branches or clones; "
                "it is kept hidden and merged once only one remains"
            )
        return out

    async def clone(self, source: str, new: str) -> dict[str, Any]:
        """A linked clone of VOL@SNAP: a new volume whose head sits on the snapshot."""
        vol_name, sep, snap = source.partition("@")
        if not sep:
            raise CatalogError("invalid", f"clone source must be VOLUME@SNAPSHOT, not {source!r}")
        async with self._lock:
            rec = self._require(vol_name)
            srec = self._snap(vol_name, snap)
            self._refuse_migrating(vol_name, "clone it")
            lrec = self.catalog.layer(srec.layer)
            assert lrec is not None
            self.catalog.check_new_volume(new, lrec.size, rec.pool)
            prec = self.catalog.pool(rec.pool)
            assert prec is not None
            new_id = new_layer_id()
            await executor.run(Layer.create, self.io, prec.path, new_id, lrec.size, thick=False)
            now = time.time()
            with self.catalog.transaction() as db:
                db.execute(
                    "INSERT INTO layers VALUES (?, ?, ?, ?, 0, ?)",
                    (new_id, rec.pool, srec.layer, lrec.size, now),
                )
                db.execute(
                    "INSERT INTO volumes VALUES (?, ?, 0, ?, ?, ?)", (new, lrec.size, rec.pool, new_id, now)
                )
        return self.info(new)

    async def reset(self, name: str) -> dict[str, Any]:
        """Reopen a failed volume from what its files hold (after the device is fixed): what
        was written since its last good commit is gone, as after a crash."""
        async with self._lock:
            self._require(name)
            self._check_idle(name, "reset the volume")
            vol = self._open.get(name)
            was = vol.node.failed if vol is not None else None
            self._close_exports(name)
            log.warning("volume %s reset (it was: %s)", name, was or "not failed", extra={"volume": name})
        return self.info(name)

    async def resize(self, name: str, size: int, *, force: bool = False) -> dict[str, Any]:
        """Grow a volume live (connected clients keep working; new handshakes see the new
        size), or shrink it: only with `force`, and never under connected clients.
        Snapshots keep their own size."""
        validate_size(size)
        async with self._lock:
            rec = self._require(name)
            job = self.jobs.busy(name)
            if job is not None:
                raise CatalogError(
                    "conflict", f"cannot resize {name!r}: job {job.id} ({job.kind}) is running"
                )
            vol = self.volume(name)
            assert vol is not None
            node = vol.node
            old = node.size
            if size == old:
                return {**self._info(vol), "resized_from": old}
            if size < old:
                users = sum(
                    v.users for v in self.open_nodes() if v.record.name == name and v.snapshot is None
                )
                if users:
                    raise CatalogError(
                        "conflict",
                        f"cannot shrink {name!r} while {users} client(s) are connected: "
                        "they would keep using the old size; disconnect them first",
                    )
                cut = node.data_blocks_beyond(size) * BLOCK
                if not force:
                    detail = (
                        f"it would discard {cut} bytes of data past the new end"
                        if cut
                        else "no data lies past the new end"
                    )
                    raise CatalogError(
                        "conflict", f"shrinking {name!r} from {old} to {size} bytes needs --force ({detail})"
                    )
            await node.commit_frozen()
            async with node.drained():
                if size > old:
                    # Journal the new blocks' states before the catalog grows the volume: a
                    # crash in between leaves entries past the old size, which open ignores.
                    try:
                        await node.resize(size)
                        await node.head.commit()
                    except (OSError, StorageError) as e:
                        await self._undo_grow(node, old)
                        code = getattr(e, "errno", 0)
                        if code in (errno.ENOSPC, errno.EDQUOT):
                            raise CatalogError(
                                "no-space", f"pool {rec.pool!r} has no room to grow {name!r}"
                            ) from e
                        raise
                    self._record_size(vol, size)
                else:
                    # The catalog shrinks first: a crash before the cut leaves data past the
                    # end, which open ignores and a later grow overwrites.
                    self._record_size(vol, size)
                    await node.resize(size)
                    await node.head.commit()
            verb = "grew" if size > old else "shrank"
            log.info("volume %s: %s from %d to %d bytes", name, verb, old, size, extra={"volume": name})
        return {**self._info(vol), "resized_from": old}

    async def _undo_grow(self, node: ChainNode, old: int) -> None:
        """A grow failed half-way (no space for a thick volume, say): go back to the old size."""
        try:
            await node.resize(old)
        except (OSError, StorageError) as e:
            log.error("undoing a failed grow: %s", e)

    def _record_size(self, vol: Volume, size: int) -> None:
        with self.catalog.transaction() as db:
            db.execute("UPDATE layers SET size = ? WHERE id = ?", (size, vol.node.head.id))
            db.execute("UPDATE volumes SET size = ? WHERE name = ?", (size, vol.record.name))
        vol.record = dataclasses.replace(vol.record, size=size)

    # ------------------------------------------------------------ migration
    async def migrate(
        self, name: str, pool: str, *, provisioning: str | None = None, bps_limit: float = 0.0
    ) -> Job:
        """Move the volume and its snapshot tree to `pool`, live (a job; see migration.py)."""
        async with self._lock:
            return migration.start(self, name, pool, provisioning=provisioning, bps_limit=bps_limit)

    def tree_lock(self) -> asyncio.Lock:
        """The lock that serialises tree edits (for the migration's prepare step)."""
        return self._lock

    def background_throttle(self, source: str, target: str, limiter: Any) -> Any:
        """The pause a background copy from pool `source` into pool `target` takes before
        moving n bytes: its own rate limit, then the QoS background class of both pools (so
        a migration gets its shares of them, and all of whatever the volumes leave)."""
        qos = self.qos

        async def throttle(nbytes: int) -> None:
            await limiter(nbytes)
            if qos is not None:
                await qos.background(source, nbytes)
                if target != source:
                    await qos.background(target, nbytes)

        return throttle

    async def switch_over(
        self,
        job: Job,
        target: PoolRecord,
        sources: dict[str, Layer],
        dsts: dict[str, Layer],
        mirror: Any,
        provisioning: str | None,
    ) -> tuple[float, float] | None:
        """Drain every node that reads a moved layer, re-check, commit the catalog and swap
        the layers in. Returns when requests were held and released (time.monotonic()), or
        None when the copy is not clean after all (the caller copies on and tries again)."""
        started = time.monotonic()
        async with self._lock, contextlib.AsyncExitStack() as drains:
            affected = await self._drain_layers(set(dsts), drains)
            if not mirror.clean or mirror.error is not None:
                return None
            if job.state == CANCELLED:
                raise asyncio.CancelledError
            rec = self.catalog.volume(job.volume)
            assert rec is not None
            thick = rec.thick if provisioning is None else provisioning == "thick"
            with self.catalog.transaction() as db:
                for lid, dst in dsts.items():
                    db.execute(
                        "UPDATE layers SET pool = ?, thick = ? WHERE id = ?",
                        (target.name, int(dst.map.all_data), lid),
                    )
                db.execute(
                    "UPDATE volumes SET pool = ?, thick = ? WHERE name = ?",
                    (target.name, int(thick), rec.name),
                )
                db.execute(
                    "UPDATE jobs SET state = 'done', done = total, updated = ? WHERE id = ?",
                    (time.time(), job.id),
                )
            migration.finish_swap(self, job, target, dsts, affected, provisioning)
            if self.qos is not None:
                self.qos.volume_moved(job.volume, target.name)
        return started, time.monotonic()

    async def delete_moved_files(self, pool: str, layer_ids: list[str]) -> None:
        """Remove the source copies of moved layers (after the commit made them garbage)."""
        prec = self.catalog.pool(pool)
        if prec is None:
            return
        for lid in layer_ids:
            rec = self.catalog.layer(lid)
            if rec is not None and rec.pool == pool:
                continue  # never the live copy
            await self._unlink(remove_layer_files, self.io, prec.path, lid)

    def _collect_orphan_files(self) -> None:
        """At start: remove layer files the catalog does not place in their pool (left by a
        crash during a create or a migration). Nothing else runs yet."""
        for prec in self.catalog.pools():
            try:
                entries = os.listdir(prec.path)
            except OSError:
                continue
            for entry in entries:
                if not LAYER_FILE_RE.fullmatch(entry):
                    continue
                rec = self.catalog.layer(entry[:32])
                if rec is None or rec.pool != prec.name:
                    self.io.unlink(os.path.join(prec.path, entry))
                    log.info("removed orphan file %s from pool %s", entry, prec.name)

    def _refuse_migrating(self, name: str, what: str) -> None:
        job = self.jobs.busy(name)
        if job is not None and job.kind == "migrate":
            raise CatalogError(
                "conflict", f"cannot {what}: {name!r} is migrating (job {job.id}); wait or cancel it"
            )

    async def flatten(self, name: str) -> Job:
        """Copy everything the volume reads from its ancestors into its head (a job)."""
        async with self._lock:
            rec = self._require(name)
            job = self.jobs.busy(name)
            if job is not None:
                raise CatalogError("conflict", f"job {job.id} ({job.kind}) is already running on {name!r}")
            if self.catalog.layer(rec.head) is None or self.catalog.chain(rec.head)[0].parent is None:
                raise CatalogError("conflict", f"volume {name!r} has no ancestors: nothing to flatten")
            return self.jobs.start("flatten", name, {"target": rec.head, "cursor": 0}, self._run_flatten)

    # ------------------------------------------------------------ garbage and merges
    async def _collect(self, *, start_merges: bool) -> list[Job]:
        """Delete layers nothing needs; start merges of hidden layers with one child."""
        live = self.catalog.live_layers()
        removed = 0
        for rec in self.catalog.layers():
            if rec.id in live or self.layers.get(rec.id) is not None:
                continue
            if self.catalog.children(rec.id):
                continue  # a child is garbage too and goes first; next pass takes this one
            with self.catalog.transaction() as db:
                db.execute("DELETE FROM layers WHERE id = ?", (rec.id,))
            await self._delete_files(rec)
            removed += 1
            log.info("removed unused layer %s", rec.id)
        # Again while that freed parents (a garbage child still open keeps its parent).
        if removed and any(r.id not in live and self.layers.get(r.id) is None for r in self.catalog.layers()):
            return await self._collect(start_merges=start_merges)
        started: list[Job] = []
        if not start_merges:
            return started
        heads = {v.head: v.name for v in self.catalog.volumes()}
        named = {s.layer for s in self.catalog.all_snapshots()}
        # Layers a running job reads or writes wait for it: it collects again when it ends.
        # That is its source and target, the parent a merge re-points its target to, and the
        # whole chain a flatten reads.
        merging: set[str | None] = set()
        for j in self.jobs.list():
            if j.state != "running":
                continue
            merging.update(j.params.get(k) for k in ("source", "target"))
            src = self.catalog.layer(j.params["source"]) if j.kind == "merge" else None
            if src is not None:
                merging.add(src.parent)
            if j.kind == "flatten" and self.catalog.layer(j.params["target"]):
                merging.update(r.id for r in self.catalog.chain(j.params["target"]))
            merging.update(j.params.get("layers", []))  # a migration's
        merging.discard(None)
        for rec in self.catalog.layers():
            if rec.id in heads or rec.id in named or rec.id in merging or rec.parent in merging:
                continue
            children = self.catalog.children(rec.id)
            if len(children) != 1:
                continue
            child = children[0]
            if child.id in merging:
                continue
            owner = heads.get(child.id) or self._volume_of_layer(child.id) or "-"
            params = {"source": rec.id, "target": child.id, "cursor": 0}
            kind = "merge"
            if child.id not in heads and self._commit_is_cheaper(rec, child):
                # Move the (smaller) immutable child down into its parent instead.
                kind, params = "commit", {"source": child.id, "target": rec.id, "cursor": 0}
            started.append(self.jobs.start(kind, owner, params, self._runner(kind)))
            merging.update((rec.id, child.id, rec.parent))  # the same rule within this pass
        return started

    async def _delete_files(self, rec: LayerRecord) -> None:
        """Remove the files of a layer whose catalog row is gone. Runs to the end even if the
        caller is cancelled (a stop): nothing would remove them later."""
        await self._unlink(self.layers.delete_files, rec)

    async def _unlink(self, fn: Any, *args: Any) -> None:
        """Remove files off the loop, to the end even if the caller is cancelled (close()
        waits for what is left)."""
        fut = asyncio.get_running_loop().run_in_executor(executor.pool(), fn, *args)
        self._unlinks.add(fut)
        fut.add_done_callback(self._unlinks.discard)
        await asyncio.shield(fut)

    def _volume_of_layer(self, layer_id: str) -> str | None:
        for s in self.catalog.snapshots_of_layer(layer_id):
            return s.volume
        for v in self.catalog.volumes():
            if layer_id in {r.id for r in self.catalog.chain(v.head)}:
                return v.name
        return None

    def _runner(self, kind: str) -> Any:
        runners = {
            "merge": self._run_merge,
            "flatten": self._run_flatten,
            "commit": self._run_commit,
            "migrate": lambda job: migration.run(self, job),
        }
        return runners[kind]

    def _commit_is_cheaper(self, parent: LayerRecord, child: LayerRecord) -> bool:
        p = self.layers.acquire(parent)
        c = self.layers.acquire(child)
        try:
            return streaming.blocks_held(c) < streaming.blocks_to_stream(c, p)
        finally:
            self.layers.release(c)
            self.layers.release(p)

    async def _run_commit(self, job: Job) -> None:
        """Overlay the immutable child `source` onto its hidden parent `target`, then let
        the parent take the child's place (its name, its children) and drop the child."""
        src_rec = self.catalog.layer(job.params["source"])
        tgt_rec = self.catalog.layer(job.params["target"])
        if src_rec is None or tgt_rec is None or src_rec.parent != tgt_rec.id:
            job.error = "nothing to commit (already done)"
            return
        target = self.layers.acquire(tgt_rec, writable=True)
        try:
            source = self.layers.acquire(src_rec)
            try:
                npages = len(source.map.pages)
                job.total, job.done = npages, 0

                def progress(done: int, total: int) -> None:
                    job.done, job.total = done, total

                def checkpoint(next_page: int) -> None:
                    job.params["cursor"] = next_page
                    self.jobs.save(job)

                await streaming.overlay(
                    target,
                    source,
                    start_page=job.params["cursor"],
                    on_progress=progress,
                    checkpoint=checkpoint,
                )
            finally:
                self.layers.release(source)
            await self._swap_in_parent(job, parent=target, child=src_rec)
        finally:
            self.layers.release(target)

    async def _swap_in_parent(self, job: Job, *, parent: Layer, child: LayerRecord) -> None:
        """The parent now reads as the child: it takes the child's name and children."""
        async with self._lock, contextlib.AsyncExitStack() as drains:
            affected = await self._drain_users(child.id, drains)
            with self.catalog.transaction() as db:
                db.execute("UPDATE snapshots SET layer = ? WHERE layer = ?", (parent.id, child.id))
                db.execute("UPDATE layers SET parent = ? WHERE parent = ?", (parent.id, child.id))
                db.execute("DELETE FROM layers WHERE id = ?", (child.id,))
                db.execute(
                    "UPDATE jobs SET state = 'done', done = total, updated = ? WHERE id = ?",
                    (time.time(), job.id),
                )
            job.state = "done"
            for v in affected:
                old = v.node.layers
                idx = next(i for i, lay in enumerate(old) if lay.id == child.id)
                v.node.set_layers([*old[:idx], *old[idx + 1 :]], keep_index=False)
                self.layers.release(old[idx])
        if self.layers.get(child.id) is None:
            await self._delete_files(child)
        async with self._lock:
            await self._collect(start_merges=True)

    async def _drain_users(self, layer_id: str, drains: contextlib.AsyncExitStack) -> list[Volume]:
        return await self._drain_layers({layer_id}, drains)

    async def _drain_layers(self, layer_ids: set[str], drains: contextlib.AsyncExitStack) -> list[Volume]:
        """Drain every open node whose chain holds one of the layers, including nodes opened
        while we waited (exports open without the lock): a chain edit must reach them all."""
        affected: list[Volume] = []
        while True:
            more = [
                v
                for v in self.open_nodes()
                if all(v is not a for a in affected) and any(lay.id in layer_ids for lay in v.node.layers)
            ]
            if not more:
                return affected
            for v in more:
                await v.node.commit_frozen()  # no commit may be pending on a layer we drop
                await drains.enter_async_context(v.node.drained())
            affected += more

    def _nodes_headed_by(self, layer_id: str) -> list[ChainNode]:
        return [v.node for v in self.open_nodes() if v.node.head.id == layer_id]

    def _notify(self, layer_id: str) -> streaming.Notify:
        def notify(first: int, count: int, is_data: bool) -> None:
            for node in self._nodes_headed_by(layer_id):
                if is_data:
                    node.merged.set_owner(first, count, node.head.slot)

        return notify

    async def _run_merge(self, job: Job) -> None:
        """Stream the hidden layer `source` into its only child `target`, then drop it."""
        src_rec = self.catalog.layer(job.params["source"])
        tgt_rec = self.catalog.layer(job.params["target"])
        if src_rec is None or tgt_rec is None or tgt_rec.parent != src_rec.id:
            job.error = "nothing to merge (already done)"
            return
        target = self.layers.acquire(tgt_rec, writable=True)
        try:
            source = self.layers.acquire(src_rec)
            try:
                await self._stream_job(job, target, [source], keep_zeros=src_rec.parent is not None)
            finally:
                self.layers.release(source)
            await self._rechain(job, target, new_parent=src_rec.parent, dropped=[src_rec])
        finally:
            self.layers.release(target)

    async def _run_flatten(self, job: Job) -> None:
        tgt_rec = self.catalog.layer(job.params["target"])
        if tgt_rec is None or tgt_rec.parent is None:
            return
        target = self.layers.acquire(tgt_rec, writable=True)
        sources = self.layers.acquire_chain(tgt_rec.parent, writable_head=False)
        try:
            await self._stream_job(job, target, sources, keep_zeros=False)
            await self._rechain(job, target, new_parent=None, dropped=[])
        finally:
            self.layers.release_all(sources)
            self.layers.release(target)

    async def _stream_job(self, job: Job, target: Layer, sources: list[Layer], *, keep_zeros: bool) -> None:
        npages = -(-target.map.nblocks // 4096)
        job.total = len([p for p in streaming.pages_to_copy(sources, npages) if p >= job.params["cursor"]])
        job.done = 0

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        def checkpoint(next_page: int) -> None:
            job.params["cursor"] = next_page
            self.jobs.save(job)

        await streaming.stream(
            target,
            sources,
            keep_zeros=keep_zeros,
            start_page=job.params["cursor"],
            on_progress=progress,
            checkpoint=checkpoint,
            notify=self._notify(target.id),
        )

    async def _rechain(
        self, job: Job, target: Layer, *, new_parent: str | None, dropped: list[LayerRecord]
    ) -> None:
        """Commit: target's parent becomes `new_parent`, dropped layers leave every open chain."""
        async with self._lock, contextlib.AsyncExitStack() as drains:
            affected = await self._drain_users(target.id, drains)
            if job.state == CANCELLED:
                return
            with self.catalog.transaction() as db:
                db.execute("UPDATE layers SET parent = ? WHERE id = ?", (new_parent, target.id))
                for rec in dropped:
                    db.execute("DELETE FROM layers WHERE id = ?", (rec.id,))
                db.execute(
                    "UPDATE jobs SET state = 'done', done = total, updated = ? WHERE id = ?",
                    (time.time(), job.id),
                )
            job.state = "done"
            for v in affected:
                old = v.node.layers
                idx = next(i for i, lay in enumerate(old) if lay.id == target.id)
                tail = self.layers.acquire_chain(new_parent, writable_head=False) if new_parent else []
                v.node.set_layers([*old[: idx + 1], *tail], keep_index=False)
                self.layers.release_all(old[idx + 1 :])
        for rec in dropped:
            if self.layers.get(rec.id) is None:
                await self._delete_files(rec)
        async with self._lock:
            await self._collect(start_merges=True)

    async def close(self) -> None:
        await self.jobs.close()
        if self._unlinks:  # started by jobs just stopped
            await asyncio.wait(set(self._unlinks))
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        for vol in self.open_nodes():
            try:
                await vol.node.flush()
            except Exception as e:  # keep closing the rest
                name = vol.export_name
                log.error("flush of %s at shutdown failed: %s", name, e, extra={"volume": name})
        # A commit whose caller was stopped (a job) still runs: let it end before its files
        # close, and journal what stopped jobs left in layers no open node heads.
        for lay in self.layers.open_layers():
            if lay.writable:
                try:
                    await lay.commit()
                except Exception as e:
                    log.error("commit of layer %s at shutdown failed: %s", lay.id, e)
        self._open.clear()
        self._snaps.clear()
        self.layers.close_all()
        self.catalog.close()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background commit failed: %s", task.exception())
