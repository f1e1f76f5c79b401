"""The RBD backend: volumes on Ceph RBD pools (docs/rbd.md).

A volume is the RBD image named after it; a snapshot is the RBD snapshot of that name on it;
a linked clone is an RBD clone (format 2) of the snapshot; flatten is librbd's. Revert rolls
the image back to the snapshot (librbd, fast with the object map), keeping every snapshot: the
tree (which snapshot a snapshot or the head was taken on) is ours, in the pool's catalog in
Ceph (catalog.py), with each volume's access rules and QoS settings, so that another node
can serve the pool's volumes.

One client instance (CephConnection) per pool: a blocklist fences a whole instance, so
volumes that must fail over together share one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockvirt.storage.backend import (
    BackendHost,
    DeleteResult,
    MoveHooks,
    SnapshotInfo,
    SnapshotRecord,
    SnapshotResult,
    Space,
    VolumeFigures,
    VolumeRecord,
)
from blockvirt.storage.backends.rbd.catalog import (
    Changes,
    RbdCatalog,
    RbdSnap,
    RbdVolume,
    acl_key,
    forget_snapshot,
    pending_key,
    snap_key,
    snap_raw,
    vol_key,
)
from blockvirt.storage.backends.rbd.cluster import CephConfig, CephConnection, Session
from blockvirt.storage.backends.rbd.errors import CephError, RbdError
from blockvirt.storage.backends.rbd.image import AsyncImage, DiffExtent
from blockvirt.storage.backends.rbd.imageops import (
    MARK,
    STALE_WATCH_WAIT,
    allocated_at,
    changed_bytes,
    fill_zeros,
    purge_trash,
    remove_image,
    remove_quietly,
    shrink_back,
)
from blockvirt.storage.backends.rbd.members import HEARTBEAT, DuplicateNode, Members
from blockvirt.storage.backends.rbd.node import RbdNode
from blockvirt.storage.backends.rbd.omap import OmapWatch
from blockvirt.storage.backends.rbd.ownership import (
    HeldByLiveNode,
    Incoming,
    Ownership,
    ServedElsewhere,
    owners,
    take_lock,
)
from blockvirt.storage.backends.rbd.pool import PoolUsage, RbdPool
from blockvirt.storage.backends.rbd.tuning import RbdTuning
from blockvirt.storage.catalog import AclRecord, CatalogError, PoolRecord
from blockvirt.storage.export import Export
from blockvirt.storage.node import HOLE, BlockNode, StorageError
from blockvirt.storage.work import JobKind, JobView, WorkContext

log = logging.getLogger("blockvirt.rbd")

RBD_BACKEND = "rbd"
#: Every how many looks at the figures (RbdTuning.figures_interval) the RBD trash is purged.
TRASH_PURGE_EVERY = 6
#: How long a first request waits for a planned move to this node to be handed over (the
#: owner drains, flushes and releases in tens of milliseconds; one that dies meanwhile is
#: presumed dead within DEAD_AFTER and the volume taken over).
HANDOFF_WAIT = 10.0


def ceph_config(rec: PoolRecord, tuning: RbdTuning | None = None) -> CephConfig:
    """How to reach the Ceph pool of RBD pool `rec` (its config from the node's catalog)."""
    cfg = rec.config
    t = tuning or RbdTuning()
    return CephConfig(
        pool=str(cfg["pool"]),
        namespace=str(cfg.get("namespace") or ""),
        conf_file=cfg.get("conf"),
        user=cfg.get("user"),
        connect_timeout=t.connect_timeout,
        mon_op_timeout=t.connect_timeout,
        osd_op_timeout=t.op_timeout,
        native_aio=t.native_aio,
    )


def _denied(e: CephError | StorageError) -> bool:
    """Ceph refused an op for the client's caps (EPERM / EACCES)."""
    code = getattr(e, "ceph_errno", None) or e.errno
    return code in (errno.EPERM, errno.EACCES)


def _caps_error(cfg: CephConfig, write: bool) -> CatalogError:
    """The client's caps do not let a node use the pool: trying again will not help (400)."""
    who, where, caps = f"client {cfg.user or 'admin'}", f"Ceph {cfg.where}", cfg.node_caps
    if write:
        why = f"{who} may not write to {where}: a node needs read-write caps there"
        why += f" (e.g. {caps}, not rbd-read-only)"
    else:
        why = f"{who} may not read {where}: its caps do not allow it (a node needs e.g. {caps})"
    return CatalogError("invalid", why)


def _catalog_error(e: CephError) -> CatalogError:
    kind = "unavailable" if e.kind in ("unreachable", "timeout", "closed", "fenced") else "invalid"
    return CatalogError(kind, str(e))


def _storage_error(e: StorageError, what: str, taken: str | None = None) -> CatalogError:
    """An RBD operation's failure as the API says it: `what` could not be done, and why."""
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return CatalogError("no-space", f"{what}: the Ceph pool is full")
    if code == errno.EEXIST:
        return CatalogError("conflict", f"{what}: {taken or 'the name is taken in the Ceph pool'}")
    if code == errno.ENOENT:
        return CatalogError(
            "conflict",
            f"{what}: its RBD image or snapshot is missing from the Ceph pool "
            "(removed outside blockvirt? `blockvirt check` reports it)",
        )
    if code in (errno.EINVAL, errno.ENAMETOOLONG):
        return CatalogError("invalid", f"{what}: RBD refused it ({e})")
    return CatalogError("unavailable", f"{what}: {e}")


@contextlib.contextmanager
def _ceph_errors(what: str) -> Iterator[None]:
    """Failures of Ceph inside a tree edit become one clear API error naming the edit
    (CatalogErrors raised inside pass through)."""
    try:
        yield
    except StorageError as e:
        raise _storage_error(e, what) from None
    except CephError as e:
        raise CatalogError("unavailable", f"{what}: {e}") from None


@dataclass
class PoolState:
    """One attached RBD pool."""

    rec: PoolRecord
    conn: CephConnection | None = None
    images: RbdPool | None = None
    catalog: RbdCatalog | None = None
    #: Why the pool cannot be used now (its cluster is unreachable, say), or None.
    error: str | None = None
    space: Space | None = None
    #: Cached allocation per volume: (whole tree, head alone, chain depth).
    figures: dict[str, VolumeFigures] = field(default_factory=dict)
    #: The pool's other nodes, and who serves which volume (docs/cluster.md).
    members: Members | None = None
    own: Ownership | None = None
    #: A fencing of this node's Ceph client is being handled.
    recovering: bool = False
    #: The loop that keeps up with the other nodes (one per pool, whatever the reconnects).
    syncing: asyncio.Task[None] | None = None
    #: Set when another node says it changed the catalog (watch/notify): sync now.
    kick: asyncio.Event = field(default_factory=asyncio.Event)
    watch: OmapWatch | None = None

    @property
    def ready(self) -> bool:
        return self.catalog is not None and self.error is None

    def require(self) -> tuple[RbdPool, RbdCatalog]:
        if self.images is None or self.catalog is None or self.error is not None:
            raise CatalogError(
                "unavailable", f"pool {self.rec.name!r} cannot be reached: {self.error or 'not attached'}"
            )
        return self.images, self.catalog


class RbdSettings:
    """VolumeSettings kept in each pool's catalog in Ceph."""

    def __init__(self, backend: RbdBackend) -> None:
        self.backend = backend

    def acl_rules(self, volume: str) -> list[AclRecord]:
        st = self.backend._find(volume)
        return [] if st is None or st.catalog is None else st.catalog.acl_rules(volume)

    async def add_acl_rule(self, volume: str, kind: str, value: str, read_only: bool) -> AclRecord:
        return await self.backend._catalog_of(volume).add_acl_rule(volume, kind, value, read_only)

    async def remove_acl_rule(self, volume: str, rule_id: int) -> bool:
        return await self.backend._catalog_of(volume).remove_acl_rules(volume, rule_id) > 0

    async def clear_acl(self, volume: str) -> int:
        return await self.backend._catalog_of(volume).remove_acl_rules(volume, None)

    def volume_qos(self) -> list[tuple[str, str | None, str]]:
        import json

        out = []
        for st in self.backend.pools.values():
            if st.catalog is not None:
                out += [(v, g, json.dumps(s)) for v, g, s in st.catalog.qos()]
        return out

    async def save_volume_qos(self, volume: str, group: str | None, settings: str) -> None:
        import json

        await self.backend._catalog_of(volume).save_qos(volume, group, json.loads(settings))


class RbdBackend:
    """Every RBD pool of the node, each with its own Ceph client instance."""

    kind = RBD_BACKEND

    def __init__(self, host: BackendHost, tuning: RbdTuning | None = None) -> None:
        self.host = host
        self.tuning = tuning or RbdTuning()
        self.pools: dict[str, PoolState] = {}
        self.settings = RbdSettings(self)
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Closes of released nodes still running, by volume: each with the client instance
        #: its image was opened on (None: it was not open yet).
        self._closing_nodes: dict[str, dict[asyncio.Task[None], Session | None]] = {}
        self._closing = False
        #: Detached pools still letting go (their cluster did not answer in time).
        self._leaving: dict[asyncio.Task[None], PoolState] = {}

    # ------------------------------------------------------------ life
    async def start(self) -> None:
        """Attach the pools the node knows, all at once, so an unreachable cluster delays the
        start by one connect timeout at most: such a pool is retried in the background and
        reports why meanwhile (`pool info`); the node's other pools serve at once."""

        async def first(st: PoolState) -> None:
            try:
                await self._connect(st)
            except CatalogError as e:
                st.error = e.message
                log.error("pool %s: %s (retrying in the background)", st.rec.name, e.message)
                self._spawn(self._retry(st))

        states = [self.pools.setdefault(rec.name, PoolState(rec)) for rec in self.host_pools()]
        await asyncio.gather(*(first(st) for st in states))
        self._spawn(self._figures_loop())

    def host_pools(self) -> list[PoolRecord]:
        return [p for p in self.host.pool_records() if p.backend == RBD_BACKEND]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry(self, st: PoolState) -> None:
        while not self._closing and st.error is not None and self.pools.get(st.rec.name) is st:
            await asyncio.sleep(self.tuning.retry_interval)
            try:
                await self._connect(st)
            except CatalogError as e:
                st.error = e.message
                continue
            if self._closing or self.pools.get(st.rec.name) is not st:
                # Detached (or the node stopping) while the connect was under way: without
                # this, the node would heartbeat and sync in a pool it no longer has. As a
                # letting go of its own, which a stop bounds (see close).
                self._start_leaving(st)
                return
            log.info("pool %s: reached its Ceph cluster again", st.rec.name)

    async def _connect(self, st: PoolState) -> None:
        cfg = ceph_config(st.rec, self.tuning)
        try:
            conn = await CephConnection.open(cfg)
        except CephError as e:
            raise _catalog_error(e) from None
        try:
            catalog = RbdCatalog(conn)
            await catalog.load()
        except (CephError, StorageError) as e:
            await conn.close()
            if _denied(e):
                raise _caps_error(cfg, write=False) from None
            raise CatalogError("unavailable", f"cannot read the pool's catalog: {e}") from None
        st.conn, st.images, st.catalog, st.error = conn, RbdPool(conn), catalog, None
        self._remember(st)
        try:
            await self._join(st)
        except BaseException:
            # Not usable (caps, a duplicate node name, the cluster gone): its client goes too,
            # or every retry would leave one more behind.
            st.conn = st.images = None
            await conn.close()
            raise
        await self._refresh_space(st)
        self._spawn(self._refresh(st))  # a look at every image: not worth delaying the start

    async def _join(self, st: PoolState) -> None:
        """Heartbeat in the pool and take part in who serves what."""
        assert st.conn is not None and st.catalog is not None
        node = self.host.node
        members = Members(st.conn, node.name, lambda: {"nbd": self.host.node.nbd, "api": self.host.node.api})
        members.on_fenced = lambda: self._spawn(self._recover(st))
        members.on_duplicate = lambda why: self._spawn(self._duplicate(st, why))
        try:
            await members.join()
        except DuplicateNode as e:
            raise CatalogError("conflict", str(e)) from None
        except (CephError, StorageError) as e:
            if _denied(e):
                raise _caps_error(ceph_config(st.rec), write=True) from None
            raise CatalogError("unavailable", f"cannot join the pool's member list: {e}") from None
        st.members = members
        if st.own is None:
            st.own = Ownership(st.catalog, node.name, members.alive, lambda n: _address(members, n))
        else:  # back after a fencing or a reconnect: same counters, the new client's view
            st.own.catalog = st.catalog
            st.own.alive = members.alive
            st.own.address_of = lambda n: _address(members, n)
        members.start()

        def changed() -> None:
            self._remember(st)
            self._spawn(self._notify(st))

        st.catalog.on_change = changed
        await self._watch(st)
        if st.syncing is None or st.syncing.done():
            st.syncing = asyncio.ensure_future(self._sync_loop(st))
            self._tasks.add(st.syncing)
            st.syncing.add_done_callback(self._tasks.discard)

    async def attach(self, rec: PoolRecord) -> None:
        """A new RBD pool (pool create --rbd): reachable and usable now, or CatalogError."""
        namespace = rec.config.get("namespace") or ""  # checked by the API

        def where(cfg: dict[str, Any]) -> tuple[Any, ...]:
            return cfg.get("pool"), cfg.get("namespace") or "", cfg.get("conf")

        for other in self.pools.values():
            if where(other.rec.config) == where(rec.config):
                what = f"Ceph pool {rec.config.get('pool')!r}"
                what += f", namespace {namespace!r}," if namespace else ""
                raise CatalogError("conflict", f"{what} is attached already as {other.rec.name!r}")
        st = PoolState(rec)
        await self._connect(st)
        self.pools[rec.name] = st

    async def detach(self, name: str) -> None:
        """Let go of a deleted pool; waits for its cluster at most let_go_timeout, then lets
        it go on in the background (a cluster gone away holds each step of it for the op
        timeout: the member list, the watch, the client)."""
        st = self.pools.pop(name, None)
        if st is None:
            return
        leaving = self._start_leaving(st)
        await asyncio.wait({leaving}, timeout=self.tuning.let_go_timeout)
        if not leaving.done():
            log.warning(
                "pool %s: detached; its Ceph cluster did not answer within %g s, so its client "
                "closes in the background once the calls to it end (the op timeout)",
                name, self.tuning.let_go_timeout,
            )  # fmt: skip

    def _start_leaving(self, st: PoolState) -> asyncio.Task[None]:
        """_let_go(st) as a task, counted in `_leaving` until it ends."""
        task = asyncio.ensure_future(self._let_go(st))
        self._leaving[task] = st
        task.add_done_callback(self._left)
        return task

    def _left(self, task: asyncio.Task[None]) -> None:
        st = self._leaving.pop(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pool %s: letting go failed: %s", st.rec.name, task.exception())

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        # All pools at once (those detached and still letting go too): N clusters that do
        # not answer cost one let_go_timeout, not N.
        for st in self.pools.values():
            self._start_leaving(st)
        await asyncio.gather(*(self._stop(st, task) for task, st in list(self._leaving.items())))

    async def _stop(self, st: PoolState, leaving: asyncio.Task[None]) -> None:
        """Wait for a pool's letting go at most let_go_timeout as the node stops; then
        abandon its client."""
        limit = self.tuning.let_go_timeout
        await asyncio.wait({leaving}, timeout=limit)
        if leaving.done():
            return
        leaving.cancel()
        running = st.conn.abandon() if st.conn is not None else 0
        log.warning(
            "pool %s: its Ceph cluster did not answer within %g s: stopping without leaving "
            "its member list or freeing this node's volumes (other nodes take them over once "
            "they presume it dead); %d call(s) to it abandoned",
            st.rec.name, limit, running,
        )  # fmt: skip

    async def _let_go(self, st: PoolState) -> None:
        """Stop taking part in a pool: no more syncing, heartbeats (our key leaves the member
        list, so peers need not wait to presume us dead), volumes (a clean stop frees them at
        once), then its client."""
        if st.syncing is not None and not st.syncing.done():
            st.syncing.cancel()
            await asyncio.wait({st.syncing})
        if st.members is not None:
            await st.members.close()
            await st.members.leave()
        if st.own is not None:
            for volume in st.own.mine():
                try:
                    await st.own.hand_to(volume, None)
                except (CatalogError, CephError, StorageError) as e:
                    log.debug("freeing %s: %s", volume, e)
        if st.conn is not None:
            await st.conn.close()

    # ------------------------------------------------------------ the cluster
    async def _watch(self, st: PoolState) -> None:
        """Be told at once when another node changes the catalog (a planned move asked, a
        volume handed over, made or changed): without it, every change reaches the other
        nodes only at their next look, up to a HEARTBEAT later, and a client sent to the new
        owner of a volume is refused there meanwhile. A lost watch is made again by the sync
        loop; the periodic look stays, so a lost notify costs only latency."""
        assert st.catalog is not None
        if st.watch is not None and not st.watch.closed:
            return

        def changed(message: str) -> None:
            st.kick.set()

        #: [this watch] once made, [None] if it was lost before that. A loss is this watch's
        #: own only: a late one of an older watch must not drop the current.
        made: list[OmapWatch | None] = []

        def lost(code: int) -> None:
            st.kick.set()
            if not made:
                made.append(None)
            elif made[0] is not None and st.watch is made[0]:
                st.watch = None
                self._spawn(made[0].close())  # unregistered; the sync loop makes a new one

        try:
            watch = await st.catalog.doc.watch(changed, lost)
        except (CephError, StorageError) as e:
            log.info("pool %s: cannot watch the catalog (%s): looking every %g s", st.rec.name, e, HEARTBEAT)
            return
        if made:
            self._spawn(watch.close())
        else:
            made.append(watch)
            st.watch = watch

    async def _notify(self, st: PoolState) -> None:
        """Tell the other nodes this node changed the catalog. Not waited for: a watcher that
        died keeps a notify waiting until its watch times out."""
        try:
            if st.catalog is not None:
                await st.catalog.doc.notify("catalog", wait=2.0)
        except (CephError, StorageError) as e:
            log.debug("pool %s: notify: %s", st.rec.name, e)

    async def _sync_loop(self, st: PoolState) -> None:
        """Keep up with the other nodes: the catalog (volumes made or changed elsewhere) and
        the planned moves asked of this node; at once when told, else every HEARTBEAT."""
        while not self._closing:
            try:
                await asyncio.wait_for(st.kick.wait(), HEARTBEAT)
            except TimeoutError:
                pass
            st.kick.clear()
            if not st.ready or st.recovering:
                continue
            if st.watch is None or st.watch.closed:
                await self._watch(st)
            try:
                await self._sync(st)
            except (CatalogError, CephError, StorageError) as e:
                log.debug("pool %s: sync: %s", st.rec.name, e)
            except Exception:  # a bug here must not stop this node following the cluster
                log.exception("pool %s: sync failed", st.rec.name)

    async def _sync(self, st: PoolState) -> None:
        _, catalog = st.require()
        if await catalog.doc.version() != catalog.version:
            before = catalog.items
            await catalog.load()
            self._remember(st)
            if st.members is not None:
                known = st.members.nodes
                if any(o.node not in known for o in owners(catalog.items).values()):
                    await st.members.refresh()  # a node that just joined owns a volume: its address
            # QoS settings changed through another node: the listeners (QoS) read them again.
            keys = {k for k in (*before, *catalog.items) if k.startswith("qos/")}
            for key in sorted(keys):
                if before.get(key) != catalog.items.get(key):
                    self.host.settings_changed(key[4:])
        assert st.own is not None
        for volume, o in owners(catalog.items).items():
            if o.node == self.host.node.name and o.target not in (None, o.node):
                if st.members is not None and not st.members.alive(o.target):
                    log.warning("volume %s: node %s, asked to take it, is gone: keeping it", volume, o.target)
                    await st.own.cancel_move(volume)
                    continue
                await self._hand_off(st, volume, o.target)
        # A head we serve whose record names another node: it was taken from us (we were
        # presumed dead): our lock is broken and our client fenced; stop at once.
        for e in self.host.exports():
            if e.snapshot is None and isinstance(e.base, RbdNode) and e.base.opened is not None:
                holder = st.own.owner(e.volume)
                if self._find(e.volume) is st and holder is not None and holder.node != self.host.node.name:
                    await self.host.evict(e.volume, f"node {holder.node} took it over")

    async def _hand_off(self, st: PoolState, volume: str, target: str) -> None:
        """A planned move: hold the volume's requests, make them durable, release the lock,
        give the record to `target`, cut our sessions (clients reconnect to it)."""
        assert st.own is not None
        head = next((e for e in self.host.exports() if e.volume == volume and e.snapshot is None), None)
        started = time.monotonic()
        if head is None or not isinstance(head.base, RbdNode):
            await st.own.hand_to(volume, target)
            return
        node = head.base
        async with head.drained():
            img = node.opened
            if img is not None:
                await img.flush()
                await node.close()  # releases the exclusive lock
            node.failed = f"moved to node {target}"
            await st.own.hand_to(volume, target)
            await self.host.evict(volume, f"moved to node {target}")
        log.info(
            "volume %s handed to node %s in %.1f ms", volume, target, (time.monotonic() - started) * 1000,
            extra={"volume": volume},
        )  # fmt: skip

    def _lost(self, st: PoolState, volume: str, e: RbdError) -> None:
        """An op on an owned head failed with EBLOCKLISTED or EROFS: another node took the
        volume (this one was presumed dead). Stop serving it; if the whole client was fenced,
        every volume of the pool goes and a fresh client replaces it."""
        log.warning("volume %s: lost (%s)", volume, e, extra={"volume": volume})
        if st.own is not None:
            st.own.lost(volume)
        self._spawn(self.host.evict(volume, f"lost: {e}"))
        if e.fenced:
            self._spawn(self._recover(st))

    async def _recover(self, st: PoolState) -> None:
        """This node's Ceph client was fenced: stop serving every volume of the pool, then
        come back with a fresh client (a new address, not blocklisted). Volumes other nodes
        took stay theirs; the others this node may serve again when asked."""
        if st.recovering or st.conn is None or not st.conn.fenced:
            return  # handled already, or a late error from a client replaced since
        st.recovering = True
        try:
            log.warning("pool %s: this node's Ceph client was fenced; stopping its volumes", st.rec.name)
            if st.own is not None:
                st.own.changes["fenced"] += 1
            for e in list(self.host.exports()):
                if e.snapshot is None and isinstance(e.base, RbdNode) and self._find(e.volume) is st:
                    if e.base.failed is None and st.own is not None:
                        st.own.lost(e.volume)  # not counted by _lost yet
                    e.base.failed = "this node was fenced"
                    await self.host.evict(e.volume, "this node was fenced")
            if st.members is not None:
                await st.members.close()
            await st.conn.reconnect()
            assert st.catalog is not None
            await st.catalog.load()
            self._remember(st)
            await self._join(st)
            if self._closing or self.pools.get(st.rec.name) is not st:  # detached meanwhile
                self._start_leaving(st)
                return
            log.warning("pool %s: back with a fresh Ceph client", st.rec.name)
        except (CephError, StorageError, CatalogError) as e:
            st.error = f"fenced, and could not reconnect: {e}"
            log.error("pool %s: %s", st.rec.name, st.error)
            self._spawn(self._retry(st))
        finally:
            st.recovering = False

    async def _duplicate(self, st: PoolState, why: str) -> None:
        """Another process uses this node's name in the pool: stop serving its volumes and
        report the pool unusable (the operator gives each node its own --node-name)."""
        st.error = why
        for e in list(self.host.exports()):
            if e.snapshot is None and isinstance(e.base, RbdNode) and self._find(e.volume) is st:
                e.base.failed = why
                await self.host.evict(e.volume, why)

    def edit_scope(self, pool: str) -> str:
        # A scope per pool: each has its own Ceph client, catalog and images, so one whose
        # cluster does not answer holds only its own edits.
        return f"{self.kind}:{pool}"

    def served_elsewhere(self, volume: str) -> str | None:
        st = self._find(volume)
        if st is None or st.own is None or st.members is None:
            return None
        o = st.own.elsewhere(volume)
        if o is None:
            return None
        address = _address(st.members, o.node)
        where = f" at {address}" if address else ""
        return f"volume {volume!r} is served by node {o.node}{where}"

    def owner_api(self, volume: str) -> str | None:
        st = self._find(volume)
        if st is None or st.own is None or st.members is None:
            return None
        o = st.own.elsewhere(volume, moving=False)  # the node that holds the lock now
        info = st.members.nodes.get(o.node) if o is not None else None
        return info.api if info is not None and info.api else None

    def cluster_view(self) -> list[dict[str, Any]]:
        """Per pool: its nodes, their liveness, and the volumes each one serves."""
        out: list[dict[str, Any]] = []
        for st in self.pools.values():
            if st.members is None or st.catalog is None:
                out.append({"pool": st.rec.name, "error": st.error or "not attached", "nodes": []})
                continue
            served: dict[str, list[str]] = {}
            for volume, o in owners(st.catalog.items).items():
                served.setdefault(o.node, []).append(volume)
            nodes = []
            for name in sorted(set(st.members.nodes) | set(served)):
                info = st.members.nodes.get(name)
                age = st.members.age(name)
                nodes.append(
                    {
                        "name": name,
                        "me": name == self.host.node.name,
                        "nbd": info.nbd if info else "",
                        "api": info.api if info else "",
                        "alive": st.members.alive(name),
                        "heartbeat_age": round(age, 3) if age is not None else None,
                        # Ours only: why our last heartbeat could not be written (peers will
                        # presume us dead if that lasts), else None.
                        "heartbeat_error": st.members.last_error if name == self.host.node.name else None,
                        "volumes": sorted(served.get(name, [])),
                    }
                )
            counters = dict(st.own.changes) if st.own is not None else {}
            out.append({"pool": st.rec.name, "nodes": nodes, "changes": counters})
        return out

    async def want(self, volume: str, node: str) -> None:
        """Ask for a planned move of the volume to `node` (its owner hands it over)."""
        st = self._state(volume)
        if st.own is None or st.members is None:
            raise CatalogError("unavailable", f"pool {st.rec.name!r} is not reachable")
        if node not in st.members.nodes or not st.members.alive(node):
            raise CatalogError("not-found", f"no live node named {node!r} serves pool {st.rec.name!r}")
        await st.own.want(volume, node)

    def live_nodes(self, pool: str) -> list[str]:
        st = self.pools.get(pool)
        if st is None or st.members is None:
            return []
        return sorted(n for n in st.members.nodes if st.members.alive(n))

    # ------------------------------------------------------------ figures (cached)
    async def _figures_loop(self) -> None:
        looks = 0
        while True:
            await asyncio.sleep(self.tuning.figures_interval)
            looks += 1
            for st in list(self.pools.values()):
                if st.ready:
                    try:
                        await self._refresh(st)
                        if looks % TRASH_PURGE_EVERY == 0 and st.images is not None:
                            # An image trashed while a stale watch held it is removed
                            # only by a purge: deletes of clones purge, and so does this.
                            await purge_trash(st.images, background=True)
                    except Exception as e:  # a look that fails keeps the last figures
                        log.debug("pool %s: figures: %s", st.rec.name, e)

    async def _refresh(self, st: PoolState) -> None:
        """Look at every volume's allocation, then at the pool's space."""
        _, catalog = st.require()
        figures: dict[str, VolumeFigures] = {}
        for vol in catalog.volumes():
            try:
                figures[vol.name] = await self._volume_figures(st, vol)
            except (CephError, StorageError) as e:
                log.debug("volume %s: figures: %s", vol.name, e)
                if vol.name in st.figures:
                    figures[vol.name] = st.figures[vol.name]
        # Volumes added while this look ran keep the figures their creation set (a clone's).
        live = {vol.name for vol in catalog.volumes()}
        for name, known in st.figures.items():
            if name in live and name not in figures:
                figures[name] = known
        st.figures = figures
        await self._refresh_space(st)

    async def _refresh_space(self, st: PoolState) -> None:
        """The pool's usage (one mon command) with the volumes' last figures."""
        images, catalog = st.require()
        try:
            usage = await images.usage()
        except (CephError, StorageError) as e:
            log.debug("pool %s: usage: %s", st.rec.name, e)
            return
        provisioned = sum(v.size for v in catalog.volumes())
        capacity, used, free = pool_space(usage)
        allocated = sum(f.allocated for f in st.figures.values())
        st.space = Space(capacity, used, free, allocated, provisioned)

    async def _volume_figures(self, st: PoolState, vol: RbdVolume) -> VolumeFigures:
        """What the volume's objects hold, as `rbd du` counts it (whole objects, from the
        object map): each snapshot what changed since the one before it, the head what changed
        since the last snapshot; a clone's parent data is its parent's, not counted here."""
        images, _ = st.require()
        img = await images.open(vol.name, read_only=True)
        try:
            parent = await img.parent()
            snaps = [s.name for s in await img.snapshots()]
            prev: str | None = None
            total = 0
            for snap in snaps:
                at = await images.open(vol.name, snapshot=snap, read_only=True)
                try:
                    total += _held(await at.diff(prev, whole_object=True, include_parent=False))
                finally:
                    await at.close()
                prev = snap
            head = _held(await img.diff(prev, whole_object=True, include_parent=False))
        finally:
            await img.close()
        return VolumeFigures(total + head, head, _depth(parent is not None))

    # ------------------------------------------------------------ pools
    def space(self, pool: PoolRecord) -> Space:
        st = self.pools.get(pool.name)
        if st is None or st.space is None:
            provisioned = sum(v.size for v in self.volumes() if v.pool == pool.name)
            return Space(None, None, None, 0, provisioned)
        return st.space

    def pool_error(self, pool: str) -> str | None:
        st = self.pools.get(pool)
        return "not attached" if st is None else st.error

    def pool_in_use(self, pool: str) -> str | None:
        st = self.pools.get(pool)
        if st is None or st.catalog is None:
            return None
        vols = [v.name for v in st.catalog.volumes()]
        return f"volumes {', '.join(vols)}" if vols else None

    # ------------------------------------------------------------ records
    def _remember(self, st: PoolState) -> None:
        """Keep the pool's volume names on this node too: they stay taken while the pool
        cannot be reached after a restart (VolumeManager.unreachable_holder)."""
        if st.catalog is not None:
            self.host.remember_names(st.rec.name, [v.name for v in st.catalog.volumes()])

    def listed(self, pool: str) -> bool:
        st = self.pools.get(pool)
        return st is not None and st.catalog is not None

    def _find(self, name: str) -> PoolState | None:
        """The pool holding volume `name` (incoming ones included: internal lookups)."""
        for st in self.pools.values():
            if st.catalog is not None and st.catalog.volume(name) is not None:
                return st
        return None

    def _state(self, name: str) -> PoolState:
        st = self._find(name)
        if st is None:
            raise CatalogError("not-found", f"no volume named {name!r}")
        return st

    def _catalog_of(self, name: str) -> RbdCatalog:
        return self._state(name).require()[1]

    def _record(self, st: PoolState, vol: RbdVolume) -> VolumeRecord:
        return VolumeRecord(vol.name, vol.size, vol.thick, st.rec.name, vol.created)

    def _any_record(self, name: str) -> VolumeRecord:
        st = self._state(name)
        vol = st.require()[1].volume(name)
        assert vol is not None
        return self._record(st, vol)

    def volume(self, name: str) -> VolumeRecord | None:
        st = self._find(name)
        if st is None or st.catalog is None:
            return None
        vol = st.catalog.volume(name)
        return self._record(st, vol) if vol is not None and vol.incoming is None else None

    def volumes(self) -> list[VolumeRecord]:
        out = []
        for st in self.pools.values():
            if st.catalog is not None:
                out += [self._record(st, v) for v in st.catalog.volumes() if v.incoming is None]
        return out

    def snapshot(self, volume: str, name: str) -> SnapshotRecord | None:
        st = self._find(volume)
        snap = st.catalog.snapshot(volume, name) if st is not None and st.catalog is not None else None
        return SnapshotRecord(volume, name, snap.created) if snap is not None else None

    def snapshots(self, volume: str) -> list[SnapshotRecord]:
        st = self._find(volume)
        if st is None or st.catalog is None:
            return []
        return [SnapshotRecord(volume, s.name, s.created) for s in st.catalog.snapshots(volume)]

    async def snapshot_tree(self, volume: str) -> list[SnapshotInfo]:
        st = self._state(volume)
        images, catalog = st.require()
        vol = catalog.volume(volume)
        assert vol is not None
        snaps = catalog.snapshots(volume)
        deleting = {snap for v, snap, op in catalog.pending() if v == volume and op == "delete"}
        out = []
        for s in snaps:
            # Whole objects (the object map answers): what the snapshot reads, and what
            # changed since its parent (its own share); the rest it shares with older ones.
            try:
                with _ceph_errors(f"cannot look at snapshot {volume}@{s.name}"):
                    allocated = await allocated_at(images, volume, s.name)
                    unique = (
                        allocated
                        if s.parent is None
                        else await changed_bytes(images, volume, s.parent, s.name)
                    )
            except CatalogError as e:
                if s.name in deleting and e.kind == "conflict":  # gone from RBD: not by others
                    raise CatalogError(
                        "conflict",
                        f"snapshot {volume}@{s.name}: its delete was cut short (the cluster did not "
                        "answer); run `snapshot delete` again to finish it",
                    ) from None
                raise
            shared = max(0, allocated - unique)
            out.append(
                SnapshotInfo(s.name, s.parent, s.created, s.size, unique, shared, vol.current == s.name)
            )
        return out

    def figures(self, volume: str, node: BlockNode | None) -> VolumeFigures:
        st = self._state(volume)
        cached = st.figures.get(volume)
        return cached if cached is not None else VolumeFigures(0, 0, 1)

    def failed(self, node: BlockNode) -> str | None:
        return (node.failed or node.open_error) if isinstance(node, RbdNode) else None

    def _ancestors(self, catalog: RbdCatalog, volume: str, point: str | None) -> list[str]:
        """The snapshots `point` (a snapshot, or None: the head) descends from, nearest first."""
        out: list[str] = []
        if point is None:
            vol = catalog.volume(volume)
            cur = vol.current if vol is not None else None
        else:
            start = catalog.snapshot(volume, point)
            cur = start.parent if start is not None else None
        while cur is not None and cur not in out:
            out.append(cur)
            snap = catalog.snapshot(volume, cur)
            cur = snap.parent if snap is not None else None
        return out

    def snapshot_ancestors(self, volume: str, snapshot: str | None) -> list[str]:
        st = self._find(volume)
        if st is None or st.catalog is None:
            return []
        return self._ancestors(st.catalog, volume, snapshot)[::-1]

    async def changed_extents(
        self, volume: VolumeRecord, since: str, until: str | None = None
    ) -> list[tuple[int, int]]:
        st = self._state(volume.name)
        images, catalog = st.require()
        if catalog.snapshot(volume.name, since) is None:
            raise CatalogError("not-found", f"volume {volume.name!r} has no snapshot named {since!r}")
        if until is not None and catalog.snapshot(volume.name, until) is None:
            raise CatalogError("not-found", f"volume {volume.name!r} has no snapshot named {until!r}")
        if since == until:
            return []
        if since not in self._ancestors(catalog, volume.name, until):
            raise CatalogError(
                "invalid", f"snapshot {since!r} is not an older point of {until or volume.name!r}'s branch"
            )
        with _ceph_errors(f"cannot compare {volume.name}@{since} with {until or 'the head'}"):
            img = await images.open(volume.name, snapshot=until, read_only=True)
            try:
                size = img.size
                found = await img.diff(since)
            finally:
                await img.close()
        base = catalog.snapshot(volume.name, since)
        assert base is not None
        spans = sorted((e.offset, e.offset + e.length) for e in found)
        if size > base.size:  # grown since: all of it counts as changed
            spans.append((base.size, size))
            spans.sort()
        out: list[tuple[int, int]] = []
        for lo, hi in spans:
            hi = min(hi, size)
            if hi <= lo:
                continue
            if out and lo <= out[-1][0] + out[-1][1]:
                start = out[-1][0]
                out[-1] = (start, max(out[-1][1], hi - start))
            else:
                out.append((lo, hi - lo))
        return out

    # ------------------------------------------------------------ I/O
    def open(self, volume: VolumeRecord, snapshot: str | None) -> BlockNode:
        st = self._state(volume.name)
        images, catalog = st.require()
        size = volume.size
        if snapshot is not None:
            snap = catalog.snapshot(volume.name, snapshot)
            assert snap is not None
            size = snap.size

        label = volume.name if snapshot is None else f"{volume.name}@{snapshot}"

        def missing(e: StorageError) -> StorageError:
            if e.errno != errno.ENOENT:
                return e
            return StorageError(  # ENOENT: an NBD client gets EIO, the API a conflict
                errno.ENOENT,
                f"{label}: its RBD {'snapshot' if snapshot else 'image'} is missing from Ceph pool "
                f"{images.name!r} (removed outside blockvirt? `blockvirt check` reports it)",
            )

        if snapshot is not None:  # immutable: any node may read it beside the owner

            async def read_only() -> AsyncImage:
                try:
                    return await images.open(volume.name, snapshot=snapshot)
                except StorageError as e:
                    raise missing(e) from None

            return RbdNode(
                read_only, size, writable=False, thick=volume.thick, label=label, volume=volume.name
            )

        async def owner() -> AsyncImage:
            try:
                return await self._take(st, volume.name)
            except StorageError as e:
                raise missing(e) from None

        def lost(e: RbdError) -> None:
            self._lost(st, volume.name, e)

        return RbdNode(
            owner, size, writable=True, thick=volume.thick, label=label, on_lost=lost, volume=volume.name
        )

    async def _claim(self, st: PoolState, name: str) -> None:
        """Claim the volume's record; if its owner is handing it to us (a planned move), wait
        for the handoff: the client that reconnected here at once waits in its first request
        instead of being refused and trying again."""
        assert st.own is not None
        deadline = time.monotonic() + HANDOFF_WAIT
        while True:
            try:
                await st.own.claim(name)
                return
            except Incoming:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)

    async def _take(self, st: PoolState, name: str) -> AsyncImage:
        """Become the volume's owner and hold its lock (fencing a presumed-dead holder)."""
        images, _ = st.require()
        if st.own is not None:
            current = st.own.owner(name)
            if (current is None or current.node != self.host.node.name) and st.members is not None:
                # About to presume its owner dead: judge on a fresh read of the heartbeats,
                # not on the last look (a beat may have come in since).
                try:
                    await st.members.refresh()
                except (CephError, StorageError) as e:
                    raise StorageError(errno.EIO, f"cannot read the pool's member list: {e}") from None
            try:
                await self._claim(st, name)
            except ServedElsewhere as e:
                # Accepted in the second before this node learned who serves it: never serve
                # beside the owner. The sessions go; on reconnecting, the client is told where.
                self._spawn(self.host.evict(name, e.message))
                raise StorageError(errno.EROFS, e.message) from None
        # Our own handles of it closed: a lock of ours left is then an orphan's. Bounded: a
        # close held up (a fenced client's) must not hold the take-over; then a lock of ours
        # is left to take_lock's usual judgement.
        closed = await self._released(st, name, within=st.conn.config.osd_op_timeout if st.conn else 0.0)
        img = await images.open(name)
        members = st.members
        try:
            holder = members.holder if members is not None else lambda _: None
            me = st.conn.client_address() if closed and st.conn is not None and st.conn.connected else None
            fenced = await take_lock(img, holder, me)
        except HeldByLiveNode as e:
            await img.close()
            message = ServedElsewhere(name, e.node, _address(members, e.node) if members else "").message
            self._spawn(self.host.evict(name, message))
            raise StorageError(errno.EROFS, message) from None
        except BaseException:
            await img.close()
            raise
        if fenced and st.own is not None:
            st.own.changes["peers_fenced"] += len(fenced)
            log.warning("volume %s: taken over from a fenced holder (%s)", name, ", ".join(fenced))
        return img

    def release(self, node: BlockNode) -> None:
        assert isinstance(node, RbdNode)
        img = node.opened
        task = asyncio.ensure_future(node.close())
        closing = self._closing_nodes.setdefault(node.volume, {})
        closing[task] = img.session if img is not None else None
        task.add_done_callback(lambda t: closing.pop(t, None))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _released(self, st: PoolState, volume: str, within: float | None = None) -> bool:
        """Wait until the images of the volume's released nodes are closed (an open image
        cannot be removed: librbd says busy; a lock still held is then an orphan's), at
        most `within` seconds. Whether they all are.

        Only those of the pool's current client instance count. One replaced since (fenced,
        or reset after the cluster hung) is a different client to Ceph: its locks are never
        taken for ours, a fenced one's watches went with the blocklisting, and its images
        close with its teardown, which for a fenced client can take a long while."""
        closing = self._closing_nodes.get(volume)
        if closing:
            current = st.conn.session if st.conn is not None and st.conn.connected else None
            ours = {t for t, session in closing.items() if session is None or session is current}
            if ours:
                _, pending = await asyncio.wait(ours, timeout=within)
                if pending:
                    return False
        if not self._closing_nodes.get(volume, True):
            del self._closing_nodes[volume]  # nothing of it left closing
        return True

    # ------------------------------------------------------------ tree edits
    async def create(
        self, name: str, size: int, *, thick: bool, pool: str, incoming: str | None = None
    ) -> VolumeRecord:
        st = self.pools.get(pool)
        if st is None:
            raise CatalogError("not-found", f"no pool named {pool!r}")
        images, catalog = st.require()
        what = f"cannot create volume {name!r}"
        try:
            await images.create(name, size)
        except StorageError as e:
            raise _storage_error(e, what, "an image of that name exists already in the Ceph pool") from None
        try:
            with _ceph_errors(what):
                img = await images.open(name)
                try:
                    # Marked before the catalog knows it: an image a crash leaves behind is
                    # provably ours (`check --repair` removes it).
                    await img.metadata_set(MARK, name)
                    if thick:
                        await fill_zeros(img, size)
                finally:
                    await img.close()
                vol = RbdVolume(name, size, thick, time.time(), None, incoming)
                await catalog.add_volume(vol)
        except BaseException:
            await remove_quietly(images, name)
            raise
        self._spawn(self._refresh(st))
        return self._record(st, vol)

    async def incoming(self, name: str) -> VolumeRecord | None:
        st = self._find(name)
        vol = st.catalog.volume(name) if st is not None and st.catalog is not None else None
        return self._record(st, vol) if st is not None and vol is not None and vol.incoming else None

    async def promote(self, name: str) -> VolumeRecord:
        st = self._state(name)
        _, catalog = st.require()
        await catalog.promote(name)
        return self._any_record(name)

    async def delete(self, volume: VolumeRecord) -> None:
        st = self._state(volume.name)
        images, catalog = st.require()
        await self._released(st, volume.name)
        vol = catalog.volume(volume.name)
        # A failed migration's copy, discarded when its OSDs may just have come back: an
        # image it closed while they were away keeps a stale watch for a while. A job can
        # wait for it; a user's delete is told to try again.
        busy_wait = STALE_WATCH_WAIT if vol is not None and vol.incoming else 0.0
        with _ceph_errors(f"cannot delete volume {volume.name!r}"):
            # The catalog first: an image a crash leaves behind is marked, so provably ours.
            await catalog.remove_volume(volume.name)
            await remove_image(images, volume.name, busy_wait=busy_wait)
        st.figures.pop(volume.name, None)
        await purge_trash(images)  # its parent may have waited there for this clone

    async def snapshot_create(self, volume: VolumeRecord, snap: str, head: Export) -> SnapshotResult:
        st = self._state(volume.name)
        images, catalog = st.require()
        node = head.base
        assert isinstance(node, RbdNode)
        what = f"cannot snapshot {volume.name!r}"
        with _ceph_errors(what):
            img = await node.image()
            # Ceph would take it (a snapshot is metadata), but on a full pool it makes every
            # overwrite need new space: the volume's writers would fail where they now work.
            if (await images.quota()).full:
                raise CatalogError(
                    "no-space", f"{what}: the Ceph pool is full (every overwrite would need new space)"
                )
        vol = catalog.volume(volume.name)
        assert vol is not None
        # The intent first: a snapshot a crash leaves in RBD is then provably ours.
        await _set_pending(catalog, volume.name, snap, "create")
        try:
            # Drained: every write acknowledged before the snapshot is in it (the client
            # cache is off, so a completed write is on the OSDs already).
            async with head.drained():
                try:
                    await img.snapshot_create(snap)
                except StorageError as e:
                    taken = f"the RBD image has a snapshot named {snap!r} already (taken outside blockvirt)"
                    raise _storage_error(e, what, taken) from None
        except BaseException:
            await _clear_pending(catalog, volume.name, snap)
            raise
        record = RbdSnap(volume.name, snap, time.time(), vol.current, node.size)

        def fn(items: dict[str, Any]) -> Changes:
            raw = items.get(vol_key(volume.name))
            if raw is None:
                raise CatalogError("not-found", f"volume {volume.name!r} went away")
            return Changes(
                set={
                    snap_key(volume.name, snap): snap_raw(record),
                    vol_key(volume.name): {**raw, "current": snap},
                },
                remove=[pending_key(volume.name, snap)],
            )

        try:
            await catalog.mutate(fn)
        except BaseException:
            try:
                await img.snapshot_remove(snap)
                await _clear_pending(catalog, volume.name, snap)
            except StorageError as e:
                log.error(
                    "snapshot %s@%s left in Ceph after a failed catalog update: %s", volume.name, snap, e
                )
            raise
        return SnapshotResult(chain_depth=1)  # RBD reads a snapshot at one depth

    async def revert(self, volume: VolumeRecord, snap: str, head: Export) -> VolumeRecord:
        st = self._state(volume.name)
        _, catalog = st.require()
        target = catalog.snapshot(volume.name, snap)
        assert target is not None
        node = head.base
        assert isinstance(node, RbdNode)
        what = f"cannot revert {volume.name!r}"
        with _ceph_errors(what):
            img = await node.image()
        async with head.drained():
            with _ceph_errors(what):
                await img.snapshot_rollback(snap)
                size = await img.refresh_size()

            def fn(items: dict[str, Any]) -> Changes:
                raw = items.get(vol_key(volume.name))
                if raw is None:
                    raise CatalogError("not-found", f"volume {volume.name!r} went away")
                return Changes(set={vol_key(volume.name): {**raw, "current": snap, "size": size}})

            await catalog.mutate(fn)
            node.set_size(size)
            new = self._any_record(volume.name)  # incoming ones too (a move replays into them)
            head.record = new
        return new

    async def snapshot_delete(self, volume: VolumeRecord, snap: str) -> DeleteResult:
        st = self._state(volume.name)
        images, catalog = st.require()
        what = f"cannot delete snapshot {volume.name}@{snap}"
        await self._released(st, volume.name)  # its export, if it was open
        # The intent first: if a crash comes between removing the RBD snapshot and updating
        # the catalog, `check --repair` finishes the delete.
        await _set_pending(catalog, volume.name, snap, "delete")
        unknown = False  # whether the removal may still happen in Ceph
        try:
            with _ceph_errors(what):
                img = await images.open(volume.name)
                try:
                    await img.snapshot_remove(snap)
                except StorageError as e:
                    if e.errno == errno.ETIMEDOUT:
                        # Kept: the intent lets `check --repair`, or this delete run again
                        # (a snapshot already gone counts as deleted), finish it.
                        unknown = True
                        raise CatalogError(
                            "unavailable", f"{what}: {e}; run the delete again once the cluster answers"
                        ) from None
                    if e.errno != errno.ENOENT:
                        raise
                finally:
                    await img.close()
        except BaseException:
            if not unknown:
                await _clear_pending(catalog, volume.name, snap)
            raise

        def fn(items: dict[str, Any]) -> Changes:
            changes = forget_snapshot(items, volume.name, snap)
            changes.remove.append(pending_key(volume.name, snap))
            return changes

        await catalog.mutate(fn)
        return DeleteResult()

    async def clone(self, source: VolumeRecord, snap: str, new: str) -> None:
        st = self._state(source.name)
        images, catalog = st.require()
        base = catalog.snapshot(source.name, snap)
        assert base is not None
        what = f"cannot clone {source.name}@{snap}"
        try:
            await images.clone(source.name, snap, new)
        except StorageError as e:
            raise _storage_error(e, what, "an image of that name exists already in the Ceph pool") from None
        try:
            with _ceph_errors(what):
                img = await images.open(new)
                try:
                    await img.metadata_set(MARK, new)
                finally:
                    await img.close()
                await catalog.add_volume(RbdVolume(new, base.size, False, time.time(), None))
        except BaseException:
            await remove_quietly(images, new)
            raise
        # Known exactly until the next look: nothing of its own yet, and a parent to read through.
        st.figures[new] = VolumeFigures(0, 0, _depth(True))
        self._spawn(self._refresh(st))

    def clone_size(self, source: VolumeRecord, snap: str) -> int:
        s = self._catalog_of(source.name).snapshot(source.name, snap)
        assert s is not None
        return s.size

    async def flatten(self, volume: VolumeRecord) -> JobView:
        st = self._state(volume.name)
        images, _ = st.require()
        with _ceph_errors(f"cannot flatten {volume.name!r}"):
            img = await images.open(volume.name, read_only=True)
            try:
                parent = await img.parent()
            finally:
                await img.close()
        if parent is None:
            raise CatalogError("conflict", f"volume {volume.name!r} has no ancestors: nothing to flatten")
        return self.host.jobs.start(
            JobKind.FLATTEN, volume.name, {"backend": RBD_BACKEND, "volume": volume.name}
        )

    async def resize(self, volume: VolumeRecord, size: int, head: Export, *, force: bool) -> VolumeRecord:
        st = self._state(volume.name)
        _, catalog = st.require()
        node = head.base
        assert isinstance(node, RbdNode)
        with _ceph_errors(f"cannot resize {volume.name!r}"):
            img = await node.image()
            old = node.size
            cut = 0
            if size < old and not force:
                cut = sum(n for n, flags in await img.allocation(size, old - size) if not flags & HOLE)
        if size < old and not force:
            detail = (
                f"it would discard {cut} bytes of data past the new end"
                if cut
                else "no data lies past the new end"
            )
            raise CatalogError(
                "conflict", f"shrinking {volume.name!r} from {old} to {size} bytes needs --force ({detail})"
            )
        grow = size > old
        if grow:
            # Clients cannot reach past the node's size until the drained step below sets
            # it, so the image grows, and a thick volume's new range is filled, meanwhile.
            try:
                await img.resize(size)
                if volume.thick:
                    await fill_zeros(img, size, start=old)
            except StorageError as e:
                await shrink_back(img, old)
                raise _storage_error(e, f"cannot grow {volume.name!r}") from None
        async with head.drained():
            if not grow:
                try:
                    await img.resize(size, allow_shrink=True)
                except StorageError as e:
                    raise _storage_error(e, f"cannot resize {volume.name!r}") from None

            def fn(items: dict[str, Any]) -> Changes:
                raw = items.get(vol_key(volume.name))
                if raw is None:
                    raise CatalogError("not-found", f"volume {volume.name!r} went away")
                return Changes(set={vol_key(volume.name): {**raw, "size": size}})

            await catalog.mutate(fn)
            node.set_size(size)
            new = self._any_record(volume.name)  # incoming ones too (a move replays into them)
            head.record = new
        return new

    async def reset(self, volume: VolumeRecord) -> None:
        """The exports are closed; the next open makes a fresh image handle."""

    # ------------------------------------------------------------ background work
    async def run_work(self, ctx: WorkContext) -> None:
        if ctx.kind != JobKind.FLATTEN:
            raise AssertionError(f"the rbd backend runs no {ctx.kind} work")
        name = ctx.params["volume"]
        st = self._state(name)
        images, _ = st.require()
        head = next((e for e in self.host.exports() if e.volume == name and e.snapshot is None), None)
        own = head is None or not isinstance(head.base, RbdNode)
        img = await images.open(name) if own else await head.base.image()  # type: ignore[union-attr]
        object_bytes = 4 << 20

        def progress(done: int, total: int) -> None:
            ctx.progress(done * object_bytes, total * object_bytes)

        try:
            await img.flatten(progress)
        finally:
            if own:
                await img.close()
        await purge_trash(images)  # its parent may have waited there for this clone

    def busy_with(self, jobs: Sequence[JobView], volume: VolumeRecord) -> JobView | None:
        for job in jobs:
            if job.volume == volume.name:
                return job
        return None

    def plan_move(self, volume: VolumeRecord, target: PoolRecord, provisioning: str | None) -> dict[str, Any]:
        raise CatalogError("conflict", "moving a volume between RBD pools is done by copying (not yet)")

    async def move(self, ctx: WorkContext, hooks: MoveHooks) -> None:
        raise AssertionError("plan_move refuses every move")


def _held(extents: Sequence[DiffExtent]) -> int:
    return sum(e.length for e in extents if e.exists)


def pool_space(u: PoolUsage) -> tuple[int | None, int | None, int | None]:
    """(capacity, used, free) of a Ceph pool as blockvirt shows a pool's: what the pool holds
    (data, not replicas) against what it may still take (its quota, or what the OSDs have
    left for it after replication and full ratios). None until the mgr has reported."""
    if u.quota_bytes:
        return u.quota_bytes, u.stored, max(0, min(u.quota_bytes - u.stored, u.max_avail))
    if u.stored or u.max_avail:
        return u.stored + u.max_avail, u.stored, u.max_avail
    return None, None, None


async def _set_pending(catalog: RbdCatalog, volume: str, snap: str, op: str) -> None:
    entry = {"op": op, "created": time.time()}
    await catalog.mutate(lambda items: Changes(set={pending_key(volume, snap): entry}))


async def _clear_pending(catalog: RbdCatalog, volume: str, snap: str) -> None:
    """Best effort, after a change that did not happen (`check` tidies what is left)."""
    try:
        await catalog.mutate(lambda items: Changes(remove=[pending_key(volume, snap)]))
    except CatalogError as e:
        log.warning("snapshot %s@%s: intent left in the catalog: %s", volume, snap, e.message)


__all__ = ["RBD_BACKEND", "RbdBackend", "acl_key"]


def _address(members: Members, node: str) -> str:
    info = members.nodes.get(node)
    return info.nbd if info is not None else ""


def _depth(clone: bool) -> int:
    """The chain depth reported for an image: its own data, and a clone's parent below it
    (librbd reads through one parent; deeper ancestry is the parent's own depth)."""
    return 2 if clone else 1
