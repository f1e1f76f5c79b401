"""The catalog of an RBD pool's volumes, kept in the Ceph pool itself.

Everything another blockvirt node needs to serve the pool's volumes lives in one versioned
omap document (omap.py), the RADOS object `blockvirt.catalog` of the Ceph pool:

    vol/<volume>             {"size", "thick", "created", "current"}  current: the snapshot
                                                                     the head sits on (or null)
    snap/<volume>/<snap>     {"created", "parent", "size"}          parent: the snapshot it
                                                                     was taken on top of
    acl/<volume>             {"next": n, "rules": [{"id", "kind", "value", "read_only", "created"}]}
    qos/<volume>             {"group", "settings"}
    pending/<volume>/<snap>  {"op": "create"|"delete", "created"}  a change to that RBD
                                                                     snapshot under way: what
                                                                     a crash leaves is provably
                                                                     ours (`check --repair`)

The data itself is in RBD: a volume is the image named after it, a snapshot the RBD
snapshot of that name on it. '/' cannot occur in names, so keys never collide.

A node keeps the document in memory (reads are cheap, as handshakes need) and changes it by
read-modify-write with a version check (`mutate`), so concurrent writers on other nodes
cannot lose each other's changes.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blockvirt.storage.backends.rbd.cluster import CephConnection
from blockvirt.storage.backends.rbd.errors import CephError
from blockvirt.storage.backends.rbd.omap import OmapDocument, VersionConflict
from blockvirt.storage.catalog import AclRecord, CatalogError
from blockvirt.storage.node import StorageError

log = logging.getLogger("blockvirt.rbd")

OID = "blockvirt.catalog"


def vol_key(name: str) -> str:
    return f"vol/{name}"


def snap_key(volume: str, snap: str) -> str:
    return f"snap/{volume}/{snap}"


def acl_key(volume: str) -> str:
    return f"acl/{volume}"


def qos_key(volume: str) -> str:
    return f"qos/{volume}"


def pending_key(volume: str, snap: str) -> str:
    return f"pending/{volume}/{snap}"


@dataclass(frozen=True, slots=True)
class RbdVolume:
    name: str
    size: int
    thick: bool
    created: float
    current: str | None
    #: The migration job moving it in (invisible until it switches over), or None.
    incoming: str | None = None


@dataclass(frozen=True, slots=True)
class RbdSnap:
    volume: str
    name: str
    created: float
    parent: str | None
    size: int


@dataclass
class Changes:
    """What a mutation sets and removes."""

    set: dict[str, Any] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)


class RbdCatalog:
    def __init__(self, conn: CephConnection) -> None:
        self.doc = OmapDocument(conn, OID)
        self.version = 0
        self.items: dict[str, Any] = {}
        #: Called after each change this node made (the backend tells the other nodes).
        self.on_change: Callable[[], None] | None = None

    async def load(self) -> None:
        doc = await self.doc.read()
        self.version, self.items = doc.version, doc.items

    # ------------------------------------------------------------ reads (memory)
    def volume(self, name: str) -> RbdVolume | None:
        """The volume, incoming or not."""
        raw = self.items.get(vol_key(name))
        return _volume(name, raw) if raw is not None else None

    def volumes(self) -> list[RbdVolume]:
        """Every volume, incoming ones included."""
        return sorted(
            (_volume(k[4:], v) for k, v in self.items.items() if k.startswith("vol/")),
            key=lambda v: v.name,
        )

    async def promote(self, name: str) -> None:
        def fn(items: dict[str, Any]) -> Changes:
            raw = items.get(vol_key(name))
            if raw is None:
                raise CatalogError("not-found", f"incoming volume {name!r} is gone")
            return Changes(set={vol_key(name): {**raw, "incoming": None}})

        await self.mutate(fn)

    def snapshot(self, volume: str, snap: str) -> RbdSnap | None:
        raw = self.items.get(snap_key(volume, snap))
        return _snap(volume, snap, raw) if raw is not None else None

    def snapshots(self, volume: str) -> list[RbdSnap]:
        prefix = f"snap/{volume}/"
        snaps = [_snap(volume, k[len(prefix) :], v) for k, v in self.items.items() if k.startswith(prefix)]
        return sorted(snaps, key=lambda s: (s.created, s.name))

    def pending(self) -> list[tuple[str, str, str]]:
        """(volume, snapshot, op) of every snapshot change under way (or cut short)."""
        out = []
        for k, v in sorted(self.items.items()):
            if k.startswith("pending/"):
                volume, _, snap = k[len("pending/") :].partition("/")
                out.append((volume, snap, str(v.get("op", ""))))
        return out

    def acl(self, volume: str) -> dict[str, Any]:
        raw = self.items.get(acl_key(volume))
        return raw if isinstance(raw, dict) else {"next": 1, "rules": []}

    def qos(self) -> list[tuple[str, str | None, dict[str, Any]]]:
        return [
            (k[4:], v.get("group"), v.get("settings", {}))
            for k, v in sorted(self.items.items())
            if k.startswith("qos/")
        ]

    # ------------------------------------------------------------ writes (Ceph)
    async def mutate(self, fn: Callable[[dict[str, Any]], Changes], *, attempts: int = 20) -> Changes:
        """Read the document, compute changes from it, write them if nobody wrote since; on a
        conflict start over. `fn` may raise (CatalogError) to refuse."""
        for _ in range(attempts):
            try:
                doc = await self.doc.read()
                changes = fn(doc.items)
                version = await self.doc.update(
                    set=changes.set, remove=changes.remove, expect_version=doc.version
                )
            except VersionConflict:
                continue
            except StorageError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CatalogError(
                        "no-space", "cannot update the pool's catalog: the Ceph pool is full"
                    ) from None
                raise CatalogError("unavailable", f"cannot update the pool's catalog in Ceph: {e}") from None
            except CephError as e:
                raise CatalogError("unavailable", f"cannot update the pool's catalog in Ceph: {e}") from None
            items = dict(doc.items)
            for k in changes.remove:
                items.pop(k, None)
            items.update(changes.set)
            self.version, self.items = version, items
            if self.on_change is not None and (changes.set or changes.remove):
                self.on_change()
            return changes
        raise CatalogError("conflict", "the pool's catalog in Ceph keeps changing; try again")

    async def put_volume(self, vol: RbdVolume) -> None:
        await self.mutate(lambda items: Changes(set={vol_key(vol.name): _volume_raw(vol)}))

    async def add_volume(self, vol: RbdVolume) -> None:
        def fn(items: dict[str, Any]) -> Changes:
            if vol_key(vol.name) in items:
                raise CatalogError("conflict", f"volume {vol.name!r} already exists in the pool")
            return Changes(set={vol_key(vol.name): _volume_raw(vol)})

        await self.mutate(fn)

    async def remove_volume(self, name: str) -> None:
        """The volume and everything hanging off it: snapshots, rules, QoS."""

        def fn(items: dict[str, Any]) -> Changes:
            prefixes = (f"snap/{name}/", f"pending/{name}/")
            gone = [k for k in items if k.startswith(prefixes)]
            gone += [k for k in (vol_key(name), acl_key(name), qos_key(name), f"owner/{name}") if k in items]
            return Changes(remove=gone)

        await self.mutate(fn)

    # ------------------------------------------------------------ settings
    async def add_acl_rule(self, volume: str, kind: str, value: str, read_only: bool) -> AclRecord:
        now = time.time()
        made: list[AclRecord] = []

        def fn(items: dict[str, Any]) -> Changes:
            made.clear()
            acl = dict(items.get(acl_key(volume)) or {"next": 1, "rules": []})
            rules = list(acl["rules"])
            if any(r["kind"] == kind and r["value"] == value for r in rules):
                raise CatalogError("conflict", f"volume {volume!r} already has a {kind} rule for {value!r}")
            rule = {"id": acl["next"], "kind": kind, "value": value, "read_only": read_only, "created": now}
            made.append(_acl(volume, rule))
            return Changes(set={acl_key(volume): {"next": acl["next"] + 1, "rules": [*rules, rule]}})

        await self.mutate(fn)
        return made[0]

    def acl_rules(self, volume: str) -> list[AclRecord]:
        return [_acl(volume, r) for r in self.acl(volume)["rules"]]

    async def remove_acl_rules(self, volume: str, rule_id: int | None) -> int:
        """Remove one rule (by id) or all (None); how many went."""
        removed = [0]

        def fn(items: dict[str, Any]) -> Changes:
            acl = dict(items.get(acl_key(volume)) or {"next": 1, "rules": []})
            keep = [r for r in acl["rules"] if rule_id is not None and r["id"] != rule_id]
            removed[0] = len(acl["rules"]) - len(keep)
            return Changes(set={acl_key(volume): {**acl, "rules": keep}})

        await self.mutate(fn)
        return removed[0]

    async def save_qos(self, volume: str, group: str | None, settings: dict[str, Any]) -> None:
        await self.mutate(
            lambda items: Changes(set={qos_key(volume): {"group": group, "settings": settings}})
        )


def forget_snapshot(items: dict[str, Any], volume: str, snap: str) -> Changes:
    """The changes that take snapshot `snap` out of `volume`'s tree: its children, and the
    head if it sits on it, move to its parent (as on a file pool)."""
    raw = items.get(snap_key(volume, snap))
    parent = raw.get("parent") if raw is not None else None
    changes = Changes(remove=[snap_key(volume, snap)])
    prefix = f"snap/{volume}/"
    for key, value in items.items():
        if key.startswith(prefix) and value.get("parent") == snap:
            changes.set[key] = {**value, "parent": parent}
    vraw = items.get(vol_key(volume))
    if vraw is not None and vraw.get("current") == snap:
        changes.set[vol_key(volume)] = {**vraw, "current": parent}
    return changes


def _volume(name: str, raw: dict[str, Any]) -> RbdVolume:
    return RbdVolume(
        name,
        int(raw["size"]),
        bool(raw["thick"]),
        float(raw["created"]),
        raw.get("current"),
        raw.get("incoming"),
    )


def _volume_raw(vol: RbdVolume) -> dict[str, Any]:
    return {
        "size": vol.size,
        "thick": vol.thick,
        "created": vol.created,
        "current": vol.current,
        "incoming": vol.incoming,
    }


def _snap(volume: str, name: str, raw: dict[str, Any]) -> RbdSnap:
    return RbdSnap(volume, name, float(raw["created"]), raw.get("parent"), int(raw["size"]))


def snap_raw(snap: RbdSnap) -> dict[str, Any]:
    return {"created": snap.created, "parent": snap.parent, "size": snap.size}


def _acl(volume: str, r: dict[str, Any]) -> AclRecord:
    return AclRecord(
        int(r["id"]), volume, str(r["kind"]), str(r["value"]), bool(r["read_only"]), float(r["created"])
    )
