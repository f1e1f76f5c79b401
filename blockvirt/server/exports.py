"""Export registry: NBD export names -> volumes, and what each export advertises.

Flags and block sizes come from the node's capabilities, never from switches. The registry
is asked afresh at every INFO/GO, so a new handshake sees the current size.
"""

from __future__ import annotations

from collections.abc import Iterable

from blockvirt.nbd.constants import BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH
from blockvirt.nbd.events import ExportInfo
from blockvirt.storage.volumes import Volume, VolumeManager


class ExportRegistry:
    def __init__(self, volumes: VolumeManager) -> None:
        self.volumes = volumes

    def catalog(self, peer: str = "") -> ExportView:
        """The view one client gets (the place where per-client access rules will apply)."""
        return ExportView(self, peer)

    def resolve(self, name: str) -> Volume | None:
        return self.volumes.volume(name)

    def describe(self, vol: Volume) -> ExportInfo:
        caps = vol.node.capabilities()
        rec = vol.record
        if vol.snapshot is not None:
            description = f"blockvirt snapshot {vol.snapshot} of volume {rec.name} (read-only)"
        else:
            kind = "thick" if rec.thick else "thin"
            description = f"blockvirt {kind} volume in pool {rec.pool}"
        return ExportInfo(
            name=vol.export_name,
            size=vol.node.size,
            description=description,
            read_only=not caps.writable,
            can_flush=caps.can_flush,
            can_fua=caps.can_fua,
            can_trim=caps.can_trim,
            can_zero=caps.can_zero,
            can_fast_zero=caps.can_fast_zero,
            can_cache=caps.can_cache,
            can_multi_conn=caps.can_multi_conn,
            min_block=caps.min_block,
            pref_block=caps.pref_block,
            max_block=caps.max_block,
            contexts=(BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH) if caps.can_extents else (),
        )


class ExportView:
    """Implements nbd.handshake.ExportCatalog for one connection."""

    def __init__(self, registry: ExportRegistry, peer: str) -> None:
        self.registry = registry
        self.peer = peer

    def lookup(self, name: str) -> ExportInfo | None:
        vol = self.registry.resolve(name)
        return None if vol is None else self.registry.describe(vol)

    def exports(self) -> Iterable[ExportInfo]:
        volumes = self.registry.volumes
        for rec in volumes.records():
            vol = self.registry.resolve(rec.name)
            if vol is not None:
                yield self.registry.describe(vol)
            for snap in volumes.catalog.snapshots(rec.name):
                svol = self.registry.resolve(f"{rec.name}@{snap.name}")
                if svol is not None:
                    yield self.registry.describe(svol)
