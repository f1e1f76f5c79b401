"""The volume manager: names to pools to backends, and the rules every tree edit follows.

It resolves a volume's name to the backend of its pool, keeps the cache of open exports,
serialises tree edits by edit scope (a lock per scope: all file pools share one, each RBD
pool has its own, so a cluster that does not answer holds up only its own pool's edits),
refuses what is never allowed whatever the backend (an edit while a job runs on the
volume, a delete or shrink under connected clients), asks the backend to do the edit (the
backend drains the exports it must), and tells the rest of the process what changed
(`StorageEvents`). It holds no SQL, no file and no job logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from blockvirt.storage.backend import (
    DeleteResult,
    NodeIdentity,
    SnapshotInfo,
    SnapshotRecord,
    VolumeBackend,
    VolumeFigures,
    VolumeRecord,
    VolumeSettings,
)
from blockvirt.storage.catalog import (
    DEFAULT_POOL,
    AclRecord,
    Catalog,
    CatalogError,
    PoolRecord,
    validate_name,
    validate_size,
)
from blockvirt.storage.changes import ChangeTracking
from blockvirt.storage.events import Fanout, StorageEvents
from blockvirt.storage.export import Export
from blockvirt.storage.opened import OpenExports
from blockvirt.storage.pools import Pools
from blockvirt.storage.work import JobHost, JobKind, JobView, WorkContext

log = logging.getLogger("blockvirt.volumes")

#: Warn (in the API answer and the log) past this chain depth.
WARN_CHAIN_DEPTH = 16


class VolumeManager:
    """Implements blockvirt.storage.backend.BackendHost for its backends."""

    def __init__(
        self,
        catalog: Catalog,
        jobs: JobHost,
        *,
        warn_depth: int = WARN_CHAIN_DEPTH,
        metrics: bool = True,
        node_name: str | None = None,
    ) -> None:
        self.catalog = catalog
        self.node = NodeIdentity(node_name or socket.gethostname())
        self.jobs = jobs
        self.events = Fanout([])
        self.warn_depth = warn_depth
        self.exports_cache = OpenExports(metrics=metrics)
        self.backends: dict[str, VolumeBackend] = {}
        #: Volumes a migration switched to another kind of storage whose old copy is not
        #: deleted yet: name -> the backend that must no longer answer for it.
        self.retired: dict[str, VolumeBackend] = {}
        #: Per edit scope (VolumeBackend.edit_scope): serialises the tree edits of its pools,
        #: and the commit steps of their background work.
        self._scope_locks: dict[str, asyncio.Lock] = {}
        #: Names being created (create, clone) under some scope's lock: taken for every scope.
        self._creating: set[str] = set()
        self.pools = Pools(catalog, self.backend_of_pool, jobs, self.events, hidden=self.hidden_in)
        #: The names of each pool whose catalog is elsewhere, as last written (remember_names).
        self._remembered: dict[str, set[str]] = {}
        #: Name clashes between pools already logged, as (hidden pool, name).
        self._clashes_logged: set[tuple[str, str]] = set()
        #: What changed in open exports since older snapshots (qemu:dirty-bitmap contexts).
        self.changes = ChangeTracking(self.locate)

    def listen(self, listener: StorageEvents) -> None:
        """Add a listener (the service wires QoS and the NBD server)."""
        self.events.listeners.append(listener)

    @property
    def metrics(self) -> bool:
        return self.exports_cache.metrics

    def add_backend(self, backend: VolumeBackend) -> None:
        self.backends[backend.kind] = backend

    async def start(self) -> None:
        """Each backend collects what a crash left behind (jobs resume after this)."""
        for b in self.backends.values():
            await b.start()

    # ------------------------------------------------------------ edit locks
    def scope_lock(self, scope: str) -> asyncio.Lock:
        lock = self._scope_locks.get(scope)
        if lock is None:
            lock = self._scope_locks[scope] = asyncio.Lock()
        return lock

    def _scope_of(self, pool: str) -> str:
        prec = self.catalog.pool(pool)
        backend = self.backends.get(prec.backend) if prec is not None else None
        # A pool unknown here is refused by the caller's own checks, under a lock of its own.
        return backend.edit_scope(pool) if backend is not None else "?"

    @contextlib.asynccontextmanager
    async def editing_pools(self, *pools: str) -> AsyncIterator[None]:
        """Hold the edit locks of these pools' scopes, taken in one order (no deadlock)."""
        async with contextlib.AsyncExitStack() as held:
            for scope in sorted({self._scope_of(p) for p in pools}):
                await held.enter_async_context(self.scope_lock(scope))
            yield

    @contextlib.asynccontextmanager
    async def editing(self, name: str, *also: str) -> AsyncIterator[tuple[VolumeBackend, VolumeRecord]]:
        """Hold the edit lock of volume `name`'s pool (and of pools `also`), and give where the
        volume is, found again under the lock (a migration may have moved it meanwhile)."""
        while True:
            backend, rec = self.locate(name)
            async with self.editing_pools(rec.pool, *also):
                now = self.locate(name)
                if now[0] is backend and now[1].pool == rec.pool:
                    yield now
                    return

    @contextlib.contextmanager
    def _creating_name(self, name: str) -> Iterator[None]:
        """Keep `name` taken while it is created: another scope's create checks this."""
        self._creating.add(name)
        try:
            yield
        finally:
            self._creating.discard(name)

    # ------------------------------------------------------------ BackendHost
    def pool_records(self) -> list[PoolRecord]:
        return self.catalog.pools()

    def exports(self) -> list[Export]:
        """Every open export (heads and snapshots)."""
        return list(self.exports_cache)

    def remember_names(self, pool: str, names: list[str]) -> None:
        new = set(names)
        old = self._remembered.get(pool)
        if old is None:
            old = self.catalog.remembered_names(pool)
        if new != old:
            # Also before the pool is recorded (attach reads its catalog first); rows of a
            # pool that no longer exists take nothing (unreachable_holder looks it up).
            self.catalog.remember_names(pool, new)
        self._remembered[pool] = new
        for name, visible in self.hidden_in(pool):
            if (pool, name) not in self._clashes_logged:
                self._clashes_logged.add((pool, name))
                log.warning(
                    "volume %s of pool %s is hidden: pool %s has a volume of the same name, which "
                    "is the one served; delete or move one of them",
                    name, pool, visible, extra={"volume": name, "pool": pool},
                )  # fmt: skip

    def unreachable_holder(self, name: str) -> str | None:
        """The pool that held volume `name` when its storage was last reached, if that pool
        has not been reached since the node started: the name is still taken."""
        for pool in self.catalog.pools_remembering(name):
            rec = self.catalog.pool(pool)
            backend = self.backends.get(rec.backend) if rec is not None else None
            if backend is not None and not backend.listed(pool):
                return pool
        return None

    def unreachable(self) -> list[tuple[str, str]]:
        """(volume, pool) for each volume last seen in a pool not reached since the start,
        whose name no reachable pool holds: volumes the node knows of but cannot list now."""
        listed = {rec.name for rec in self.records()}
        out = []
        for prec in self.catalog.pools():
            if prec.backend not in self.backends:
                continue
            last_seen = self.pools.last_seen(prec) or set()
            out += [(n, prec.name) for n in sorted(last_seen) if n not in listed]
        return out

    def hidden_in(self, pool: str) -> list[tuple[str, str]]:
        """(volume, pool served instead) for each volume of `pool` that a volume of the same
        name in another pool hides (pools of nodes sharing storage each took the name)."""
        served = {rec.name: rec.pool for rec in self.records()}
        return [
            (rec.name, served[rec.name])
            for _, rec in self._located()
            if rec.pool == pool and served[rec.name] != pool
        ]

    # ------------------------------------------------------------ resolving names
    def backend_of_pool(self, pool: PoolRecord) -> VolumeBackend:
        backend = self.backends.get(pool.backend)
        if backend is None:
            raise CatalogError(
                "conflict", f"pool {pool.name!r} needs the {pool.backend!r} backend, which is not loaded"
            )
        return backend

    def _located(self) -> Iterator[tuple[VolumeBackend, VolumeRecord]]:
        for b in self.backends.values():
            for rec in b.volumes():
                if self.retired.get(rec.name) is not b:
                    yield b, rec

    def record(self, name: str) -> VolumeRecord | None:
        located = self._find(name)
        return None if located is None else located[1]

    def records(self) -> list[VolumeRecord]:
        """Every volume once: of two with one name, the one served (the older, as _find)."""
        by_name: dict[str, VolumeRecord] = {}
        for _, rec in self._located():
            best = by_name.get(rec.name)
            if best is None or rec.created < best.created:
                by_name[rec.name] = rec
        return sorted(by_name.values(), key=lambda r: r.name)

    def locate(self, name: str) -> tuple[VolumeBackend, VolumeRecord]:
        """The backend and record of volume `name` (see _find), or why there is none."""
        best = self._find(name)
        if best is None:
            holder = self.unreachable_holder(name)
            if holder is not None:
                raise CatalogError(
                    "unavailable", f"volume {name!r} is in pool {holder!r}, which cannot be reached now"
                )
            raise CatalogError("not-found", f"no volume named {name!r}")
        return best

    def require(self, name: str) -> VolumeRecord:
        return self.locate(name)[1]

    def backend_of(self, name: str) -> VolumeBackend:
        return self.locate(name)[0]

    def snapshot(self, volume: str, snap: str) -> SnapshotRecord | None:
        located = self._find(volume)
        return None if located is None else located[0].snapshot(volume, snap)

    def snapshots(self, volume: str) -> list[SnapshotRecord]:
        located = self._find(volume)
        return [] if located is None else located[0].snapshots(volume)

    def _find(self, name: str) -> tuple[VolumeBackend, VolumeRecord] | None:
        """Where volume `name` is (records only: no query of the node's catalog). If pools of
        two backends both hold the name (nodes sharing storage each took it; see hidden_in),
        the older volume is the one: a volume clients already use is not replaced by a
        newcomer."""
        best: tuple[VolumeBackend, VolumeRecord] | None = None
        for b in self.backends.values():
            rec = b.volume(name)
            if rec is None or self.retired.get(name) is b:
                continue
            if best is None or rec.created < best[1].created:
                best = (b, rec)
        return best

    def exists(self, export_name: str) -> bool:
        """Whether export `VOL` or `VOL@SNAP` exists, without opening anything."""
        vol, at, snap = export_name.partition("@")
        if self.record(vol) is None:
            # Its pool cannot be reached: opening it says so (an unavailable export).
            return self.unreachable_holder(vol) is not None
        return not at or self.snapshot(vol, snap) is not None

    def served_elsewhere(self, name: str) -> str | None:
        """Why this node must not serve volume `name` (another node of its cluster does, and
        where), or None."""
        located = self._find(name)
        return None if located is None else located[0].served_elsewhere(name)

    def owner_api(self, name: str) -> str | None:
        located = self._find(name)
        return None if located is None else located[0].owner_api(name)

    # ------------------------------------------------------------ several nodes
    def cluster_view(self) -> list[dict[str, Any]]:
        return [c for b in self.backends.values() for c in b.cluster_view()]

    async def move(self, name: str, node: str) -> bool:
        """Ask the volume's owner to hand it to `node` (a planned move, no data copied).
        False when there is nothing to move: `node` is this one and no other node serves the
        volume (this node serves it, or takes it at its first open)."""
        if node == self.node.name and self.served_elsewhere(name) is None:
            return False
        await self.backend_of(name).want(name, node)
        return True

    async def drain_node(self, node: str) -> list[tuple[str, str]]:
        """Move every volume `node` serves to the other live nodes of its pool, in turn.
        Returns (volume, new node) pairs."""
        moves: list[tuple[str, str]] = []
        for cluster in self.cluster_view():
            others = [n["name"] for n in cluster["nodes"] if n["alive"] and n["name"] != node]
            mine: list[str] = next((n["volumes"] for n in cluster["nodes"] if n["name"] == node), [])
            if mine and not others:
                raise CatalogError("conflict", f"pool {cluster['pool']!r} has no other live node to move to")
            for i, volume in enumerate(mine):
                target = others[i % len(others)]
                await self.backend_of(volume).want(volume, target)
                moves.append((volume, target))
        return moves

    # ------------------------------------------------------------ exports
    def volume(self, name: str) -> Export | None:
        """The open export `VOL` or `VOL@SNAP`, opened on first use; None if it does not exist."""
        vol_name, at, snap = name.partition("@")
        try:
            backend, rec = self.locate(vol_name)
        except CatalogError as e:
            if e.kind == "not-found":
                return None
            raise  # its pool cannot be reached: the caller says so
        if at and backend.snapshot(vol_name, snap) is None:
            return None
        return self.exports_cache.open(backend, rec, snap if at else None)

    def head(self, name: str) -> Export:
        """The volume's head export, opened if need be (the volume must exist)."""
        exp = self.volume(name)
        assert exp is not None
        return exp

    def figures(self, name: str) -> VolumeFigures:
        backend = self.backend_of(name)
        head = self.exports_cache.get(name)
        return backend.figures(name, head.base if head is not None else None)

    def failed(self, export: Export) -> str | None:
        backend = self.backend_of(export.volume)
        return backend.failed(export.base)

    async def snapshot_tree(self, name: str) -> list[SnapshotInfo]:
        return await self.backend_of(name).snapshot_tree(name)

    # ------------------------------------------------------------ settings that travel with a volume
    def settings_of(self, volume: str) -> VolumeSettings:
        return self.backend_of(volume).settings

    def acl_rules(self, volume: str) -> list[AclRecord]:
        located = self._find(volume)
        return [] if located is None else located[0].settings.acl_rules(volume)

    def all_volume_qos(self) -> list[tuple[str, str | None, str]]:
        out: list[tuple[str, str | None, str]] = []
        seen: set[int] = set()
        for b in self.backends.values():
            if id(b.settings) not in seen:
                seen.add(id(b.settings))
                out += b.settings.volume_qos()
        return out

    # ------------------------------------------------------------ rules every edit follows
    def _check_idle(self, name: str, what: str) -> None:
        users = self.exports_cache.users(name)
        if users:
            raise CatalogError(
                "conflict",
                f"cannot {what}: volume {name!r} has {users} connected client(s); disconnect them first",
            )
        job = self.jobs.busy(name)
        if job is not None:
            raise CatalogError("conflict", f"cannot {what}: job {job.id} ({job.kind}) is running on {name!r}")

    def _refuse_migrating(self, name: str, what: str) -> None:
        job = self.jobs.busy(name)
        if job is not None and job.kind == JobKind.MIGRATE:
            raise CatalogError(
                "conflict", f"cannot {what}: {name!r} is migrating (job {job.id}); wait or cancel it"
            )

    def _refuse_busy(self, name: str, what: str | None = None) -> None:
        job = self.jobs.busy(name)
        if job is not None:
            if what is None:
                raise CatalogError("conflict", f"job {job.id} ({job.kind}) is already running on {name!r}")
            raise CatalogError("conflict", f"cannot {what}: job {job.id} ({job.kind}) is running on {name!r}")

    def _check_free(self, name: str) -> None:
        if self.record(name) is not None:  # in a pool of another backend
            raise CatalogError("conflict", f"volume {name!r} already exists")
        if name in self._creating:  # in a pool of another scope, right now
            raise CatalogError("conflict", f"volume {name!r} is being created")

    def _check_new(self, name: str, size: int, pool: str) -> PoolRecord:
        self.catalog.check_new_volume(name, size, pool)
        self._check_free(name)
        holder = self.unreachable_holder(name)
        if holder is not None:
            raise CatalogError(
                "conflict",
                f"volume {name!r} exists in pool {holder!r}, which cannot be reached now: "
                "the name stays taken until that pool is back (or is deleted)",
            )
        prec = self.catalog.pool(pool)
        assert prec is not None
        return prec

    # ------------------------------------------------------------ volumes
    async def create(
        self, name: str, size: int, *, thick: bool = False, pool: str = DEFAULT_POOL
    ) -> VolumeRecord:
        async with self.editing_pools(pool):
            prec = self._check_new(name, size, pool)
            with self._creating_name(name):
                return await self.backend_of_pool(prec).create(name, size, thick=thick, pool=pool)

    async def delete(self, name: str) -> None:
        await self.exports_cache.settle(name)
        async with self.editing(name) as (backend, rec):
            self._check_idle(name, "delete the volume")
            self.exports_cache.close_volume(name)
            await backend.delete(rec)
            self.events.volume_deleted(name)

    async def reset(self, name: str) -> str | None:
        """Reopen a failed volume from what its storage holds (after the device is fixed):
        what was written since its last good commit is gone, as after a crash. Returns what
        the failure was."""
        await self.exports_cache.settle(name)
        async with self.editing(name) as (backend, rec):
            self._check_idle(name, "reset the volume")
            head = self.exports_cache.get(name)
            was = backend.failed(head.base) if head is not None else None
            self.exports_cache.close_volume(name)
            await backend.reset(rec)
            log.warning("volume %s reset (it was: %s)", name, was or "not failed", extra={"volume": name})
        return was

    async def resize(self, name: str, size: int, *, force: bool = False) -> tuple[int, VolumeRecord]:
        """Grow a volume live (connected clients keep working; new handshakes see the new
        size), or shrink it: only with `force`, and never under connected clients.
        Snapshots keep their own size. Returns the old size and the new record."""
        validate_size(size)
        await self.exports_cache.settle(name)
        async with self.editing(name) as (backend, rec):
            job = self.jobs.busy(name)
            if job is not None:
                raise CatalogError(
                    "conflict", f"cannot resize {name!r}: job {job.id} ({job.kind}) is running"
                )
            head = self.head(name)
            old = head.size
            if size == old:
                return old, rec
            if size < old:
                users = self.exports_cache.users(name, heads_only=True)
                if users:
                    raise CatalogError(
                        "conflict",
                        f"cannot shrink {name!r} while {users} client(s) are connected: "
                        "they would keep using the old size; disconnect them first",
                    )
            new = await backend.resize(rec, size, head, force=force)
            self.changes.invalidate(name)  # a grown range counts as changed
            verb = "grew" if size > old else "shrank"
            log.info("volume %s: %s from %d to %d bytes", name, verb, old, size, extra={"volume": name})
        return old, new

    # ------------------------------------------------------------ snapshots
    async def snapshot_create(self, name: str, snap: str) -> dict[str, Any]:
        validate_name(snap, "snapshot")
        async with self.editing(name) as (backend, rec):
            self._refuse_migrating(name, "snapshot it")
            if backend.snapshot(name, snap) is not None:
                raise CatalogError("conflict", f"volume {name!r} already has a snapshot named {snap!r}")
            started = time.perf_counter()
            result = await backend.snapshot_create(rec, snap, self.head(name))
            elapsed = time.perf_counter() - started
        created = self.snapshot(name, snap)
        out: dict[str, Any] = {
            "volume": name,
            "name": snap,
            "created": created.created if created is not None else time.time(),
            "seconds": round(elapsed, 6),
        }
        if result.chain_depth > self.warn_depth:
            out["warning"] = f"chain depth is {result.chain_depth}: consider deleting snapshots or flattening"
            log.warning(
                "volume %s: chain depth %d after snapshot %s", name, result.chain_depth, snap,
                extra={"volume": name},
            )  # fmt: skip
        return out

    def _require_snap(self, backend: VolumeBackend, name: str, snap: str) -> None:
        if backend.snapshot(name, snap) is None:
            raise CatalogError("not-found", f"volume {name!r} has no snapshot named {snap!r}")

    async def snapshot_revert(self, name: str, snap: str, *, force: bool = False) -> dict[str, Any]:
        """Put the volume on a new empty head over SNAP. Newer snapshots stay (a branch); the
        current head's unsnapshotted data is discarded."""
        await self.exports_cache.settle(name)
        async with self.editing(name) as (backend, rec):
            self._require_snap(backend, name, snap)
            self._refuse_migrating(name, "revert it")
            head = self.head(name)
            if head.users:
                if not force:
                    raise CatalogError(
                        "conflict",
                        f"volume {name!r} has {head.users} connected client(s): "
                        "disconnect them or use --force to disconnect them",
                    )
                await self.events.disconnect(name)
            self._refuse_busy(name)
            await backend.revert(rec, snap, head)
            self.changes.invalidate(name)
        return {"volume": name, "reverted_to": snap}

    def snapshot_ancestors(self, name: str, snap: str | None = None) -> list[str]:
        """Snapshots older than `snap` (None: the head) on its branch, oldest first."""
        return self.backend_of(name).snapshot_ancestors(name, snap)

    async def snapshot_diff(self, name: str, since: str, until: str | None = None) -> dict[str, Any]:
        """What may differ between snapshot `since` and snapshot `until` (None: the head
        now): byte ranges in order, and their total."""
        backend, rec = self.locate(name)
        self._require_snap(backend, name, since)
        if until is not None:
            self._require_snap(backend, name, until)
        extents = await backend.changed_extents(rec, since, until)
        return {
            "volume": name,
            "since": since,
            "until": until,
            "extents": [{"offset": off, "length": ln} for off, ln in extents],
            "changed_bytes": sum(ln for _, ln in extents),
        }

    async def snapshot_delete(self, name: str, snap: str) -> DeleteResult:
        """Forget the snapshot; what its data becomes is the backend's business (merged away
        by a job, or kept while branches share it)."""
        await self.exports_cache.settle(name)
        async with self.editing(name) as (backend, rec):
            self._require_snap(backend, name, snap)
            self._refuse_migrating(name, "delete its snapshots")
            exp = self.exports_cache.get(name, snap)
            if exp is not None and exp.users:
                raise CatalogError(
                    "conflict",
                    f"snapshot {name}@{snap} is exported to {exp.users} client(s); disconnect them first",
                )
            if exp is not None:
                self.exports_cache.close(exp)
            return await backend.snapshot_delete(rec, snap)

    async def clone(self, source: str, new: str) -> VolumeRecord:
        """A linked clone of VOL@SNAP: a new volume whose head sits on the snapshot."""
        vol_name, sep, snap = source.partition("@")
        if not sep:
            raise CatalogError("invalid", f"clone source must be VOLUME@SNAPSHOT, not {source!r}")
        async with self.editing(vol_name) as (backend, rec):
            self._require_snap(backend, vol_name, snap)
            self._refuse_migrating(vol_name, "clone it")
            validate_name(new)
            self._check_free(new)
            with self._creating_name(new):
                await backend.clone(rec, snap, new)
        return self.require(new)

    async def flatten(self, name: str) -> JobView:
        """Copy everything the volume reads from its ancestors into its head (a job)."""
        async with self.editing(name) as (backend, rec):
            self._refuse_busy(name)
            return await backend.flatten(rec)

    # ------------------------------------------------------------ pools
    def pool_info(self, name: str) -> dict[str, Any]:
        return self.pools.info(self.pools.require(name))

    def pool_list(self) -> list[dict[str, Any]]:
        return [self.pools.info(p) for p in self.catalog.pools()]

    # ------------------------------------------------------------ background work
    async def run_work(self, ctx: WorkContext) -> None:
        """Carry out a merge, commit or flatten a backend started."""
        kind = ctx.params.get("backend", "file")  # jobs saved before backends had names
        backend = self.backends.get(kind)
        if backend is None:
            raise CatalogError("conflict", f"job {ctx.id} needs the {kind!r} backend, which is not loaded")
        await backend.run_work(ctx)

    def volume_moved(self, name: str, pool: str) -> None:
        """A migration switched the volume over (inside its drain)."""
        self.events.volume_moved(name, pool)

    def switch_exports(
        self, name: str, source: VolumeBackend, target: VolumeBackend, rec: VolumeRecord
    ) -> None:
        """A migration between kinds of storage switched over (every export of the volume is
        drained, filters out, the target promoted): the exports serve from the target now,
        and the source copy is retired until it is deleted. Synchronous on purpose."""
        self.retired[name] = source
        for e in self.exports_cache.of_volume(name):
            old = e.base
            e.replace_base(target.open(rec, e.snapshot))
            e.record = rec
            self.exports_cache.rebind(e, target)
            source.release(old)

    async def evict(self, volume: str, reason: str) -> None:
        """Stop serving the volume's head now (BackendHost): cut its sessions, close it."""
        log.warning("volume %s: no longer served here: %s", volume, reason, extra={"volume": volume})
        await self.events.evict(volume)
        head = self.exports_cache.get(volume)
        if head is not None:
            self.exports_cache.close(head)

    def settings_changed(self, volume: str) -> None:
        """Another node changed the volume's settings in shared storage (BackendHost)."""
        self.events.volume_settings_changed(volume)

    def unretire(self, name: str) -> None:
        """The retired copy is deleted (or the switch never happened)."""
        self.retired.pop(name, None)

    # ------------------------------------------------------------ shutdown
    async def close(self, deadline: float | None = None) -> None:
        """Stop background work, flush every open export, then let the backends close.

        The flushes run together, waited for at most `deadline` seconds: storage that does not
        answer (a Ceph cluster gone away, with writes in flight until its op timeout) must not
        hold the stop. The backends bound their own waits (RbdTuning.let_go_timeout)."""
        await self.jobs.close()

        async def flush(exp: Export) -> None:
            try:
                await exp.base.flush()
            except Exception as e:  # keep closing the rest
                name = exp.export_name
                log.error("flush of %s at shutdown failed: %s", name, e, extra={"volume": name})

        flushes = {asyncio.ensure_future(flush(exp)): exp for exp in self.exports()}
        if flushes:
            _, late = await asyncio.wait(flushes, timeout=deadline)
            for task in late:
                task.cancel()
                name = flushes[task].export_name
                log.error(
                    "flush of %s at shutdown did not finish within %g s: its storage does not answer",
                    name, deadline, extra={"volume": name},
                )  # fmt: skip
        self.exports_cache.clear()
        for b in self.backends.values():
            await b.close()
        self.catalog.close()
