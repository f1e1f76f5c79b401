"""Export registry: NBD export names -> volumes, and what each export advertises.

Flags and block sizes come from the node's capabilities, never from switches. The registry
is asked afresh at every INFO/GO, so a new handshake sees the current size. Each client sees
it through an `ExportView`, which applies the volume's access rules to that client.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from blockvirt.nbd.constants import BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH
from blockvirt.nbd.contexts import dirty_bitmap_context
from blockvirt.nbd.events import ExportDenied, ExportInfo, ExportUnavailable
from blockvirt.server.acl import Access, ClientIdentity, Rule, decide
from blockvirt.server.bitmaps import SessionBitmaps
from blockvirt.server.limits import LogThrottle
from blockvirt.storage.catalog import CatalogError
from blockvirt.storage.export import Export
from blockvirt.storage.node import StorageError
from blockvirt.storage.volumes import VolumeManager

if TYPE_CHECKING:
    from blockvirt.qos.manager import QosManager, VolumeQos

log = logging.getLogger("blockvirt.exports")


class ExportRegistry:
    def __init__(self, volumes: VolumeManager, qos: QosManager | None = None) -> None:
        self.volumes = volumes
        #: Storage I/O control (None: no QoS at all).
        self.qos = qos
        self._log_throttle = LogThrottle(interval=10.0)

    def catalog(self, client: ClientIdentity | None = None) -> ExportView:
        """The view one client gets: the volumes' access rules applied to `client`."""
        return ExportView(self, client if client is not None else ClientIdentity(""))

    def rules(self, volume: str) -> list[Rule]:
        return [Rule(r.kind, r.value, r.read_only) for r in self.volumes.acl_rules(volume)]

    def exists(self, name: str) -> bool:
        """Whether export `name` (`VOL` or `VOL@SNAP`) exists, without opening it."""
        return self.volumes.exists(name)

    def resolve(self, name: str) -> Export | None:
        return self.volumes.volume(name)

    def open(self, name: str) -> Export | ExportUnavailable | None:
        """The open export, or why it cannot be opened: a volume whose layers are damaged must
        cost its own clients a clear refusal, never the session or anyone else's."""
        try:
            return self.resolve(name)
        except Exception as e:  # whatever the backend raises: the handshake must go on
            held = self._log_throttle.allow(name, time.monotonic())
            if held is not None:
                more = f" ({held} more since the last report)" if held else ""
                expected = isinstance(e, OSError | CatalogError | StorageError)  # no traceback for those
                log.warning("export %r cannot be opened: %s%s", name, e, more, exc_info=not expected)
            # The client learns that it is broken, not where: paths stay in the log.
            why = f"export {name!r} is unavailable: its storage could not be opened (see the server log)"
            return ExportUnavailable(name, why)

    def qos_for(self, vol: Export) -> VolumeQos | None:
        """The volume's QoS handle (a snapshot export is charged to its volume)."""
        return None if self.qos is None else self.qos.volume_qos(vol.volume)

    def bitmaps(self, vol: Export, contexts: dict[int, str]) -> SessionBitmaps | None:
        """What answers a session's qemu:dirty-bitmap contexts (None if it selected none)."""
        return SessionBitmaps.select(self.volumes.changes, vol, contexts)

    def describe(self, vol: Export, *, contexts: bool = True) -> ExportInfo:
        """What the export advertises; without `contexts` (LIST shows names only) its
        metadata contexts are not looked up."""
        caps = vol.capabilities()
        rec = vol.record
        if vol.snapshot is not None:
            description = snapshot_description(rec.name, vol.snapshot)
        else:
            description = volume_description(rec.thick, rec.pool)
        return ExportInfo(
            name=vol.export_name,
            size=vol.size,
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
            contexts=self.contexts(vol, caps.can_extents) if contexts else (),
        )

    def contexts(self, vol: Export, can_extents: bool) -> tuple[str, ...]:
        """The metadata contexts of an export: allocation if its node maps extents, and one
        qemu:dirty-bitmap:S per older snapshot S of its branch (what changed since S)."""
        allocation = (BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH) if can_extents else ()
        older = self.volumes.snapshot_ancestors(vol.volume, vol.snapshot)
        return (*allocation, *(dirty_bitmap_context(s) for s in older))


def volume_description(thick: bool, pool: str) -> str:
    return f"blockvirt {'thick' if thick else 'thin'} volume in pool {pool}"


def snapshot_description(volume: str, snapshot: str) -> str:
    return f"blockvirt snapshot {snapshot} of volume {volume} (read-only)"


class ExportView:
    """Implements nbd.handshake.ExportCatalog for one connection. `client` is who the session
    knows the peer to be; it gains certificate names after STARTTLS.

    LIST needs names and descriptions only, and any client may send it before it is anyone
    (no TLS, no access rule matched yet), so it opens no volume: records only, computed at
    the first LIST and reused by the ones after it until the client's identity changes."""

    def __init__(self, registry: ExportRegistry, client: ClientIdentity) -> None:
        self.registry = registry
        self._client = client
        self._listing: list[tuple[str, str]] | None = None

    @property
    def client(self) -> ClientIdentity:
        return self._client

    @client.setter
    def client(self, client: ClientIdentity) -> None:
        """After STARTTLS the client has certificate names: rules are decided afresh."""
        self._client = client
        self._listing = None

    def access(self, volume: str) -> Access:
        """What this client may do with volume `volume` (and its snapshots), per its rules."""
        return decide(self.registry.rules(volume), self.client)

    def lookup(self, name: str) -> ExportInfo | ExportDenied | ExportUnavailable | None:
        # Decide before opening anything: a refused client must not make us open a volume.
        if not self.registry.exists(name):
            return None
        volume, at, _ = name.partition("@")
        access = self.access(volume)
        if access is Access.DENIED:
            who = self.client.describe() or "no client certificate"
            return ExportDenied(name, f"no access rule matches {self.client.address or '?'} ({who})")
        if not at:  # a snapshot is immutable: any node may serve it beside the owner
            elsewhere = self.registry.volumes.served_elsewhere(volume)
            if elsewhere is not None:
                return ExportDenied(name, elsewhere, elsewhere=elsewhere)
        vol = self.registry.open(name)
        if vol is None or isinstance(vol, ExportUnavailable):
            return vol
        return self._granted(self.registry.describe(vol), access)

    @staticmethod
    def _granted(info: ExportInfo, access: Access) -> ExportInfo:
        return dataclasses.replace(info, read_only=True) if access is Access.READ_ONLY else info

    def listing(self) -> list[tuple[str, str]]:
        """(name, description) of every export this client may open: each volume, then its
        snapshots oldest first."""
        if self._listing is None:
            volumes = self.registry.volumes
            out: list[tuple[str, str]] = []
            for rec in volumes.records():
                if self.access(rec.name) is Access.DENIED:
                    continue
                out.append((rec.name, volume_description(rec.thick, rec.pool)))
                for snap in volumes.snapshots(rec.name):
                    out.append((f"{rec.name}@{snap.name}", snapshot_description(rec.name, snap.name)))
            self._listing = out
        return self._listing
