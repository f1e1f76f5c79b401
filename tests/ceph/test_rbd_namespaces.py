"""RBD pools in RBD namespaces: several blockvirt pools on one Ceph pool, each in its own
namespace (a tenant's share of a cluster), with their images, snapshots, clones and catalog
kept apart, as Ceph's own tools show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blockvirt.cli.client import ApiError
from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer
from tests.ceph.conftest import unique
from tests.ceph.rbdpool import SERVE_ARGS, MiB, cli_error, cli_json
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph


async def test_pools_in_namespaces_of_one_ceph_pool(
    tmp_path: Path, ceph_cluster: CephCluster, module_ceph_pool: str
) -> None:
    pool, conf = module_ceph_pool, str(ceph_cluster.conf_path)
    first, second = unique("ns"), unique("ns")
    for ns in (first, second):
        ceph_cluster.rbd("namespace", "create", f"{pool}/{ns}")
    vols = {"na": unique("v"), "nb": unique("v")}
    data = {"na": b"a" * 65536, "nb": b"b" * 65536}

    def create(name: str, where: str) -> list[str]:
        return ["pool", "create", name, "--rbd", where, "--ceph-conf", conf]

    with BlockvirtServer(tmp_path / "data", extra_args=SERVE_ARGS) as server:
        assert server.cli(*create("na", f"{pool}/{first}")).returncode == 0
        assert server.cli(*create("nb", f"{pool}/{second}")).returncode == 0
        assert cli_json(server, "pool", "info", "na")["rbd"]["namespace"] == first
        assert f"Ceph pool {pool}, namespace {first}" in server.cli("pool", "info", "na").stdout
        # A namespace that does not exist, one attached already, a name Ceph cannot have.
        assert f"RBD namespace 'missing' does not exist in pool '{pool}'" in cli_error(
            server, *create("nc", f"{pool}/missing")
        )
        assert f"namespace '{first}', is attached already as 'na'" in cli_error(
            server, *create("nc", f"{pool}/{first}")
        )
        with pytest.raises(ApiError) as e:
            server.api.post(
                "/api/v1/pools", {"name": "nc", "rbd": {"pool": pool, "namespace": "a/b", "conf": conf}}
            )
        assert e.value.status == 400 and "bad RBD namespace" in e.value.message

        for p, vol in vols.items():
            server.create_volume(vol, 4 * MiB, pool=p)
            async with await NbdClient.connect(server.uri(vol)) as c:
                await c.write(0, data[p], fua=True)
        server.api.post(f"/api/v1/volumes/{vols['na']}/snapshots", {"name": "s1"})
        copy = unique("c")
        cli_json(server, "volume", "clone", f"{vols['na']}@s1", copy)

        # Each volume, its snapshot and its clone are in their namespace, and only there.
        assert sorted(ceph_cluster.rbd("ls", f"{pool}/{first}").split()) == sorted([vols["na"], copy])
        assert ceph_cluster.rbd("ls", f"{pool}/{second}").split() == [vols["nb"]]
        assert not set(vols.values()) & set(ceph_cluster.rbd("ls", pool).split())
        assert "s1" in ceph_cluster.rbd("snap", "ls", f"{pool}/{first}/{vols['na']}")
        assert [v["pool"] for v in server.api.get("/api/v1/volumes")["volumes"] if v["name"] == copy] == [
            "na"
        ]

    # The offline check reads each pool's catalog and images in its namespace.
    r = subprocess.run(
        [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(tmp_path / "data"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"] and not report["damage"], report
    assert report["volumes"] >= 3, report

    # A restart attaches both again, each from its own namespace.
    with BlockvirtServer(tmp_path / "data", extra_args=SERVE_ARGS) as again:
        for p, vol in vols.items():
            async with await NbdClient.connect(again.uri(vol)) as c:
                assert await c.read(0, len(data[p])) == data[p], p
        async with await NbdClient.connect(again.uri(copy)) as c:
            assert await c.read(0, len(data["na"])) == data["na"]
        for vol in (copy, *vols.values()):
            again.api.delete(f"/api/v1/volumes/{vol}")
        for p in vols:
            again.api.delete(f"/api/v1/pools/{p}")
    assert ceph_cluster.rbd("ls", f"{pool}/{first}").split() == []
