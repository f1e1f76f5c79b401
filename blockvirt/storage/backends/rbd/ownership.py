"""Who serves each volume of an RBD pool, and how a node takes one safely (docs/cluster.md).

The record `owner/<volume>` in the pool's catalog says which node serves the volume (and, for
a planned move, which node should). It routes clients and is changed only with a version
check, so two nodes racing for a volume cannot both win it. What makes serving safe is the
image's exclusive lock: the owner holds it in managed mode (another client's writes fail),
and taking it from a node presumed dead breaks it, which blocklists that node's Ceph client
before this node writes a byte.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockvirt.storage.backends.rbd.catalog import Changes, RbdCatalog
from blockvirt.storage.backends.rbd.image import AsyncImage
from blockvirt.storage.catalog import CatalogError

log = logging.getLogger("blockvirt.cluster")


def owner_key(volume: str) -> str:
    return f"owner/{volume}"


@dataclass(frozen=True, slots=True)
class Owner:
    node: str
    epoch: int
    #: Where a planned move should take it (volume move, node drain), or None.
    target: str | None = None


def read_owner(items: dict[str, Any], volume: str) -> Owner | None:
    raw = items.get(owner_key(volume))
    if not isinstance(raw, dict) or not raw.get("node"):
        return None
    return Owner(str(raw["node"]), int(raw.get("epoch", 0)), raw.get("target"))


def owners(items: dict[str, Any]) -> dict[str, Owner]:
    """volume -> its owner, for every owned volume."""
    out = {}
    for key in items:
        if key.startswith("owner/"):
            o = read_owner(items, key[6:])
            if o is not None:
                out[key[6:]] = o
    return out


class ServedElsewhere(CatalogError):
    """The volume is served by a live peer: this node must not serve it."""

    def __init__(self, volume: str, node: str, address: str) -> None:
        where = f" at {address}" if address else ""
        super().__init__("conflict", f"volume {volume!r} is served by node {node}{where}")
        self.node = node
        self.address = address


class Incoming(ServedElsewhere):
    """A live peer is handing the volume to this node (a planned move) but has not yet:
    try again shortly."""


class Ownership:
    """One pool's ownership records, as this node uses them."""

    def __init__(
        self,
        catalog: RbdCatalog,
        me: str,
        alive: Callable[[str], bool],
        address_of: Callable[[str], str],
    ) -> None:
        self.catalog = catalog
        self.me = me
        self.alive = alive
        self.address_of = address_of
        #: Counters for metrics: volumes taken, released (handed off) and lost (this node may
        #: no longer write them); times this node's client was fenced, and locks it broke
        #: (each fencing another client).
        self.changes = {"taken": 0, "released": 0, "lost": 0, "fenced": 0, "peers_fenced": 0}
        #: The record's epoch when this node last took each volume: reopening a volume it
        #: still owns is no change, taking one another node handed it (a planned move) is.
        self._epochs: dict[str, int] = {}

    def owner(self, volume: str) -> Owner | None:
        return read_owner(self.catalog.items, volume)

    def elsewhere(self, volume: str, *, moving: bool = True) -> Owner | None:
        """The live peer serving the volume, if one does (from the cached catalog). With
        `moving`, while this node is asked to hand the volume to another (a planned move),
        that node: new clients go there, never to a fresh export here that would take the
        image's lock again in the middle of the handoff."""
        o = self.owner(volume)
        if o is None:
            return None
        if o.node == self.me:
            if moving and self._handing(o):
                return Owner(str(o.target), o.epoch)
            return None
        if moving and o.target == self.me:
            return None  # coming to us: a client may connect now, its first request waits
        return o if self.alive(o.node) else None

    def _handing(self, o: Owner) -> bool:
        return o.node == self.me and o.target not in (None, self.me) and self.alive(str(o.target))

    def mine(self) -> list[str]:
        return sorted(v for v, o in owners(self.catalog.items).items() if o.node == self.me)

    async def claim(self, volume: str) -> Owner:
        """Make this node the volume's owner in the catalog: it was free, ours, or its owner
        is presumed dead. Raises ServedElsewhere if a live peer has it, Incoming if that
        peer is handing it to us (it does so itself, releasing its lock first)."""
        claimed: list[Owner] = []

        def fn(items: dict[str, Any]) -> Changes:
            claimed.clear()
            current = read_owner(items, volume)
            if current is not None and self._handing(current):
                target = str(current.target)
                raise ServedElsewhere(volume, target, self.address_of(target))
            if current is not None and current.node == self.me:
                claimed.append(current)
                return Changes()
            if current is not None and self.alive(current.node):
                if current.target == self.me:
                    raise Incoming(volume, current.node, self.address_of(current.node))
                raise ServedElsewhere(volume, current.node, self.address_of(current.node))
            epoch = (current.epoch if current is not None else 0) + 1
            claimed.append(Owner(self.me, epoch))
            return Changes(set={owner_key(volume): {"node": self.me, "epoch": epoch, "target": None}})

        await self.catalog.mutate(fn)
        owner = claimed[0]
        if self._epochs.get(volume) != owner.epoch:
            self._epochs[volume] = owner.epoch
            self.changes["taken"] += 1
        return owner

    async def hand_to(self, volume: str, node: str | None) -> None:
        """Give the volume up (our lock is released already): to `node`, or to nobody."""

        def fn(items: dict[str, Any]) -> Changes:
            current = read_owner(items, volume)
            if current is None or current.node != self.me:
                return Changes()  # not ours any more: nothing to hand over
            if node is None:
                return Changes(remove=[owner_key(volume)])
            return Changes(
                set={owner_key(volume): {"node": node, "epoch": current.epoch + 1, "target": None}}
            )

        await self.catalog.mutate(fn)
        self._epochs.pop(volume, None)
        self.changes["released"] += 1

    def lost(self, volume: str) -> None:
        """This node stopped serving the volume because it may no longer write it."""
        self._epochs.pop(volume, None)
        self.changes["lost"] += 1

    async def want(self, volume: str, node: str) -> None:
        """Ask the volume's owner to hand it to `node` (a planned move); a free volume is
        simply given to `node`."""

        def fn(items: dict[str, Any]) -> Changes:
            current = read_owner(items, volume)
            if current is None or not self.alive(current.node):
                epoch = (current.epoch if current is not None else 0) + 1
                return Changes(set={owner_key(volume): {"node": node, "epoch": epoch, "target": None}})
            if current.node == node:
                return Changes()
            return Changes(
                set={owner_key(volume): {"node": current.node, "epoch": current.epoch, "target": node}}
            )

        await self.catalog.mutate(fn)

    async def cancel_move(self, volume: str) -> None:
        """The node a planned move was to go to is gone: this node keeps the volume."""

        def fn(items: dict[str, Any]) -> Changes:
            current = read_owner(items, volume)
            if current is None or current.node != self.me or current.target is None:
                return Changes()
            return Changes(set={owner_key(volume): {"node": self.me, "epoch": current.epoch, "target": None}})

        await self.catalog.mutate(fn)

    async def forget(self, volume: str) -> None:
        """The volume is gone: its record goes with it."""
        await self.catalog.mutate(
            lambda items: Changes(remove=[k for k in [owner_key(volume)] if k in items])
        )


class HeldByLiveNode(CatalogError):
    """The image's lock is held by a node this one does not presume dead: never break it."""

    def __init__(self, image: str, node: str, address: str) -> None:
        where = f" at {address}" if address else ""
        super().__init__("conflict", f"volume {image!r} is served by node {node}{where}")
        self.node = node


async def take_lock(
    img: AsyncImage, holder_node: Callable[[str], tuple[str, bool] | None], me: str | None = None
) -> list[str]:
    """Hold the image's exclusive lock; a holder that is not us is fenced first (lock_break
    blocklists its Ceph client and waits for the newest OSD map). Returns who was fenced.

    Call it only once the catalog says we own the volume. Even then the holder is broken
    only if `holder_node(address)` says it belongs to no node we know, or to one presumed
    dead: the record alone is not enough. A node frozen between its claim and its
    lock_acquire, whose volume was taken over meanwhile, would otherwise resume, find the new
    owner holding the lock, and break it: fencing a healthy node and serving a volume that is
    no longer its own. (On resume it is blind, so it presumes nobody dead: it refuses.)"""
    fenced: list[str] = []
    if not await img.is_lock_owner():
        owners = await img.lock_owners()
        if me is not None and any(h.owner == me for h in owners):
            # Held by this client (address `me`) through a handle that is gone: every handle
            # of ours on the image is closed by now (the caller waits for them).
            await img.release_orphaned_lock()
            owners = [h for h in owners if h.owner != me]
        for holder in owners:
            known = holder_node(holder.owner)
            if known is not None and known[1]:
                raise HeldByLiveNode(img.name, known[0], "")
            await img.lock_break(holder)
            fenced.append(holder.owner)
            log.warning("image %s: broke the lock of %s (fenced it)", img.name, holder.owner)
        await img.lock_acquire(exclusive=True)
    return fenced
