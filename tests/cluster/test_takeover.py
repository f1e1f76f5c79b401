"""Taking over a dead node's volume: two nodes racing for it (exactly one wins, the other
refuses, the data is the winner's), and a Ceph monitor restart under I/O (nobody is presumed
dead, nothing moves, I/O carries on)."""

from __future__ import annotations

import asyncio
import time

import pytest

from blockvirt.client import NbdClient, NbdClientError
from tests.cephcluster import CephCluster
from tests.cluster.conftest import Cluster, MiB
from tests.cluster.oracle import BLOCK, Oracle, Writer, content, decode, read_region
from tests.promql import value

pytestmark = [pytest.mark.ceph, pytest.mark.slow]

BLOCKS = 64


async def wait_for(what: str, ready: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def claim_and_write(uri: str, version: int) -> str:
    """Open the volume on one node (no fallbacks) and write every block: 'won' if all of it
    was acknowledged, else why not."""
    try:
        async with await NbdClient.connect(uri) as c:
            for blk in range(BLOCKS):
                await asyncio.wait_for(c.write(blk * BLOCK, content(blk, version), fua=True), 10)
        return "won"
    except (NbdClientError, OSError, TimeoutError) as e:
        return f"refused: {e}"


async def test_two_nodes_racing_to_take_over_a_dead_nodes_volumes(cluster3: Cluster) -> None:
    a, b, c = cluster3.nodes
    volumes = ["r1", "r2"]
    for name in volumes:
        a.create_volume(name, 4 * MiB)
    await asyncio.to_thread(cluster3.wait_catalog, volumes[-1])
    for name in volumes:
        async with await NbdClient.connect(a.uri(name)) as d:
            for blk in range(BLOCKS):
                await d.write(blk * BLOCK, content(blk, 1))
            await d.flush()
        await asyncio.to_thread(cluster3.wait_owner, name, "node-a", via=b)
        await asyncio.to_thread(cluster3.wait_owner, name, "node-a", via=c)

    killed = await asyncio.to_thread(a.kill)
    for node in (b, c):
        await asyncio.to_thread(cluster3.wait_presumed_dead, a, by=node)
    # Everyone lists A dead now, its heartbeat age growing past DEAD_AFTER, in `node list`
    # and in /metrics.
    dead_after = time.monotonic() - killed
    assert 4.0 <= dead_after < 8.0, dead_after
    row = b.nodes()["node-a"]
    assert row["alive"] is False and row["heartbeat_age"] >= 4.0 and row["volumes"] == volumes, row
    text = b.metrics()
    assert value(text, "blockvirt_cluster_peer_alive", pool="cp", node="node-a") == 0
    assert value(text, "blockvirt_cluster_peer_alive", pool="cp", node="node-c") == 1
    assert (value(text, "blockvirt_cluster_peer_heartbeat_age_seconds", pool="cp", node="node-a") or 0) >= 4.0
    table = b.server.cli("node", "list").stdout.splitlines()
    assert any(ln.split()[1:2] == ["node-a"] and "dead" in ln.split() for ln in table), table
    # B and C go for both volumes at the same moment (in opposite orders), each writing its
    # own version of every block.
    results = await asyncio.gather(
        claim_and_write(b.uri("r1"), 2), claim_and_write(c.uri("r1"), 3),
        claim_and_write(c.uri("r2"), 3), claim_and_write(b.uri("r2"), 2),
    )  # fmt: skip
    outcome = {("r1", "node-b"): results[0], ("r1", "node-c"): results[1],
               ("r2", "node-c"): results[2], ("r2", "node-b"): results[3]}  # fmt: skip
    print("race:", outcome)
    for name in volumes:
        won = [n for (v, n), r in outcome.items() if v == name and r == "won"]
        assert len(won) == 1, f"{name}: {outcome}"
        winner = won[0]
        loser = "node-c" if winner == "node-b" else "node-b"
        why = outcome[(name, loser)]
        # The loser either refused at the handshake, naming the winner, or had accepted (both
        # thought the volume free) and failed its first write when the claim was lost.
        assert why.startswith("refused"), why
        for node in (b, c):
            await asyncio.to_thread(cluster3.wait_owner, name, winner, via=node)
        # Every block holds the winner's version: not one of the loser's writes landed.
        version = 2 if winner == "node-b" else 3
        data = await read_region(cluster3.uris(name, first=cluster3.node(loser)), BLOCKS)
        got = {decode(data[i * BLOCK : (i + 1) * BLOCK]) for i in range(BLOCKS)}
        assert got == {(i, version) for i in range(BLOCKS)}
        # The loser, asked again, sends the client to the winner.
        with pytest.raises(
            NbdClientError, match=f"is served by node {winner} at {cluster3.node(winner).nbd}"
        ):
            await NbdClient.connect(cluster3.node(loser).uri(name))
    # A's Ceph client was fenced once per volume taken, by whoever won it; nobody fenced twice.
    fenced = {n.name: value(n.metrics(), "blockvirt_cluster_peers_fenced_total", pool="cp") for n in (b, c)}
    assert sum(v or 0 for v in fenced.values()) == len(volumes), fenced
    for n in (b, c):
        assert value(n.metrics(), "blockvirt_cluster_fenced_total", pool="cp") == 0


async def test_a_monitor_restart_under_io_moves_nothing(cluster2: Cluster, ceph_cluster: CephCluster) -> None:
    a, b = cluster2.nodes
    a.create_volume("ma", 4 * MiB)
    b.create_volume("mb", 4 * MiB)
    await asyncio.to_thread(cluster2.wait_catalog, "mb")
    writers = {
        "ma": Writer(cluster2.uris("ma", first=a), Oracle(blocks=1024), seed=2),
        "mb": Writer(cluster2.uris("mb", first=b), Oracle(blocks=1024), seed=3),
    }
    tasks = [asyncio.ensure_future(w.run()) for w in writers.values()]
    try:
        await wait_for("writes flowing", lambda: all(len(w.acks) > 100 for w in writers.values()), 30)
        await asyncio.to_thread(cluster2.wait_owner, "ma", "node-a", via=b)
        await asyncio.to_thread(cluster2.wait_owner, "mb", "node-b", via=a)
        before = {n.name: n.metrics() for n in cluster2.nodes}
        t0 = time.monotonic()
        await asyncio.to_thread(ceph_cluster.restart_mon)
        restarted = time.monotonic()
        # Through the restart and a few heartbeat periods after it, nobody gives up anything.
        counts = {k: len(w.acks) for k, w in writers.items()}
        await wait_for(
            "writes after the restart",
            lambda: all(len(w.acks) > counts[k] + 100 for k, w in writers.items()),
            30,
        )
        await asyncio.sleep(max(0.0, restarted + 6.0 - time.monotonic()))
        for w in writers.values():
            w.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
    finally:
        for w in writers.values():
            w.stop.set()
        for t in tasks:
            if not t.done():
                t.cancel()
    for name, w in writers.items():
        assert len(w.reconnects) == 1, f"{name}: the initiator had to reconnect: {w.errors}"
        assert w.errors == []
        gap = w.longest_gap(t0, restarted)
        print(f"{name}: mon restart took {restarted - t0:.2f} s; longest pause in I/O {gap:.3f} s")
        image = await read_region(cluster2.uris(name), w.oracle.blocks)
        assert w.oracle.check(image, name) == []
    for node in cluster2.nodes:
        view = node.nodes()
        assert view["node-a"]["volumes"] == ["ma"] and view["node-b"]["volumes"] == ["mb"]
        assert view["node-a"]["alive"] and view["node-b"]["alive"]
        text = node.metrics()
        for change in ("taken", "released", "lost"):
            key = {"pool": "cp", "change": change}
            assert value(text, "blockvirt_cluster_ownership_changes_total", **key) == value(
                before[node.name], "blockvirt_cluster_ownership_changes_total", **key
            ), (node.name, change)
        assert value(text, "blockvirt_cluster_fenced_total", pool="cp") == 0
        assert value(text, "blockvirt_cluster_peers_fenced_total", pool="cp") == 0
