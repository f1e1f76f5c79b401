"""QoS on the event loop: one scheduler per pool, admission for sessions, live settings.

The scheduler math is in scheduler.py (pure). Here: a timer per pool that hands out queued
requests when their turn comes (futures), the latency controller's tick, what the catalog
holds (settings of volumes and groups), and the answers `qos show` and /metrics give.

Requests wait, never fail, because of QoS; a waiting request whose client goes away is
dropped from its queue (the session cancels it). When the service stops, every queue is let
go at once, so in-flight work can finish within the shutdown deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from blockvirt.qos import config as qc
from blockvirt.qos.cost import CostModel
from blockvirt.qos.latency import PERIOD, LatencyControl
from blockvirt.qos.scheduler import IMMEDIATE, RESERVATION, WEIGHT, Leaf, Params, Request, Scheduler
from blockvirt.storage.catalog import CatalogError, validate_name
from blockvirt.storage.pools import PoolSettings
from blockvirt.storage.volumes import VolumeManager

log = logging.getLogger("blockvirt.qos")
_monotonic = time.monotonic

BACKGROUND = "(background)"
#: Commands that cost one 4 KiB I/O whatever their length (they move no data).
UNIT_BYTES = 4096


class PoolQos:
    """One pool's scheduler and the timer that runs it."""

    def __init__(self, name: str, settings: PoolSettings) -> None:
        self.name = name
        self.sched = Scheduler(0.0)
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.latency: LatencyControl | None = None
        self.a = 1.0
        self.b = 0.0
        self.configured = 0.0
        self.background = self.sched.leaf(BACKGROUND, Params(shares=float(settings.background_shares)))
        self.released = False  # shutting down: everything goes at once
        self.apply(settings)

    def apply(self, s: PoolSettings) -> None:
        self.configured = s.iops_capacity
        self.a, self.b = CostModel(s.cost_s0).coefficients()
        self.sched.set_capacity(s.iops_capacity)
        if s.latency_target_ms > 0:
            target = s.latency_target_ms / 1000
            if self.latency is None:
                self.latency = LatencyControl(target)
            else:
                self.latency.target = target
        else:
            self.latency = None
            self.sched.window = math.inf
        self.background.apply(Params(shares=float(s.background_shares)))

    @property
    def capped(self) -> bool:
        return self.sched.capacity > 0 or self.latency is not None

    def cost(self, nbytes: int) -> float:
        return self.a + self.b * nbytes

    # ------------------------------------------------------------ dispatch
    def kick(self) -> None:
        """(Re)arm the timer for the scheduler's next moment."""
        if self.released:
            return
        now = time.monotonic()
        t = self.sched.next_time(now)
        if t is None:
            return
        if self.timer is not None:
            if self.timer_at <= t:
                return
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer_at = t
        self.timer = loop.call_at(t, self._run)

    def _run(self) -> None:
        self.timer = None
        now = time.monotonic()
        for req in self.sched.dispatch(now):
            self._grant(req)
        self.kick()

    def _grant(self, req: Request) -> None:
        fut = req.token
        if not fut.done():
            fut.set_result(None)

    async def wait(self, leaf: Leaf, cost: float, nbytes: int, *, count: bool = False) -> bool:
        """Until the request may go. With `count` (and latency control on), the request is
        counted in the backend's window: the caller must call finished(). Returns whether it
        was counted. Cancelling the caller takes the request out of the queue."""
        if self.released:
            return False
        counted = count and self.latency is not None
        now = time.monotonic()
        if self.sched.try_now(leaf, cost, nbytes, now):
            if counted:
                self.sched.started()
            return counted
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        req = self.sched.enqueue(leaf, cost, nbytes, now, fut, counted=counted)
        self.kick()
        try:
            await fut
        except asyncio.CancelledError:
            if not self.sched.cancel(req) and fut.done() and counted:
                self.finished()  # granted just before the cancel: give its place back
            raise
        return counted

    def finished(self, seconds: float | None = None) -> None:
        """A counted request left the backend (`seconds`: its service time)."""
        self.sched.finished()
        if seconds is not None and self.latency is not None:
            self.latency.observe(seconds)
        if self.sched.root.queued:
            self.kick()

    def release_all(self) -> None:
        self.released = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for leaf in [*self.sched.leaves.values()]:
            for req in list(leaf.queue):
                self.sched.cancel(req)
                self._grant(req)

    def tick_latency(self) -> None:
        lc = self.latency
        if lc is None:
            return
        sched = self.sched
        sched.window = lc.update(sched.peak_inflight)
        sched.peak_inflight = sched.inflight
        self.kick()


class VolumeQos:
    """A volume's handle on its pool's scheduler, shared by its sessions (and its snapshot
    exports). `active` is false when nothing can hold it back (uncapped pool, no limits):
    then admission costs one attribute read."""

    __slots__ = ("active", "leaf", "name", "pool", "wait_seconds")

    def __init__(self, name: str, pool: PoolQos, leaf: Leaf) -> None:
        self.name = name
        self.pool = pool
        self.leaf = leaf
        self.active = False
        self.wait_seconds = 0.0

    def try_admit(self, nbytes: int) -> int:
        """Admit now if possible (no waiting in line, no rate in the way): 0 if not, 1 if
        admitted, 2 if admitted and counted in the pool's latency window (then the caller
        must call finished())."""
        pool = self.pool
        if pool.released:
            return 1
        cost = pool.a + pool.b * (nbytes or UNIT_BYTES)
        if not pool.sched.try_now(self.leaf, cost, nbytes, _monotonic()):
            return 0
        if pool.latency is None:
            return 1
        pool.sched.started()
        return 2

    async def admit(self, nbytes: int) -> bool:
        """Wait for admission; returns whether the request is counted (see try_admit)."""
        pool = self.pool
        t0 = _monotonic()
        try:
            return await pool.wait(self.leaf, pool.a + pool.b * (nbytes or UNIT_BYTES), nbytes, count=True)
        finally:
            self.wait_seconds += _monotonic() - t0

    def finished(self, seconds: float | None) -> None:
        """A counted request is done (`seconds`: its service time; None when it was served
        inline, never touching the device)."""
        self.pool.finished(seconds)


@dataclass
class _Rates:
    """Cost units and requests served per second, over the last second (for `qos show`)."""

    last: dict[str, tuple[float, int]] = field(default_factory=dict)
    rate: dict[str, tuple[float, float]] = field(default_factory=dict)


class QosManager:
    """Every pool's QoS, the catalog's QoS settings, and the API's view of them."""

    def __init__(self, storage: VolumeManager) -> None:
        #: Volumes and their settings come from storage (each backend keeps its own); pools
        #: and groups from the node's catalog.
        self.storage = storage
        self.catalog = storage.catalog
        self.pools: dict[str, PoolQos] = {}
        self.volumes: dict[str, VolumeQos] = {}
        self.groups: dict[str, qc.GroupDef] = {}
        self.settings: dict[str, qc.QosSettings] = {}  # volume -> its settings
        self.membership: dict[str, str | None] = {}  # volume -> group
        self._ticker: asyncio.Task[None] | None = None
        self._rates = _Rates()
        self._editing = asyncio.Lock()

    # ------------------------------------------------------------ lifecycle
    def load(self) -> None:
        for p in self.catalog.pools():
            self.pools[p.name] = PoolQos(p.name, PoolSettings.from_dict(p.settings))
        for name, parent, raw in self.catalog.qos_groups():
            self.groups[name] = qc.GroupDef(name, parent, qc.QosSettings.from_dict(json.loads(raw)))
        self._adopt()
        for pool in self.pools.values():
            self._build(pool)

    def _adopt(self) -> None:
        """Take in the saved settings of volumes not seen yet: at load, and later for volumes
        that appear without being created here (an RBD pool reached after the start, or
        attached with its volumes: their settings come from the pool's catalog in Ceph)."""
        new = [rec.name for rec in self.storage.records() if rec.name not in self.settings]
        if not new:
            return
        rows = {v: (g, json.loads(raw)) for v, g, raw in self.storage.all_volume_qos()}
        for name in new:
            group, raw = rows.get(name, (None, {}))
            if group is not None and group not in self.groups:
                # Groups are the node's: another node's group is not known here.
                log.warning("volume %s: QoS group %r is not defined on this node: ignored", name, group)
                group = None
            self.settings[name] = qc.QosSettings.from_dict(raw)
            self.membership[name] = group

    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def close(self) -> None:
        """Let every waiting request go (the service is stopping)."""
        for pool in self.pools.values():
            pool.release_all()
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass

    async def _tick(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(PERIOD)
            for pool in self.pools.values():
                pool.tick_latency()
            n += 1
            if n % 4 == 0:
                self._sample_rates()

    def _sample_rates(self) -> None:
        for pool in self.pools.values():
            for name, leaf in pool.sched.leaves.items():
                key = f"{pool.name}/{name}"
                cur = (leaf.cost_served, sum(leaf.served.values()))
                before = self._rates.last.get(key)
                self._rates.last[key] = cur
                if before is not None:
                    self._rates.rate[key] = (cur[0] - before[0], float(cur[1] - before[1]))

    # ------------------------------------------------------------ tree building
    def _group_chain(self, group: str | None) -> list[str]:
        """The group and its ancestors, root-most first."""
        out: list[str] = []
        while group is not None:
            out.append(group)
            group = self.groups[group].parent
        return out[::-1]

    def _ensure_groups(self, pool: PoolQos, group: str | None) -> None:
        for g in self._group_chain(group):
            d = self.groups[g]
            pool.sched.group(g, d.settings.params(), d.parent)

    def _build(self, pool: PoolQos) -> None:
        for rec in self.storage.records():
            if rec.pool == pool.name:
                self._place(rec.name, pool)

    def _place(self, volume: str, pool: PoolQos) -> VolumeQos:
        group = self.membership.get(volume)
        self._ensure_groups(pool, group)
        leaf = pool.sched.leaf(volume, self.settings.get(volume, qc.QosSettings()).params(), group)
        vq = self.volumes.get(volume)
        if vq is None:
            vq = self.volumes[volume] = VolumeQos(volume, pool, leaf)
        else:
            vq.pool, vq.leaf = pool, leaf
        self._prune(pool)
        self._refresh_active(pool)
        return vq

    def _prune(self, pool: PoolQos) -> None:
        """Drop group instances no volume of this pool needs any more (leaves first)."""
        changed = True
        while changed:
            changed = False
            for name, node in list(pool.sched.groups.items()):
                if not node.children:
                    pool.sched.remove_group(name)
                    changed = True

    def _refresh_active(self, pool: PoolQos) -> None:
        for vq in self.volumes.values():
            if vq.pool is pool:
                vq.active = pool.capped or self._limited(vq.leaf)

    @staticmethod
    def _limited(leaf: Leaf) -> bool:
        if leaf.params.bps_limit or leaf.params.limit:
            return True
        node = leaf.parent
        while node is not None:
            if node.params.limit:
                return True
            node = node.parent
        return False

    # ------------------------------------------------------------ events from storage
    def volume_qos(self, volume: str) -> VolumeQos | None:
        """The handle for a volume's sessions (created on first use)."""
        vq = self.volumes.get(volume)
        if vq is not None:
            return vq
        rec = self.storage.record(volume)
        if rec is None:
            return None
        pool = self._pool(rec.pool)
        self._adopt()
        self.settings.setdefault(volume, qc.QosSettings())
        self.membership.setdefault(volume, None)
        return self._place(volume, pool)

    def _pool(self, name: str) -> PoolQos:
        pool = self.pools.get(name)
        if pool is None:
            rec = self.catalog.pool(name)
            assert rec is not None
            pool = self.pools[name] = PoolQos(name, PoolSettings.from_dict(rec.settings))
        return pool

    def volume_deleted(self, volume: str) -> None:
        vq = self.volumes.pop(volume, None)
        self.settings.pop(volume, None)
        self.membership.pop(volume, None)
        if vq is not None:
            for req in vq.pool.sched.remove_leaf(volume):
                vq.pool._grant(req)  # its sessions are gone; let anything left through
            self._prune(vq.pool)

    def volume_settings_changed(self, volume: str) -> None:
        """Another node sharing the volume's pool changed its QoS settings: the node serving
        it must enforce them, and every node show them."""
        rows = [(g, json.loads(r)) for v, g, r in self.storage.all_volume_qos() if v == volume]
        group, raw = rows[0] if rows else (None, {})
        if group is not None and group not in self.groups:  # groups are each node's own
            log.warning("qos of volume %s: group %s is not defined on this node", volume, group)
            group = None
        self.settings[volume], self.membership[volume] = qc.QosSettings.from_dict(raw), group
        vq = self.volumes.get(volume)
        if vq is not None:
            self._place(volume, vq.pool)
            vq.pool.kick()
        log.info("qos of volume %s changed on another node: %s", volume, self.settings[volume])

    def volume_moved(self, volume: str, pool_name: str) -> None:
        """A migration switched the volume to another pool: its queue goes with it."""
        vq = self.volumes.get(volume)
        if vq is None:
            return
        old = vq.pool
        new = self._pool(pool_name)
        if old is new:
            return
        leaf = old.sched.take_leaf(volume)
        self._prune(old)
        group = self.membership.get(volume)
        self._ensure_groups(new, group)
        new.sched.adopt(leaf, group)
        vq.pool = new
        self._refresh_active(old)
        self._refresh_active(new)
        new.kick()

    def pool_changed(self, name: str) -> None:
        """A pool's settings changed (capacity, cost model, latency target)."""
        rec = self.catalog.pool(name)
        if rec is None:
            self.pools.pop(name, None)
            return
        pool = self._pool(name)
        pool.apply(PoolSettings.from_dict(rec.settings))
        self._refresh_active(pool)
        pool.kick()

    def check_capacity(self, pool: str, capacity: float) -> None:
        """Refuse a capacity below the reservations the pool already guarantees."""
        caps = {pool: capacity}
        qc.validate(self.groups, self._volume_defs(), caps)

    def check_pool_settings(self, pool: str, settings: PoolSettings) -> None:
        self.check_capacity(pool, settings.iops_capacity)

    async def disconnect(self, volume: str) -> None:
        """Nothing: QoS holds no connections (a StorageEvents listener)."""

    async def evict(self, volume: str) -> None:
        """Nothing: the sessions' waiting requests go with their connections."""

    async def background(self, pool_name: str, nbytes: int) -> None:
        """Admission for background copies (migration) in a pool: the background class."""
        pool = self.pools.get(pool_name)
        if pool is None or not pool.capped:
            return
        await pool.wait(pool.background, pool.cost(nbytes), nbytes)  # not counted: no finish

    # ------------------------------------------------------------ settings (API)
    def _volume_defs(
        self, override: dict[str, tuple[str | None, qc.QosSettings]] | None = None
    ) -> dict[str, qc.VolumeDef]:
        self._adopt()
        out = {}
        for rec in self.storage.records():
            group, settings = self.membership.get(rec.name), self.settings.get(rec.name, qc.QosSettings())
            if override and rec.name in override:
                group, settings = override[rec.name]
            out[rec.name] = qc.VolumeDef(rec.name, rec.pool, group, settings)
        return out

    def _capacities(self) -> dict[str, float]:
        return {p.name: PoolSettings.from_dict(p.settings).iops_capacity for p in self.catalog.pools()}

    async def set_volume(self, volume: str, changes: dict[str, Any]) -> dict[str, Any]:
        # One at a time: the checks below must still hold when the (remote) store has saved.
        async with self._editing:
            return await self._set_volume(volume, changes)

    async def _set_volume(self, volume: str, changes: dict[str, Any]) -> dict[str, Any]:
        rec = self.storage.record(volume)
        if rec is None:
            raise CatalogError("not-found", f"no volume named {volume!r}")
        unknown = set(changes) - {"shares", "reservation", "limit", "bps_limit", "group"}
        if unknown:
            raise CatalogError("invalid", f"unknown QoS setting(s): {', '.join(sorted(unknown))}")
        settings = self.settings.get(volume, qc.QosSettings()).updated(changes, group=False)
        group = self.membership.get(volume)
        if "group" in changes:
            g = changes["group"]
            if g is not None and not isinstance(g, str):
                raise CatalogError("invalid", "group must be a group name, or null for none")
            group = g or None
            if group is not None and group not in self.groups:
                raise CatalogError("not-found", f"no group named {group!r}")
        qc.validate(self.groups, self._volume_defs({volume: (group, settings)}), self._capacities())
        await self.storage.settings_of(volume).save_volume_qos(volume, group, json.dumps(settings.to_dict()))
        self.settings[volume], self.membership[volume] = settings, group
        vq = self.volume_qos(volume)
        assert vq is not None
        self._place(volume, vq.pool)
        vq.pool.kick()
        log.info("qos of volume %s: %s, group %s", volume, settings, group, extra={"volume": volume})
        return self.volume_view(volume)

    def set_group(self, name: str, changes: dict[str, Any], *, create: bool) -> dict[str, Any]:
        validate_name(name, "group")
        unknown = set(changes) - {"shares", "reservation", "limit", "parent"}
        if unknown:
            raise CatalogError("invalid", f"unknown group setting(s): {', '.join(sorted(unknown))}")
        old = self.groups.get(name)
        if create and old is not None:
            raise CatalogError("conflict", f"group {name!r} already exists")
        if not create and old is None:
            raise CatalogError("not-found", f"no group named {name!r}")
        parent = old.parent if old is not None else None
        if "parent" in changes:
            p = changes["parent"]
            if p is not None and not isinstance(p, str):
                raise CatalogError("invalid", "parent must be a group name, or null for none")
            parent = p or None
            if parent is not None and parent not in self.groups:
                raise CatalogError("not-found", f"no parent group named {parent!r}")
        settings = (old.settings if old else qc.QosSettings()).updated(changes, group=True)
        groups = {**self.groups, name: qc.GroupDef(name, parent, settings)}
        qc.validate(groups, self._volume_defs(), self._capacities())
        self.catalog.save_qos_group(name, parent, json.dumps(settings.to_dict()))
        self.groups = groups
        for pool in self.pools.values():
            if name in pool.sched.groups:
                self._ensure_groups(pool, name)
            self._refresh_active(pool)
            pool.kick()
        log.info("qos group %s: %s, parent %s", name, settings, parent)
        return self.group_view(name)

    def delete_group(self, name: str) -> None:
        if name not in self.groups:
            raise CatalogError("not-found", f"no group named {name!r}")
        kids = sorted(g.name for g in self.groups.values() if g.parent == name)
        members = sorted(v for v, g in self.membership.items() if g == name)
        if kids or members:
            what = ", ".join([*(f"group {k}" for k in kids), *(f"volume {m}" for m in members)])
            raise CatalogError("conflict", f"group {name!r} is not empty ({what}): move them out first")
        self.catalog.delete_qos_group(name)
        del self.groups[name]

    # ------------------------------------------------------------ views
    def volume_view(self, volume: str) -> dict[str, Any]:
        self._adopt()
        s = self.settings.get(volume, qc.QosSettings())
        group = self.membership.get(volume)
        vq = self.volume_qos(volume)  # placed in its pool's scheduler if it was not yet
        out: dict[str, Any] = {
            "volume": volume,
            "group": group,
            **s.to_dict(),
            "effective_shares": s.effective_shares,
            "effective_limit": qc.effective_limit(self.groups, group, s.limit),
        }
        if vq is not None:
            leaf = vq.leaf
            rate = self._rates.rate.get(f"{vq.pool.name}/{volume}")
            out.update(
                pool=vq.pool.name,
                active=vq.active,
                queued=len(leaf.queue),
                wait_seconds=round(leaf.wait_seconds, 6),
                served={k: leaf.served[k] for k in (IMMEDIATE, WEIGHT, RESERVATION)},
                cost_units_per_second=round(rate[0], 1) if rate else None,
                iops=round(rate[1], 1) if rate else None,
            )
        return out

    def group_view(self, name: str) -> dict[str, Any]:
        g = self.groups[name]
        return {
            "group": name,
            "parent": g.parent,
            **g.settings.to_dict(),
            "effective_shares": g.settings.effective_shares,
            "effective_limit": qc.effective_limit(self.groups, g.parent, g.settings.limit),
            "volumes": sorted(v for v, m in self.membership.items() if m == name),
        }

    def show(self) -> dict[str, Any]:
        vols = self._volume_defs()
        pools = []
        for p in self.catalog.pools():
            pq = self.pools.get(p.name)
            settings = PoolSettings.from_dict(p.settings)
            reserved = qc.top_reservations(self.groups, vols, p.name)
            effective = pq.sched.capacity if pq is not None else settings.iops_capacity
            window = pq.sched.window if pq is not None else math.inf
            warnings = []
            if effective and reserved > effective:
                warnings.append(
                    f"reservations ({reserved:g} IOPS) exceed the effective capacity ({effective:g} IOPS): "
                    "they are served in proportion to their size"
                )
            if reserved and not effective:
                warnings.append("reservations mean nothing until the pool has a capacity or a latency target")
            bg = pq.background if pq is not None else None
            pools.append(
                {
                    "pool": p.name,
                    "capacity": settings.iops_capacity,
                    "effective_capacity": effective,
                    "latency_target_ms": settings.latency_target_ms,
                    "latency_ms": round(pq.latency.last_latency * 1000, 3) if pq and pq.latency else None,
                    "window": None if math.isinf(window) else round(window, 1),
                    "inflight": pq.sched.inflight if pq is not None else 0,
                    "cost_s0": settings.cost_s0,
                    "reserved": reserved,
                    "queued": pq.sched.root.queued if pq is not None else 0,
                    "background": {"shares": settings.background_shares, "served": dict(bg.served)}
                    if bg
                    else None,
                    "warnings": warnings,
                }
            )
        return {
            "pools": pools,
            "groups": [self.group_view(g) for g in sorted(self.groups)],
            "volumes": [self.volume_view(v.name) for v in self.storage.records()],
        }
