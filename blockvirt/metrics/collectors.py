"""Collectors: every value is read from live state when Prometheus scrapes, nothing is
updated on the data path here (the dispatcher bumps plain counters in VolumeStats).

Labels stay bounded: `volume` (one per volume, plus one per open `VOL@SNAP` snapshot export),
`op` (the seven NBD commands), `pool`, and `job` for running and recently finished jobs only.
Scrapes run on the event loop (the catalog's SQLite connection belongs to it), so they only
stat files and read memory: they never open a volume or read a layer map.
"""

from __future__ import annotations

import time
from collections.abc import Container, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from blockvirt.jobs.manager import RUNNING, Job, JobManager
from blockvirt.metrics.loop import LoopLagMonitor
from blockvirt.qos.manager import QosManager
from blockvirt.server.limits import SecurityCounters
from blockvirt.storage.export import Export
from blockvirt.storage.pools import STATE_LEVEL
from blockvirt.storage.stats import LATENCY_BOUNDS, Latency, VolumeStats
from blockvirt.storage.volumes import VolumeManager

#: Finished jobs stay visible this long (seconds), so a dashboard shows them reach 100 %...
JOB_RETENTION = 3600.0
#: ...and at most this many job series are exported (running ones first, then the newest).
MAX_JOB_SERIES = 50

_LE = [*(floatToGoString(b) for b in LATENCY_BOUNDS), "+Inf"]  # type: ignore[no-untyped-call]


def histogram_buckets(lat: Latency) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative, ending in +Inf) from non-cumulative counts."""
    return list(zip(_LE, (float(c) for c in lat.cumulative()), strict=True))


class VolumeCollector(Collector):
    """Per-export traffic, latency and connections; per-volume space, snapshots and depth.

    A snapshot export (`VOL@SNAP`, read-only) is counted under its own label value
    `volume="VOL@SNAP"` while it is open, not folded into the volume: its readers (backups,
    say) are a different workload from the volume's own initiators. To fold them in, sum over
    `label_replace(M, "volume", "$1", "volume", "([^@]+).*")`. Deleted volumes and snapshots
    vanish at the next scrape.
    """

    def __init__(self, volumes: VolumeManager) -> None:
        self.volumes = volumes

    def collect(self) -> Iterator[Metric]:
        vm = self.volumes
        rb = CounterMetricFamily("blockvirt_volume_read_bytes", "Bytes read by clients", labels=["volume"])
        wb = CounterMetricFamily(
            "blockvirt_volume_write_bytes", "Bytes written by clients", labels=["volume"]
        )
        ops = CounterMetricFamily(
            "blockvirt_volume_ops", "Requests served, by NBD command", labels=["volume", "op"]
        )
        errs = CounterMetricFamily(
            "blockvirt_volume_errors", "Requests answered with an error", labels=["volume"]
        )
        busy = CounterMetricFamily(
            "blockvirt_volume_busy_seconds",
            "Time spent serving requests (sum of request latencies; exceeds wall time under concurrency)",
            labels=["volume"],
        )
        lat = HistogramMetricFamily(
            "blockvirt_volume_latency_seconds",
            "Request service time inside the server, by NBD command",
            labels=["volume", "op"],
        )
        conns = GaugeMetricFamily("blockvirt_connections", "Connected NBD clients", labels=["volume"])
        size = GaugeMetricFamily("blockvirt_volume_size_bytes", "Virtual size", labels=["volume"])
        alloc = GaugeMetricFamily(
            "blockvirt_volume_allocated_bytes",
            "Bytes the volume's head and snapshots occupy in its pool",
            labels=["volume"],
        )
        snaps = GaugeMetricFamily("blockvirt_volume_snapshots", "Number of snapshots", labels=["volume"])
        depth = GaugeMetricFamily(
            "blockvirt_volume_chain_depth", "Layers a read may have to look through", labels=["volume"]
        )
        failed = GaugeMetricFamily(
            "blockvirt_volume_failed",
            "1 when a failed commit made the volume refuse writes until it is reset, or its "
            "storage is damaged (layers missing) so it cannot be opened",
            labels=["volume"],
        )

        records = vm.records()
        snap_names: set[str] = set()
        counts: dict[str, int] = {}
        for rec in records:
            snaps_of = vm.snapshots(rec.name)
            counts[rec.name] = len(snaps_of)
            snap_names.update(f"{rec.name}@{s.name}" for s in snaps_of)
        names = {r.name for r in records}
        exports: dict[str, Export] = {}
        for v in vm.exports():
            name = v.export_name
            if v.volume in names and (v.snapshot is None or name in snap_names):
                exports[name] = v

        def traffic(name: str, st: VolumeStats) -> None:
            rb.add_metric([name], st.read_bytes)
            wb.add_metric([name], st.write_bytes)
            errs.add_metric([name], st.errors)
            busy.add_metric([name], st.busy_seconds)
            for op, n in sorted(st.ops.items()):
                ops.add_metric([name, op], n)
            for op, h in sorted(st.latency.items()):
                lat.add_metric([name, op], histogram_buckets(h), h.total)

        empty = VolumeStats()
        for rec in records:
            vol = exports.get(rec.name)
            traffic(rec.name, vol.stats if vol is not None else empty)
            conns.add_metric([rec.name], vol.users if vol is not None else 0)
            figures = vm.figures(rec.name)
            broken = (vol is not None and vm.failed(vol)) or figures.error is not None
            failed.add_metric([rec.name], 1 if broken else 0)
            size.add_metric([rec.name], vol.size if vol is not None else rec.size)
            depth.add_metric([rec.name], figures.chain_depth)
            alloc.add_metric([rec.name], figures.allocated)
            snaps.add_metric([rec.name], counts[rec.name])
        for name, vol in sorted(exports.items()):
            if vol.snapshot is not None:
                traffic(name, vol.stats)
                conns.add_metric([name], vol.users)
        yield from (rb, wb, ops, errs, busy, lat, conns, size, alloc, snaps, depth, failed)


class PoolCollector(Collector):
    """Space per pool: the filesystem's view (capacity, used, free), what blockvirt's layers
    hold, and what its volumes promise (provisioned; overcommit = provisioned / capacity)."""

    def __init__(self, volumes: VolumeManager) -> None:
        self.volumes = volumes

    def collect(self) -> Iterator[Metric]:
        vm = self.volumes
        cap = GaugeMetricFamily(
            "blockvirt_pool_capacity_bytes", "Size of the pool's storage (a file pool: its filesystem)",
            labels=["pool"],
        )  # fmt: skip
        used = GaugeMetricFamily(
            "blockvirt_pool_used_bytes", "Bytes used on the pool's storage (by anything)", labels=["pool"]
        )
        free = GaugeMetricFamily(
            "blockvirt_pool_free_bytes", "Bytes still available on the pool's storage", labels=["pool"]
        )
        alloc = GaugeMetricFamily(
            "blockvirt_pool_allocated_bytes", "Bytes blockvirt's volumes occupy in the pool", labels=["pool"]
        )
        prov = GaugeMetricFamily(
            "blockvirt_pool_provisioned_bytes",
            "Sum of the virtual sizes of the pool's volumes",
            labels=["pool"],
        )
        over = GaugeMetricFamily(
            "blockvirt_pool_overcommit_ratio", "Provisioned bytes / capacity", labels=["pool"]
        )
        state = GaugeMetricFamily(
            "blockvirt_pool_watermark_state",
            "Used space against the pool's watermarks: 0 ok, 1 warning, 2 critical",
            labels=["pool"],
        )
        for pool in vm.catalog.pools():
            info = vm.pools.info(pool)
            prov.add_metric([pool.name], info["provisioned"])
            alloc.add_metric([pool.name], info["allocated"])
            state.add_metric([pool.name], STATE_LEVEL[info["state"]])
            if info["capacity"] is None:
                continue  # an unreachable pool: no space figures rather than wrong ones
            cap.add_metric([pool.name], info["capacity"])
            used.add_metric([pool.name], info["used"])
            free.add_metric([pool.name], info["free"])
            if info["capacity"]:
                over.add_metric([pool.name], info["provisioned"] / info["capacity"])
        yield from (cap, used, free, alloc, prov, over, state)


class ClusterCollector(Collector):
    """This node in the clusters of its shared (RBD) pools: the volumes it serves, how their
    ownership changed, fencing, and its view of the peers' heartbeats (docs/cluster.md).
    Nothing is exported for a node without shared pools."""

    def __init__(self, volumes: VolumeManager) -> None:
        self.volumes = volumes

    def collect(self) -> Iterator[Metric]:
        owned = GaugeMetricFamily(
            "blockvirt_cluster_owned_volumes", "Volumes of the pool this node serves (owns)", labels=["pool"]
        )
        changes = CounterMetricFamily(
            "blockvirt_cluster_ownership_changes",
            "Volumes this node took (taken), handed to another node (released), or stopped"
            " serving because it may no longer write them (lost)",
            labels=["pool", "change"],
        )
        fenced = CounterMetricFamily(
            "blockvirt_cluster_fenced", "Times this node's Ceph client was found fenced and replaced",
            labels=["pool"],
        )  # fmt: skip
        fenced_peers = CounterMetricFamily(
            "blockvirt_cluster_peers_fenced",
            "Locks of presumed-dead holders this node broke (each blocklists that Ceph client)",
            labels=["pool"],
        )
        alive = GaugeMetricFamily(
            "blockvirt_cluster_peer_alive", "1 if the peer's heartbeat moved lately, 0 if presumed dead",
            labels=["pool", "node"],
        )  # fmt: skip
        age = GaugeMetricFamily(
            "blockvirt_cluster_peer_heartbeat_age_seconds",
            "Seconds since this node last saw the peer's heartbeat move",
            labels=["pool", "node"],
        )
        for cluster in self.volumes.cluster_view():
            pool = str(cluster["pool"])
            if "changes" not in cluster:
                continue  # the pool cannot be reached: no figures rather than wrong ones
            for n in cluster["nodes"]:
                if n["me"]:
                    owned.add_metric([pool], len(n["volumes"]))
                    continue
                alive.add_metric([pool, n["name"]], 1.0 if n["alive"] else 0.0)
                if n["heartbeat_age"] is not None:
                    age.add_metric([pool, n["name"]], float(n["heartbeat_age"]))
            counts = cluster["changes"]
            for change in ("taken", "released", "lost"):
                changes.add_metric([pool, change], counts.get(change, 0))
            fenced.add_metric([pool], counts.get("fenced", 0))
            fenced_peers.add_metric([pool], counts.get("peers_fenced", 0))
        yield from (owned, changes, fenced, fenced_peers, alive, age)


class QosCollector(Collector):
    """Storage I/O control: per volume what it waited and how it was served, its settings
    and tags; per pool its capacity (configured and effective), latency and queue."""

    def __init__(self, volumes: VolumeManager, qos: QosManager | None) -> None:
        self.volumes = volumes
        self.qos = qos

    def collect(self) -> Iterator[Metric]:
        qos = self.qos
        wait = CounterMetricFamily(
            "blockvirt_qos_wait_seconds", "Time requests spent waiting for QoS admission", labels=["volume"]
        )
        served = CounterMetricFamily(
            "blockvirt_qos_requests",
            "Requests admitted, by how: at once, by shares, by reservation",
            labels=["volume", "phase"],
        )
        queued = GaugeMetricFamily("blockvirt_qos_queued_requests", "Requests waiting now", labels=["volume"])
        setting = GaugeMetricFamily(
            "blockvirt_qos_setting",
            "QoS settings: shares, reservation and limit (4 KiB IOPS; limit is the effective one), bps_limit",
            labels=["volume", "setting"],
        )
        tags = GaugeMetricFamily(
            "blockvirt_qos_tag_seconds",
            "A volume's rate tags against now (positive: ahead of its schedule), by tag",
            labels=["volume", "tag"],
        )
        pcap = GaugeMetricFamily(
            "blockvirt_pool_qos_capacity_iops", "Configured capacity (0: not capped)", labels=["pool"]
        )
        pwin = GaugeMetricFamily(
            "blockvirt_pool_qos_window_requests",
            "Requests latency control lets into the pool's backend at once (pools with a latency "
            "target; absent while it holds nothing back)",
            labels=["pool"],
        )
        pinf = GaugeMetricFamily(
            "blockvirt_pool_qos_inflight_requests",
            "Requests in the pool's backend now, counted by latency control",
            labels=["pool"],
        )
        plat = GaugeMetricFamily(
            "blockvirt_pool_qos_latency_seconds",
            "The 95th percentile of backend latency latency control last saw (pools with a latency target)",
            labels=["pool"],
        )
        pq = GaugeMetricFamily(
            "blockvirt_pool_qos_queued_requests", "Requests waiting in the pool", labels=["pool"]
        )
        if qos is None:
            yield from (wait, served, queued, setting, tags, pcap, pwin, pinf, plat, pq)
            return
        now = time.monotonic()
        for rec in self.volumes.records():
            vq = qos.volumes.get(rec.name)
            view = qos.volume_view(rec.name)
            wait.add_metric([rec.name], vq.wait_seconds if vq is not None else 0.0)
            for key in ("effective_shares", "reservation", "effective_limit", "bps_limit"):
                name = key.removeprefix("effective_")
                setting.add_metric([rec.name, name], float(view.get(key) or 0))
            if vq is None:
                continue
            leaf = vq.leaf
            for phase, n in leaf.served.items():
                served.add_metric([rec.name, phase], n)
            queued.add_metric([rec.name], len(leaf.queue))
            for tag, pacer in (
                ("reservation", leaf.res_pacer),
                ("limit", leaf.limit_pacer),
                ("bps", leaf.bps_pacer),
            ):
                if pacer is not None and pacer.tat > -1e300:
                    tags.add_metric([rec.name, tag], pacer.tat - now)
        for name, pool in qos.pools.items():
            pcap.add_metric([name], pool.configured)
            pq.add_metric([name], pool.sched.root.queued)
            if pool.latency is not None:
                plat.add_metric([name], pool.latency.last_latency)
                pinf.add_metric([name], pool.sched.inflight)
                if pool.sched.window != float("inf"):
                    pwin.add_metric([name], pool.sched.window)
        yield from (wait, served, queued, setting, tags, pcap, pwin, pinf, plat, pq)


def exported_jobs(jobs: Iterable[Job], volumes: Container[str], now: float | None = None) -> list[Job]:
    """Running jobs, then jobs that ended within JOB_RETENTION on volumes that still exist
    (newest first); at most MAX_JOB_SERIES."""
    now = time.time() if now is None else now
    running: list[Job] = []
    ended: list[Job] = []
    for j in jobs:
        if j.state == RUNNING:
            running.append(j)
        elif now - j.updated <= JOB_RETENTION and j.volume in volumes:
            ended.append(j)
    running.sort(key=lambda j: j.created, reverse=True)
    ended.sort(key=lambda j: j.updated, reverse=True)
    return (running + ended)[:MAX_JOB_SERIES]


class JobCollector(Collector):
    def __init__(self, volumes: VolumeManager, jobs: JobManager) -> None:
        self.volumes = volumes
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        prog = GaugeMetricFamily(
            "blockvirt_job_progress_ratio",
            "Progress of running and recently finished jobs (0 to 1)",
            labels=["job", "volume", "kind"],
        )
        running = GaugeMetricFamily(
            "blockvirt_jobs_running", "Jobs running now, by kind (every kind seen so far)", labels=["kind"]
        )
        counts: dict[str, int] = {}
        jobs = self.jobs.list()
        for j in jobs:
            counts[j.kind] = counts.get(j.kind, 0) + (j.state == RUNNING)
        for j in exported_jobs(jobs, {r.name for r in self.volumes.records()}):
            prog.add_metric([j.id, j.volume, j.kind], j.fraction)
        for kind, n in sorted(counts.items()):
            running.add_metric([kind], n)
        yield from (prog, running)


class LoopCollector(Collector):
    def __init__(self, monitor: LoopLagMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        lag = self.monitor.lag
        h = HistogramMetricFamily(
            "blockvirt_event_loop_lag_seconds",
            f"How late a timer due every {self.monitor.interval:g}s fired: time the event loop was busy",
        )
        h.add_metric([], histogram_buckets(lag), lag.total)
        yield h


class SecurityCollector(Collector):
    """Refused accesses and connections, and sessions cut by a timeout, from the plain
    counters the listener and its sessions bump."""

    def __init__(self, counters: SecurityCounters, volumes: VolumeManager) -> None:
        self.counters = counters
        self.volumes = volumes

    def collect(self) -> Iterator[Metric]:
        c = self.counters
        denied = CounterMetricFamily(
            "blockvirt_access_denied",
            "Opens of an export refused by its volume's access rules (INFO, GO, META_CONTEXT, EXPORT_NAME)",
            labels=["volume"],
        )
        names = {r.name for r in self.volumes.records()}
        for vol in list(c.access_denied):
            if vol not in names:
                del c.access_denied[vol]  # deleted volumes vanish, as in every other family
        for vol, n in sorted(c.access_denied.items()):
            denied.add_metric([vol], n)
        refused = CounterMetricFamily(
            "blockvirt_connections_refused",
            "NBD connections closed at accept: over a connection limit, or the server stopping",
            labels=["reason"],
        )
        for reason, n in sorted(c.refused.items()):
            refused.add_metric([reason], n)
        timed_out = CounterMetricFamily(
            "blockvirt_connections_timed_out",
            "NBD sessions cut by a timeout, by phase (handshake, request, idle, reply)",
            labels=["phase"],
        )
        for phase, n in sorted(c.timed_out.items()):
            timed_out.add_metric([phase], n)
        yield from (denied, refused, timed_out)


class InfoCollector(Collector):
    def __init__(self) -> None:
        try:
            from importlib.metadata import version

            self.version = version("blockvirt")
        except Exception:
            self.version = "unknown"

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("blockvirt_build_info", "Always 1; the version is a label", labels=["version"])
        g.add_metric([self.version], 1)
        yield g
