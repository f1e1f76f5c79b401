"""What a node knows about an RBD pool's volumes lives in Ceph: a restarted server, and a second
server process (its own data directory) that attaches the same Ceph pool, find the volumes,
their snapshot trees, clones, QoS settings and access rules, and serve the same bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blockvirt.client import NbdClient, NbdClientError
from blockvirt.testing import BlockvirtServer
from tests.ceph.conftest import unique
from tests.ceph.rbdpool import BV_POOL, SERVE_ARGS, MiB, attach, cli_json, wait_for
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph


def state(server: BlockvirtServer) -> dict[str, Any]:
    """Everything another node must agree on, as the API shows it."""
    out: dict[str, Any] = {}
    for v in server.api.get("/api/v1/volumes")["volumes"]:
        name = v["name"]
        snaps = server.api.get(f"/api/v1/volumes/{name}/snapshots")["snapshots"]
        acl = server.api.get(f"/api/v1/volumes/{name}/acl")
        qos = server.api.get(f"/api/v1/volumes/{name}/qos")
        out[name] = {
            "volume": {k: v[k] for k in ("size", "thick", "pool", "created")},
            "snapshots": [{k: s[k] for k in ("name", "parent", "current", "size", "created")} for s in snaps],
            "acl": acl["rules"],
            "qos": {k: qos[k] for k in ("shares", "reservation", "limit", "bps_limit")},
        }
    return out


async def contents(server: BlockvirtServer, export: str) -> bytes:
    async with await NbdClient.connect(server.uri(export)) as c:
        return await c.read(0, c.size)


async def test_another_node_and_a_restart_see_the_same_pool(
    tmp_path: Path, ceph_cluster: CephCluster, module_ceph_pool: str
) -> None:
    first = BlockvirtServer(tmp_path / "a", extra_args=SERVE_ARGS).start()
    try:
        attach(first, ceph_cluster, module_ceph_pool)
        first.create_volume("disk", 4 * MiB, pool=BV_POOL)
        first.create_volume("thick", MiB, pool=BV_POOL, thick=True)
        first.create_volume("local", MiB)  # a file volume: the first node's alone
        async with await NbdClient.connect(first.uri("disk")) as c:
            await c.write(0, b"1" * 65536)
            await c.flush()
            first.api.post("/api/v1/volumes/disk/snapshots", {"name": "s1"})
            await c.write(0, b"2" * 65536)
            await c.flush()
            first.api.post("/api/v1/volumes/disk/snapshots", {"name": "s2"})
        first.api.post("/api/v1/volumes/disk/snapshots/s1/revert", {})
        first.api.post("/api/v1/volumes/disk/snapshots", {"name": "s3"})
        cli_json(first, "volume", "clone", "disk@s2", "copy")
        cli_json(first, "qos", "set", "disk", "--limit", "700", "--reservation", "50", "--shares", "200")
        cli_json(first, "volume", "acl", "add", "disk", "--address", "127.0.0.1", "--read-only")
        cli_json(first, "volume", "acl", "add", "disk", "--cn", "backup.example")
        cli_json(first, "volume", "acl", "add", "copy", "--address", "10.1.0.0/16")
        before = state(first)
        assert set(before) == {"disk", "thick", "copy", "local"}
        data = {e: await contents(first, e) for e in ("disk", "disk@s1", "disk@s2", "disk@s3", "thick")}

        # A second server process with its own data directory attaches the same Ceph pool.
        with BlockvirtServer(tmp_path / "b", extra_args=SERVE_ARGS) as second:
            attach(second, ceph_cluster, module_ceph_pool)
            seen = state(second)
            assert set(seen) == {"disk", "thick", "copy"}  # not the first node's file volume
            assert seen == {k: v for k, v in before.items() if k != "local"}
            assert seen["disk"]["qos"] == {"shares": 200, "reservation": 50, "limit": 700, "bps_limit": 0}
            assert [s["name"] for s in seen["disk"]["snapshots"]] == ["s1", "s2", "s3"]
            # Snapshots are immutable: any node reads them beside the owner.
            for export, want in data.items():
                if "@" in export:
                    assert await contents(second, export) == want, export
            # A head is served by the node that owns it: the other one names the owner.
            with pytest.raises(NbdClientError, match=f"served by node {first.node_name} at "):
                await contents(second, "disk")
            # Handed over (no data copied), the second node serves the same bytes.
            for name in ("disk", "thick", "copy"):
                cli_json(second, "volume", "move", name, "--node", second.node_name)
            for export in ("disk", "thick"):
                assert await contents(second, export) == data[export], export
            # The access rules apply there too: read-only for 127.0.0.1, "copy" refused.
            async with await NbdClient.connect(second.uri("disk")) as c:
                assert c.export.read_only
            with pytest.raises(NbdClientError, match=r"no export named 'copy' for this client"):
                await NbdClient.connect(second.uri("copy"))
            # A volume no node has opened yet moves at once; a file volume stays on its node.
            cli_json(first, "volume", "move", "local", "--node", first.node_name)
            r = first.cli("volume", "move", "local", "--node", second.node_name)
            assert r.returncode != 0 and "in a file pool: only this node can serve it" in r.stderr, r.stderr
            # Back to the first node before the second one stops.
            for name in ("disk", "thick", "copy"):
                cli_json(second, "volume", "move", name, "--node", first.node_name)
    finally:
        first.stop()

    # The first node restarts: its RBD pool is attached again from its own catalog, and the
    # settings come back from Ceph.
    with BlockvirtServer(tmp_path / "a", extra_args=SERVE_ARGS) as again:
        assert state(again) == before
        qos = again.api.get("/api/v1/qos")
        [mine] = [v for v in qos["volumes"] if v["volume"] == "disk"]
        assert (mine["limit"], mine["reservation"], mine["active"]) == (700, 50, True)
        assert await contents(again, "disk@s2") == data["disk@s2"]
        for name in ("copy", "disk", "thick", "local"):
            again.api.delete(f"/api/v1/volumes/{name}")


async def test_a_name_taken_in_a_file_pool_and_in_the_shared_pool(
    tmp_path: Path, ceph_cluster: CephCluster, module_ceph_pool: str
) -> None:
    """A node's file volume and a volume another node made in the shared pool, one name: the
    first node keeps serving its own, older volume and reports the clash until it is gone."""
    name = unique("twin")

    def pools_of(server: BlockvirtServer) -> list[str]:
        return [v["pool"] for v in server.api.get("/api/v1/volumes")["volumes"] if v["name"] == name]

    first = BlockvirtServer(tmp_path / "a", extra_args=SERVE_ARGS).start()
    try:
        attach(first, ceph_cluster, module_ceph_pool)
        first.create_volume(name, MiB)  # in the first node's own file pool
        async with await NbdClient.connect(first.uri(name)) as c:
            await c.write(0, b"f" * 4096)
            await c.flush()
        with BlockvirtServer(tmp_path / "b", extra_args=SERVE_ARGS) as second:
            attach(second, ceph_cluster, module_ceph_pool)
            second.create_volume(name, MiB, pool=BV_POOL)  # the second node cannot know of it
            clash = f"volume {name} is hidden by the volume of the same name in pool default"
            warned = lambda: clash in cli_json(first, "pool", "info", BV_POOL)["warnings"]  # noqa: E731
            wait_for("the first node to see the clash", warned)
            assert pools_of(first) == ["default"] and pools_of(second) == [BV_POOL]
            async with await NbdClient.connect(first.uri(name)) as c:
                assert await c.read(0, 4096) == b"f" * 4096
            assert f"volume {name} of pool {BV_POOL} is hidden" in first.log()
            # The offline check of the first node's data directory notes it too.
            first.stop()
            r = subprocess.run(
                [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(tmp_path / "a"), "--json"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            notes = json.loads(r.stdout)["notes"]
            both = ", ".join(sorted(["default", BV_POOL]))
            want = f"volume {name} is in pools {both}: the oldest is served, the others are hidden until"
            assert f"{want} it is deleted or moved" in notes, notes
            first.start()
            assert pools_of(first) == ["default"]
            # Once one of them is gone the other one is the volume, and nothing is reported.
            first.api.delete(f"/api/v1/volumes/{name}")
            assert pools_of(first) == [BV_POOL]
            assert not warned()
            second.api.delete(f"/api/v1/volumes/{name}")
    finally:
        first.stop()
