"""`blockvirt check` on RBD pools: the pool's catalog in Ceph against its images and snapshots.

A server makes volumes and snapshots and stops; then Ceph's own tools (`rbd`, `rados`) do
what crashes and operators do behind blockvirt's back, and `blockvirt check --data-dir` (run
as the CLI, offline) must name each piece of damage, exit 1, and with `--repair` remove only
what is provably blockvirt's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer
from tests.ceph.rbdpool import BV_POOL, SERVE_ARGS, CephView, MiB, attach
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph


def check(data_dir: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    r = subprocess.run(
        [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(data_dir), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


def setomapval(ceph: CephCluster, pool: str, key: str, value: dict[str, Any]) -> None:
    """Write one catalog entry as a crash would leave it (bypassing blockvirt)."""
    subprocess.run(
        [
            "rados",
            "-c",
            str(ceph.conf_path),
            "-p",
            pool,
            "setomapval",
            "blockvirt.catalog",
            key,
            json.dumps(value),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )


async def test_check_finds_each_kind_of_damage_and_repairs_only_ours(
    tmp_path: Path, ceph_cluster: CephCluster, module_ceph_pool: str, ceph_view: CephView
) -> None:
    data = tmp_path / "data"
    with BlockvirtServer(data, extra_args=SERVE_ARGS) as server:
        attach(server, ceph_cluster, module_ceph_pool)
        for name in ("keep", "lost", "snappy", "half", "cut"):
            server.create_volume(name, 4 * MiB, pool=BV_POOL)
        server.create_volume("filevol", MiB)  # a file pool beside it, checked too
        async with await NbdClient.connect(server.uri("keep")) as c:
            await c.write(0, b"k" * 4096, fua=True)
        for vol, snap in (("keep", "k1"), ("snappy", "s1"), ("cut", "c1"), ("cut", "c2")):
            server.api.post(f"/api/v1/volumes/{vol}/snapshots", {"name": snap})
        server.api.post("/api/v1/volumes/cut/snapshots/c1/revert", {})
        server.api.post("/api/v1/volumes/cut/snapshots", {"name": "c3"})  # c2 and c3 on c1
    code, report = check(data)
    assert (code, report["damage"], report["leaks"]) == (0, [], []), report
    assert report["volumes"] == 6

    ceph = ceph_cluster
    spec = ceph_view.spec
    # A catalog volume without its image; a catalog snapshot missing in RBD.
    ceph.rbd("rm", spec("lost"))
    ceph.rbd("snap", "rm", spec("snappy", "s1"))
    # An operator's snapshot on a blockvirt image.
    ceph.rbd("snap", "create", spec("keep", "operator"))
    # A volume create cut short: the image is made and marked, the catalog never heard of it.
    ceph.rbd("create", "--size", "4M", spec("orphan"))
    ceph.rbd("image-meta", "set", spec("orphan"), "blockvirt.volume", "orphan")
    # An image of someone else's, marked for some other name: not ours.
    ceph.rbd("create", "--size", "4M", spec("foreign"))
    ceph.rbd("image-meta", "set", spec("foreign"), "blockvirt.volume", "somebody")
    # A snapshot create cut short after the RBD snapshot (its intent is in the catalog).
    setomapval(ceph, module_ceph_pool, "pending/half/h1", {"op": "create", "created": time.time()})
    ceph.rbd("snap", "create", spec("half", "h1"))
    # A snapshot delete cut short after the RBD snapshot went: c1 has children c2, c3.
    setomapval(ceph, module_ceph_pool, "pending/cut/c1", {"op": "delete", "created": time.time()})
    ceph.rbd("snap", "rm", spec("cut", "c1"))
    # A create cut short before the RBD snapshot: an intent that came to nothing.
    setomapval(ceph, module_ceph_pool, "pending/keep/never", {"op": "create", "created": time.time()})
    # A deleted volume waiting in the trash for a clone that is gone.
    ceph.rbd("create", "--size", "4M", spec("trashed"))
    ceph.rbd("image-meta", "set", spec("trashed"), "blockvirt.volume", "trashed")
    ceph.rbd("trash", "mv", spec("trashed"))

    code, report = check(data)
    assert code == 1
    p = f"pool {BV_POOL}: "
    assert sorted(report["damage"]) == sorted(
        [
            p + "volume lost: its RBD image is missing",
            p + "snapshot snappy@s1 is missing in RBD",
            p + "volume keep: RBD snapshot operator is not in the catalog (left alone)",
            p + "image orphan is marked as a blockvirt volume but the catalog does not know it "
            "(left by a create or delete cut short; --repair removes it)",
            p + "volume half: RBD snapshot h1 left by a snapshot create cut short (--repair removes it)",
            p + "snapshot cut@c1: a delete was cut short (its RBD snapshot is gone; --repair finishes it)",
        ]
    ), report["damage"]
    assert [x for x in report["leaks"] if "trashed" in x], report["leaks"]
    assert p + "image foreign is not blockvirt's (left alone)" in report["notes"]
    assert any("intent to create keep@never" in n for n in report["notes"]), report["notes"]
    text = subprocess.run(
        [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(data)], capture_output=True, text=True
    )
    assert text.returncode == 1 and "DAMAGE: pool rbd: volume lost: its RBD image is missing" in text.stdout

    code, report = check(data, "--repair")
    assert code == 1  # what is not provably ours stays damage
    assert sorted(report["damage"]) == sorted(
        [
            p + "volume lost: its RBD image is missing",
            p + "snapshot snappy@s1 is missing in RBD",
            p + "volume keep: RBD snapshot operator is not in the catalog (left alone)",
        ]
    ), report
    assert len(report["repaired"]) == 5, report["repaired"]
    images = ceph_view.ls()
    assert "orphan" not in images and "foreign" in images and "keep" in images
    assert ceph_view.snaps("half") == [] and ceph_view.snaps("keep") == ["k1", "operator"]
    assert json.loads(ceph.rbd("trash", "ls", "-p", module_ceph_pool, "--format", "json")) == []
    assert not [k for k in ceph_view.catalog_keys() if k.startswith("pending/")]

    # A second repair finds nothing more to do; the server serves the repaired tree.
    code, report = check(data, "--repair")
    assert code == 1 and report["repaired"] == [] and len(report["damage"]) == 3
    with BlockvirtServer(data, extra_args=SERVE_ARGS) as server:
        snaps = server.api.get("/api/v1/volumes/cut/snapshots")["snapshots"]
        assert [(s["name"], s["parent"], s["current"]) for s in snaps] == [
            ("c2", None, False),
            ("c3", None, True),
        ]
        assert server.api.get("/api/v1/volumes/half/snapshots")["snapshots"] == []
        async with await NbdClient.connect(server.uri("keep@k1")) as c:
            assert await c.read(0, 4096) == b"k" * 4096
        # What the operator must settle: forget the lost volume, drop the foreign snapshot.
        server.api.delete("/api/v1/volumes/lost")
        server.api.delete("/api/v1/volumes/snappy/snapshots/s1")
    ceph.rbd("snap", "rm", spec("keep", "operator"))
    ceph.rbd("rm", spec("foreign"))
    code, report = check(data)
    assert (code, report["damage"]) == (0, []), report


def test_check_of_an_unreachable_pool_is_damage_within_seconds(
    tmp_path: Path, ceph_cluster: CephCluster, module_ceph_pool: str
) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text(ceph_cluster.conf_path.read_text())
    data = tmp_path / "data"
    with BlockvirtServer(data, extra_args=SERVE_ARGS) as server:
        server.api.post(
            "/api/v1/pools", {"name": "far", "rbd": {"pool": module_ceph_pool, "conf": str(conf)}}
        )
    # The cluster moves away (its mon answers elsewhere now).
    conf.write_text("[global]\nmon_host = 127.0.0.1:9\n")
    t0 = time.monotonic()
    code, report = check(data)
    took = time.monotonic() - t0
    assert code == 1 and took < 15, took
    # Not damage (nothing to repair), but not clean either.
    assert report["damage"] == [] and report["ok"] is False
    [unchecked] = report["unchecked"]
    assert (
        unchecked.startswith(f"pool far (Ceph pool '{module_ceph_pool}'): cannot be checked")
        and "monitor" in unchecked
    )
