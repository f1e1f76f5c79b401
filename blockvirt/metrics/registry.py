"""One explicit CollectorRegistry (never the global one) and the collectors that fill it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from blockvirt.jobs.manager import JobManager
from blockvirt.metrics.collectors import (
    ClusterCollector,
    InfoCollector,
    JobCollector,
    LoopCollector,
    PoolCollector,
    QosCollector,
    SecurityCollector,
    VolumeCollector,
)
from blockvirt.metrics.loop import LoopLagMonitor
from blockvirt.qos.manager import QosManager
from blockvirt.server.limits import SecurityCounters
from blockvirt.storage.volumes import VolumeManager

__all__ = ["VolumeCollector", "build_registry"]


def build_registry(
    volumes: VolumeManager,
    jobs: JobManager,
    qos: QosManager | None = None,
    loop_lag: LoopLagMonitor | None = None,
    security: SecurityCounters | None = None,
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VolumeCollector(volumes))
    if security is not None:
        registry.register(SecurityCollector(security, volumes))
    registry.register(PoolCollector(volumes))
    registry.register(ClusterCollector(volumes))
    registry.register(QosCollector(volumes, qos))
    registry.register(JobCollector(volumes, jobs))
    registry.register(InfoCollector())
    if loop_lag is not None:
        registry.register(LoopCollector(loop_lag))
    # process_* (CPU, memory, fds, start time), python_info and python_gc_*.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
