"""One explicit CollectorRegistry (never the global one) and the collector that fills it."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from blockvirt.storage.volumes import VolumeManager


class VolumeCollector(Collector):
    """Reads per-volume counters and sizes when scraped; deleted volumes simply vanish."""

    def __init__(self, volumes: VolumeManager) -> None:
        self.volumes = volumes

    def collect(self) -> Iterator[Metric]:
        rb = CounterMetricFamily("blockvirt_volume_read_bytes", "Bytes read by clients", labels=["volume"])
        wb = CounterMetricFamily(
            "blockvirt_volume_write_bytes", "Bytes written by clients", labels=["volume"]
        )
        ops = CounterMetricFamily("blockvirt_volume_ops", "Requests by operation", labels=["volume", "op"])
        errs = CounterMetricFamily(
            "blockvirt_volume_errors", "Requests answered with an error", labels=["volume"]
        )
        size = GaugeMetricFamily("blockvirt_volume_size_bytes", "Virtual size", labels=["volume"])
        alloc = GaugeMetricFamily(
            "blockvirt_volume_allocated_bytes", "Bytes allocated in the pool", labels=["volume"]
        )
        conns = GaugeMetricFamily("blockvirt_connections", "Connected NBD clients", labels=["volume"])
        for rec in self.volumes.records():
            vol = self.volumes.volume(rec.name)
            if vol is None:
                continue
            name = rec.name
            st = vol.stats
            rb.add_metric([name], st.read_bytes)
            wb.add_metric([name], st.write_bytes)
            errs.add_metric([name], st.errors)
            for op, n in sorted(st.ops.items()):
                ops.add_metric([name, op], n)
            size.add_metric([name], vol.node.size)
            alloc.add_metric([name], vol.node.allocated_bytes())
            conns.add_metric([name], vol.users)
        yield from (rb, wb, ops, errs, size, alloc, conns)


def build_registry(volumes: VolumeManager) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VolumeCollector(volumes))
    return registry
