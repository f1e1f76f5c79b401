"""What every node shows: a volume created, resized, snapshotted, cloned or given QoS and
access rules through any node is seen identically through the others (`volume list`, `info`,
`snapshot list`, `acl show`, `qos show`); a node joins an existing cluster with `pool create
--rbd`; `node list [--json]` tells addresses, liveness, heartbeat age and who serves what, and
the same figures are in each node's /metrics; a node asked for a volume a live peer serves
refuses, naming that peer and its address (blockvirt's client, nbdinfo, qemu-io see it)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from blockvirt.client import NbdClient, NbdClientError
from tests.cluster.clients import nbdinfo, need
from tests.cluster.conftest import Cluster, MiB, Node
from tests.cluster.oracle import BLOCK, content, decode
from tests.promql import dashboard, dashboard_exprs, metric_names, sample_names, value

pytestmark = [pytest.mark.ceph, pytest.mark.slow]

#: Per-node facts that rightly differ between nodes (this node's clients, its cached figures).
LOCAL = ("connections", "allocated", "head_allocated")


#: A volume's QoS settings (what `qos show` lists; the rest is this node's live figures).
QOS = ("group", "shares", "reservation", "limit", "bps_limit", "effective_shares", "effective_limit")


def views(node: Node) -> dict[str, Any]:
    """Everything `blockvirt volume list / info / snapshot list / volume acl show / qos show`
    shows about the pool's volumes through one node (the API they print)."""
    api = node.api
    volumes = api.get("/api/v1/volumes")["volumes"]
    out: dict[str, Any] = {"list": [{k: v for k, v in x.items() if k not in LOCAL} for x in volumes]}
    for vol in ("v1", "v2"):
        info = api.get(f"/api/v1/volumes/{vol}")
        out[f"info {vol}"] = {k: v for k, v in info.items() if k not in LOCAL}
        out[f"snapshots {vol}"] = api.get(f"/api/v1/volumes/{vol}/snapshots")
        out[f"acl {vol}"] = api.get(f"/api/v1/volumes/{vol}/acl")
    qos = api.get("/api/v1/qos")
    out["qos"] = {v["volume"]: {k: v.get(k) for k in QOS} for v in qos["volumes"]}
    return out


def same_everywhere(cluster: Cluster, timeout: float = 10.0) -> dict[str, Any]:
    """Wait until every node shows the same; return that."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {n.name: views(n) for n in cluster.nodes}
        first = next(iter(seen.values()))
        if all(v == first for v in seen.values()):
            return first
        if time.monotonic() > deadline:
            diff = {name: v for name, v in seen.items() if v != first}
            raise AssertionError(f"the nodes disagree:\n{first}\n{diff}")
        time.sleep(0.2)


async def test_a_volume_looks_the_same_through_every_node(cluster2: Cluster, tmp_path: Path) -> None:
    a, b = cluster2.nodes
    # A third node joins the existing cluster as a user would: `pool create --rbd` on it.
    c = Node("node-c", "127.0.0.4", tmp_path / "node-c", cluster2.pool, cluster2.ceph)
    cluster2.nodes.append(c)
    await asyncio.to_thread(c.start)
    r = c.server.cli(
        "pool", "create", "cp", "--rbd", cluster2.pool, "--ceph-conf", str(cluster2.ceph.conf_path)
    )
    assert r.returncode == 0, r.stderr

    # Edits through different nodes.
    a.cli("volume", "create", "v1", "--size", "16M", "--pool", "cp")
    async with await NbdClient.connect(a.uri("v1")) as d:  # A serves v1 from now on
        await d.write(0, content(0, 1), fua=True)
    a.cli("snapshot", "create", "v1", "s1")
    async with await NbdClient.connect(a.uri("v1")) as d:
        await d.write(0, content(0, 2), fua=True)
    b.cli("snapshot", "create", "v1", "s2")  # B forwards it to A, which holds the image's lock
    c.cli("volume", "resize", "v1", "32M")  # so does C
    b.cli("qos", "set", "v1", "--limit", "500", "--shares", "300")
    c.cli("volume", "acl", "add", "v1", "--address", "127.0.0.0/8")
    b.cli("volume", "clone", "v1@s1", "v2")
    c.cli("volume", "acl", "add", "v2", "--address", "127.0.0.2/32", "--read-only")
    shown = await asyncio.to_thread(same_everywhere, cluster2)

    info = shown["info v1"]
    assert (info["size"], info["pool"], info["snapshots"], info["state"]) == (32 * MiB, "cp", 2, "ok")
    tree = [(s["name"], s["parent"]) for s in shown["snapshots v1"]["snapshots"]]
    assert tree == [("s1", None), ("s2", "s1")]
    assert shown["info v2"]["size"] == 16 * MiB
    assert [(x["kind"], x["value"], x["read_only"]) for x in shown["acl v1"]["rules"]] == [
        ("address", "127.0.0.0/8", False)
    ]
    assert shown["acl v2"]["rules"][0]["read_only"] is True
    assert shown["qos"]["v1"]["limit"] == 500 and shown["qos"]["v1"]["shares"] == 300
    assert cluster2.owner("v1", via=c) == "node-a"
    # The data agrees too: s1 and s2 read the versions written before each, through any node.
    for node in cluster2.nodes:
        for snap, version in (("s1", 1), ("s2", 2)):
            async with await NbdClient.connect(node.uri(f"v1@{snap}")) as d:
                assert decode(await d.read(0, BLOCK)) == (0, version), (node.name, snap)


async def test_node_list_and_cluster_metrics(cluster3: Cluster) -> None:
    a, b, _ = cluster3.nodes
    a.create_volume("la", 4 * MiB)
    b.create_volume("lb1", 4 * MiB)
    b.create_volume("lb2", 4 * MiB)
    await asyncio.to_thread(cluster3.wait_catalog, "lb2")
    for node, name in ((a, "la"), (b, "lb1"), (b, "lb2")):
        async with await NbdClient.connect(node.uri(name)) as d:
            await d.write(0, content(0, 1))
    served = {"node-a": ["la"], "node-b": ["lb1", "lb2"], "node-c": []}

    def listed(by: Node) -> bool:
        nodes = by.nodes()
        return {k: v["volumes"] for k, v in nodes.items()} == served

    for node in cluster3.nodes:
        what = f"{node.name} to list who serves what"
        await asyncio.to_thread(cluster3.wait, what, lambda n=node: listed(n), 10)
    out = a.cli("node", "list")
    assert out["node"] == "node-a" and out["nbd"] == a.nbd
    [pool] = out["pools"]
    assert pool["pool"] == "cp"
    rows = {n["name"]: n for n in pool["nodes"]}
    assert set(rows) == {"node-a", "node-b", "node-c"}
    for node in cluster3.nodes:
        row = rows[node.name]
        assert row["nbd"] == node.nbd and row["api"] == node.server.api_url
        assert row["alive"] is True and row["me"] is (node is a)
        assert 0 <= row["heartbeat_age"] < 2.5  # a beat a second
        assert row["volumes"] == served[node.name]
    text = a.metrics()
    assert value(text, "blockvirt_cluster_owned_volumes", pool="cp") == 1
    assert value(b.metrics(), "blockvirt_cluster_owned_volumes", pool="cp") == 2
    for peer in ("node-b", "node-c"):
        assert value(text, "blockvirt_cluster_peer_alive", pool="cp", node=peer) == 1
        age = value(text, "blockvirt_cluster_peer_heartbeat_age_seconds", pool="cp", node=peer)
        assert age is not None and 0 <= age < 2.5
    assert value(text, "blockvirt_cluster_peer_alive", pool="cp", node="node-a") is None  # itself
    # The dashboard's cluster panels read only what a cluster node exports.
    live = sample_names(text)
    shown = set()
    for expr in dashboard_exprs(dashboard()):
        names = {n for n in metric_names(expr) if n.startswith("blockvirt_cluster_")}
        assert names <= live, f"dashboard expression {expr!r} reads {names - live}"
        shown |= names
    assert shown == {n for n in live if n.startswith("blockvirt_cluster_")}, shown

    # The human table says the same.
    r = a.server.cli("node", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["POOL", "NODE", "NBD", "STATE", "HEARTBEAT", "VOLUMES"]
    assert any(ln.split()[:3] == ["cp", "node-b", b.nbd] and ln.split()[-1] == "lb1,lb2" for ln in lines), (
        lines
    )


async def test_a_volume_served_by_a_live_peer_is_refused_naming_it(cluster2: Cluster) -> None:
    need("nbdinfo", "qemu-io")
    a, b = cluster2.nodes
    a.create_volume("rv", 4 * MiB)
    await asyncio.to_thread(cluster2.wait_catalog, "rv")
    held = await NbdClient.connect(a.uri("rv"))
    try:
        await held.write(0, content(0, 5), fua=True)
        await held.write(0, content(0, 5), fua=True)
        await asyncio.to_thread(cluster2.wait_owner, "rv", "node-a", via=b)
        await held.write(0, content(0, 5), fua=True)
        named = f"volume 'rv' is served by node node-a at {a.nbd}"
        # blockvirt's client: the handshake is refused with the message.
        with pytest.raises(NbdClientError, match=named):
            await NbdClient.connect(b.uri("rv"))
        # nbdinfo shows the server's message.
        r = await asyncio.to_thread(nbdinfo, b.uri("rv"), debug=True)
        assert r.returncode != 0 and named in r.stderr, r.stderr
        # So does qemu-io.
        q = await asyncio.to_thread(
            subprocess.run, ["qemu-io", "-f", "raw", "-c", "read 0 4k", b.uri("rv")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert q.returncode != 0 and named in q.stdout + q.stderr, q.stdout + q.stderr
        # With fallbacks, the client follows the refusal to A.
        async with await NbdClient.connect(b.uri("rv"), fallbacks=(a.uri("rv"),)) as d:
            assert decode(await d.read(0, BLOCK)) == (0, 5)
        # A snapshot is immutable: any node may serve it beside the owner.
        a.api.post("/api/v1/volumes/rv/snapshots", {"name": "s"})

        def b_knows() -> bool:
            return [x["name"] for x in b.api.get("/api/v1/volumes/rv/snapshots")["snapshots"]] == ["s"]

        took = await asyncio.to_thread(cluster2.wait, "B to know the snapshot", b_knows, 5)
        assert took < 0.5  # told at once (watch/notify), not at its next look
        async with await NbdClient.connect(b.uri("rv@s")) as d:
            assert decode(await d.read(0, BLOCK)) == (0, 5)
        # Nothing moved: A still serves it, its client still writes.
        await held.write(BLOCK, content(1, 6), fua=True)
        assert cluster2.owner("rv", via=b) == "node-a" and cluster2.owner("rv", via=a) == "node-a"
    finally:
        await held.close()
