"""Planned moves: `volume move` hands a volume to another node without copying data (drain,
flush, release the lock, hand the record over, cut the sessions), under writes, with the pause
the initiator sees measured; `node drain` moves all of a node's volumes. No fencing is ever
involved: the owner releases its lock itself."""

from __future__ import annotations

import asyncio
import time

import pytest

from blockvirt.client import NbdClient, NbdClientError
from tests.cluster.conftest import Cluster, MiB
from tests.cluster.oracle import BLOCK, Oracle, Writer, content, decode, read_region
from tests.promql import value

pytestmark = [pytest.mark.ceph, pytest.mark.slow]

#: A move's pause (the longest gap between acknowledgements around it) is a handoff and a
#: reconnection: tens to hundreds of milliseconds here. Bounded loosely for a shared CI box.
PAUSE_BOUND = 3.0


async def wait_for(what: str, ready: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def cut(client: NbdClient) -> None:
    """Read until the server cuts the connection (a few seconds at most)."""
    for _ in range(100):
        await asyncio.wait_for(client.read(0, BLOCK), 2)
        await asyncio.sleep(0.05)


def counters(text: str, change: str) -> float:
    return value(text, "blockvirt_cluster_ownership_changes_total", pool="cp", change=change) or 0.0


async def test_volume_move_under_writes(cluster2: Cluster) -> None:
    a, b = cluster2.nodes
    a.create_volume("mv", 8 * MiB)
    await asyncio.to_thread(cluster2.wait_catalog, "mv")
    oracle = Oracle(blocks=2048)
    writer = Writer(cluster2.uris("mv", first=a), oracle, depth=4)
    task = asyncio.ensure_future(writer.run())
    pauses = []
    try:
        await wait_for("writes flowing", lambda: len(writer.acks) >= 200, 30)
        await asyncio.to_thread(cluster2.wait_owner, "mv", "node-a", via=a)
        # A to B through the CLI on A, then back to A through B's API: each time the
        # initiator reconnects to the new owner by itself (its fallbacks).
        for target, via in ((b, a), (a, b)):
            before = len(writer.reconnects)
            asked = time.monotonic()
            if via is a:
                out = await asyncio.to_thread(via.cli, "volume", "move", "mv", "--node", target.name)
                assert out["node"] == target.name and out["done"] is True, out
            else:
                await asyncio.to_thread(via.api.post, "/api/v1/volumes/mv/move", {"node": target.name})
            await wait_for("the writer to reconnect", lambda n=before: len(writer.reconnects) > n, 10)
            assert writer.reconnects[-1][1] == target.nbd, (writer.reconnects, writer.errors)
            resumed = len(writer.acks)
            await wait_for("writes on the new owner", lambda n=resumed: len(writer.acks) >= n + 100, 10)
            pauses.append(writer.longest_gap(asked, writer.acks[resumed]))
        writer.stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        writer.stop.set()
        if not task.done():
            task.cancel()
    print("move pauses (s):", ", ".join(f"{p:.3f}" for p in pauses))
    assert max(pauses) < PAUSE_BOUND, pauses
    assert cluster2.owner("mv", via=a) == "node-a" and cluster2.owner("mv", via=b) == "node-a"
    image = await read_region(cluster2.uris("mv", first=b), oracle.blocks)
    assert oracle.check(image, "after two moves") == []
    # Handed over twice, never fenced.
    ma, mb = a.metrics(), b.metrics()
    assert counters(ma, "released") == 1 and counters(mb, "released") == 1
    assert counters(mb, "taken") == 1 and counters(ma, "taken") == 2  # created there, then back
    for text in (ma, mb):
        assert counters(text, "lost") == 0
        assert value(text, "blockvirt_cluster_fenced_total", pool="cp") == 0
        assert value(text, "blockvirt_cluster_peers_fenced_total", pool="cp") == 0
    assert value(ma, "blockvirt_cluster_owned_volumes", pool="cp") == 1
    assert value(mb, "blockvirt_cluster_owned_volumes", pool="cp") == 0


async def test_node_drain_moves_every_volume_it_serves(cluster3: Cluster) -> None:
    a, b, c = cluster3.nodes
    names = [f"d{i}" for i in range(4)]
    for name in names:
        a.create_volume(name, 4 * MiB)
    await asyncio.to_thread(cluster3.wait_catalog, names[-1])
    # A serves all four (each written once through it); one client stays connected.
    for i, name in enumerate(names):
        async with await NbdClient.connect(a.uri(name)) as d:
            await d.write(0, content(0, 100 + i), fua=True)
    held = await NbdClient.connect(a.uri("d0"))
    for name in names:
        await asyncio.to_thread(cluster3.wait_owner, name, "node-a", via=c)
    # One volume already served elsewhere stays where it is.
    b.create_volume("stay", 4 * MiB)
    async with await NbdClient.connect(b.uri("stay"), fallbacks=tuple(cluster3.uris("stay"))) as d:
        await d.write(0, content(0, 7), fua=True)

    out = await asyncio.to_thread(c.cli, "node", "drain", "node-a")
    moved = {m["volume"]: m["to"] for m in out["moves"]}
    assert sorted(moved) == names and set(moved.values()) == {"node-b", "node-c"}, out
    for name, to in moved.items():
        await asyncio.to_thread(cluster3.wait_owner, name, to, via=a, timeout=15)
    assert cluster3.owner("stay", via=a) == "node-b"
    view = a.nodes()
    assert view["node-a"]["volumes"] == []
    assert sorted(view["node-b"]["volumes"] + view["node-c"]["volumes"]) == sorted([*names, "stay"])
    # The connected client was cut; reconnecting with fallbacks finds each volume's new node.
    with pytest.raises((NbdClientError, ConnectionError)):
        await cut(held)
    await held.close()
    for i, name in enumerate(names):
        async with await NbdClient.connect(a.uri(name), fallbacks=tuple(cluster3.uris(name))) as d:
            peer = d._link.writer.get_extra_info("peername")
            assert f"{peer[0]}:{peer[1]}" == cluster3.node(moved[name]).nbd
            assert decode(await d.read(0, BLOCK)) == (0, 100 + i)
    assert value(a.metrics(), "blockvirt_cluster_ownership_changes_total", pool="cp", change="released") == 4
