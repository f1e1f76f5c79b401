"""Who serves an RBD pool: the nodes that attached it, and which of them are alive.

Each node writes its own key `node/<name>` of the omap document `blockvirt.nodes` in the Ceph
pool every HEARTBEAT seconds: its addresses, its Ceph client address and a counter it bumps.
Peers never compare clocks: each notes, on its own monotonic clock, when it last saw a peer's
counter change (`Liveness`, pure). A peer whose counter has not moved for DEAD_AFTER seconds
is presumed dead. Presumed only: safety comes from fencing (ownership.py), not from this.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blockvirt.storage.backends.rbd.cluster import CephConnection
from blockvirt.storage.backends.rbd.errors import CephError
from blockvirt.storage.backends.rbd.omap import OmapDocument
from blockvirt.storage.node import StorageError

log = logging.getLogger("blockvirt.cluster")

OID = "blockvirt.nodes"
#: Seconds between heartbeats, and between looks at the peers' ones.
HEARTBEAT = 1.0
#: A peer whose heartbeat did not move for this long is presumed dead.
DEAD_AFTER = 5.0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    nbd: str  # host:port clients reach it at
    api: str  # its management API URL
    client: str  # its Ceph client address (what fencing blocklists)
    beat: int
    started: float


@dataclass
class Liveness:
    """Peers' heartbeats as this node saw them (pure: time is an argument).

    A peer is judged only on time this node could see it. If this node itself did not read
    the member list for a while (it was frozen, its process stalled, Ceph did not answer), a
    peer's still counter says nothing about the peer: without this, a node resuming from a
    stall would believe every peer dead until its next read, and could break a healthy
    owner's lock (fencing it) for a client that reached it meanwhile. So: while blind, no
    peer is presumed dead; after a blind spell every peer's clock starts again.
    """

    dead_after: float = DEAD_AFTER
    seen: dict[str, tuple[int, float]] = field(default_factory=dict)  # name -> (beat, when)
    #: When this node last read everyone's heartbeats (None: never), and first did.
    looked: float | None = None
    since: float | None = None

    @property
    def blind_after(self) -> float:
        """No read for this long: this node cannot tell who is dead."""
        return self.dead_after / 2

    def looked_at(self, now: float) -> None:
        """This node read the member list at `now` (call before observe())."""
        if self.looked is not None and now - self.looked > self.blind_after:
            self.seen = {name: (beat, now) for name, (beat, _) in self.seen.items()}
        self.looked = now
        if self.since is None:
            self.since = now

    def observe(self, name: str, beat: int, now: float) -> None:
        before = self.seen.get(name)
        if before is None or before[0] != beat:
            self.seen[name] = (beat, now)

    def forget(self, name: str) -> None:
        self.seen.pop(name, None)

    def blind(self, now: float) -> bool:
        return self.looked is None or now - self.looked > self.blind_after

    def age(self, name: str, now: float) -> float | None:
        """Seconds since the peer's heartbeat last moved (None: never seen)."""
        got = self.seen.get(name)
        return None if got is None else max(0.0, now - got[1])

    def alive(self, name: str, now: float) -> bool:
        """Not presumed dead: its heartbeat moved within dead_after, or this node is blind.
        A node never seen (no heartbeat in the list: it left, or it joined after our last
        read) counts as one last seen when we started looking."""
        if self.blind(now):
            return True
        age = self.age(name, now)
        if age is None:
            assert self.since is not None
            age = now - self.since
        return age < self.dead_after


def _info(name: str, raw: dict[str, Any]) -> NodeInfo:
    return NodeInfo(
        name,
        str(raw.get("nbd", "")),
        str(raw.get("api", "")),
        str(raw.get("client", "")),
        int(raw.get("beat", 0)),
        float(raw.get("started", 0.0)),
    )


class DuplicateNode(Exception):
    """Two processes use one node name in a pool: ownership would be meaningless."""


class Members:
    """This node's heartbeat in one pool, and its view of the pool's other nodes."""

    def __init__(
        self,
        conn: CephConnection,
        me: str,
        identity: Callable[[], dict[str, str]],
        *,
        heartbeat: float = HEARTBEAT,
        dead_after: float = DEAD_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.doc = OmapDocument(conn, OID)
        self.conn = conn
        self.me = me
        self.identity = identity  # {"nbd": ..., "api": ...} as bound now
        self.heartbeat = heartbeat
        self.liveness = Liveness(dead_after)
        self.clock = clock
        self.nodes: dict[str, NodeInfo] = {}
        self._beat = 0
        self._started = time.time()
        #: Tells this process's heartbeats from another process's under the same name.
        self.incarnation = uuid.uuid4().hex
        self._task: asyncio.Task[None] | None = None
        #: Called when a heartbeat fails because this client was fenced.
        self.on_fenced: Callable[[], None] | None = None
        #: Called (with why) when another process heartbeats under this node's name.
        self.on_duplicate: Callable[[str], None] | None = None
        self.last_error: str | None = None
        #: When (clock) our last heartbeat was written: our own age grows while they fail.
        self._beaten: float | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def join(self) -> None:
        """Check no live process already heartbeats under our name (its counter moves), then
        send our first heartbeat. After a crash our old key stays: it does not move."""
        key = f"node/{self.me}"
        before = await self.doc.get(key)
        if isinstance(before, dict):
            await asyncio.sleep(self.heartbeat * 1.5)
            after = await self.doc.get(key)
            if isinstance(after, dict) and after.get("beat") != before.get("beat"):
                raise DuplicateNode(
                    f"node {self.me!r} is alive in this pool already (its NBD address: "
                    f"{after.get('nbd') or '?'}): give each node its own --node-name"
                )
        await self.beat()

    async def beat(self) -> None:
        """Bump our counter, then read everyone's. Raises DuplicateNode if another live
        process writes heartbeats under our name (two nodes must not share one)."""
        key = f"node/{self.me}"
        if self._beat:
            last = await self.doc.get(key)
            if isinstance(last, dict) and last.get("incarnation") not in (None, self.incarnation):
                raise DuplicateNode(
                    f"another process heartbeats as node {self.me!r} in this pool "
                    f"(its NBD address: {last.get('nbd') or '?'}): give each node its own --node-name"
                )
        self._beat += 1
        try:
            client = self.conn.client_address()
        except CephError:
            client = ""
        record = {
            **self.identity(),
            "client": client,
            "beat": self._beat,
            "started": self._started,
            "incarnation": self.incarnation,
        }
        await self.doc.update(set={key: record})
        self._beaten = self.clock()
        await self.refresh()

    async def refresh(self) -> None:
        items = await self.doc.items("node/")
        now = self.clock()
        self.liveness.looked_at(now)
        nodes = {k[5:]: _info(k[5:], v) for k, v in items.items()}
        for name, info in nodes.items():
            self.liveness.observe(name, info.beat, now)
        for gone in set(self.nodes) - set(nodes):
            self.liveness.forget(gone)
        self.nodes = nodes

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
                self.last_error = None
            except StorageError as e:
                self.last_error = str(e)
                if getattr(e, "fenced", False) or self.conn.fenced:
                    log.warning("heartbeat: this node's Ceph client was fenced (%s)", e)
                    if self.on_fenced is not None:
                        self.on_fenced()
                else:
                    log.warning("heartbeat failed: %s", e)
            except CephError as e:
                self.last_error = str(e)
                log.warning("heartbeat failed: %s", e)
            except DuplicateNode as e:
                self.last_error = str(e)
                log.error("%s", e)
                if self.on_duplicate is not None:
                    self.on_duplicate(str(e))
                return  # stop heartbeating: the pool is unusable for this node
            await asyncio.sleep(self.heartbeat)

    async def leave(self) -> None:
        """Remove our key (a clean stop): peers need not wait to presume us dead."""
        try:
            await self.doc.update(remove=[f"node/{self.me}"])
        except (StorageError, CephError) as e:
            log.debug("leaving the member list: %s", e)

    # ------------------------------------------------------------ views
    def alive(self, name: str) -> bool:
        if name == self.me:
            return True
        return self.liveness.alive(name, self.clock())

    def age(self, name: str) -> float | None:
        if name == self.me:  # since our last heartbeat was written (peers see that one)
            return 0.0 if self._beaten is None else self.clock() - self._beaten
        return self.liveness.age(name, self.clock())

    def holder(self, client: str) -> tuple[str, bool] | None:
        """The node whose current Ceph client has address `client`, and whether it is
        presumed alive (this node's own client counts as alive); None if no node has it."""
        for name, info in self.nodes.items():
            if info.client == client:
                return name, self.alive(name)
        return None

    def live_peers(self) -> list[str]:
        return sorted(n for n in self.nodes if n != self.me and self.alive(n))
