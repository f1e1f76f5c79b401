"""What one session's handshake sees: lookups go to the session's `ExportView`; LIST is served
from catalog records alone.

LIST needs names and descriptions only, and any client may send it before it is anyone (no
TLS, no access rule matched yet), so it must not open volumes: three catalog queries (volumes,
snapshots, access rules) per handshake, computed at the first LIST and reused by the ones after
it until the client's identity changes (STARTTLS).
"""

from __future__ import annotations

from collections import defaultdict

from blockvirt.nbd.events import ExportDenied, ExportInfo
from blockvirt.server.acl import Access, ClientIdentity, Rule, decide
from blockvirt.server.exports import ExportView
from blockvirt.storage.catalog import Catalog


def volume_description(thick: bool, pool: str) -> str:
    return f"blockvirt {'thick' if thick else 'thin'} volume in pool {pool}"


def snapshot_description(volume: str, snapshot: str) -> str:
    return f"blockvirt snapshot {snapshot} of volume {volume} (read-only)"


def list_exports(catalog: Catalog, client: ClientIdentity) -> list[tuple[str, str]]:
    """(name, description) of every export `client` may open: each volume, then its
    snapshots oldest first. Reads the catalog only."""
    rules: dict[str, list[Rule]] = defaultdict(list)
    for r in catalog.all_acl_rules():
        rules[r.volume].append(Rule(r.kind, r.value, r.read_only))
    snaps: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for s in catalog.all_snapshots():
        snaps[s.volume].append((s.created, s.name))
    out: list[tuple[str, str]] = []
    for rec in catalog.volumes():
        if decide(rules.get(rec.name, ()), client) is Access.DENIED:
            continue
        out.append((rec.name, volume_description(rec.thick, rec.pool)))
        for _, snap in sorted(snaps.get(rec.name, ())):
            out.append((f"{rec.name}@{snap}", snapshot_description(rec.name, snap)))
    return out


class SessionCatalog:
    """`nbd.handshake.ExportCatalog` for one session."""

    def __init__(self, view: ExportView, catalog: Catalog) -> None:
        self.view = view
        self.catalog = catalog
        self._listing: list[tuple[str, str]] | None = None

    @property
    def client(self) -> ClientIdentity:
        return self.view.client

    @client.setter
    def client(self, client: ClientIdentity) -> None:
        """After STARTTLS the client has certificate names: rules are decided afresh."""
        self.view.client = client
        self._listing = None

    def lookup(self, name: str) -> ExportInfo | ExportDenied | None:
        return self.view.lookup(name)

    def listing(self) -> list[tuple[str, str]]:
        if self._listing is None:
            self._listing = list_exports(self.catalog, self.view.client)
        return self._listing
