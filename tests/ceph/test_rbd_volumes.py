"""Every volume command on an RBD pool, through a real `blockvirt serve`, its CLI and API, and
NBD clients; what blockvirt made is checked with Ceph's own tools (`rbd`, `rados`).

One server and one Ceph pool for the module (tests use unique volume names).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import pytest

from blockvirt.cli.client import ApiError
from blockvirt.client import NbdClient, NbdClientError
from blockvirt.testing import BlockvirtServer
from tests.ceph.conftest import unique
from tests.ceph.rbdpool import BV_POOL, CephView, MiB, cli_error, cli_json, metric, scrape, wait_for
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph

OBJ = 4 * MiB  # RBD's object size: space comes and goes in these
HOLE, ZERO = 1, 2


def volume(server: BlockvirtServer, size: int, *, thick: bool = False, prefix: str = "v") -> str:
    """A new volume in the RBD pool (through the API: the CLI is tested where it matters)."""
    return volume_in(server, BV_POOL, size, thick=thick, prefix=prefix)


def volume_in(
    server: BlockvirtServer, pool: str, size: int, *, thick: bool = False, prefix: str = "v"
) -> str:
    name = unique(prefix)
    server.create_volume(name, size, pool=pool, thick=thick)
    return name


# ---------------------------------------------------------------------------- pools


def test_pool_info_and_list_show_the_ceph_pool(
    rbd_server: BlockvirtServer, ceph_cluster: CephCluster, module_ceph_pool: str
) -> None:
    ceph_cluster.wait_for_stats()
    p = cli_json(rbd_server, "pool", "info", BV_POOL)
    assert p["backend"] == "rbd" and p["path"] == ""
    assert p["rbd"] == {"pool": module_ceph_pool, "conf": str(ceph_cluster.conf_path), "user": None}
    assert "error" not in p and p["state"] == "ok", p

    def df() -> dict[str, int]:
        [mine] = [x for x in ceph_cluster.ceph_json("df")["pools"] if x["name"] == module_ceph_pool]
        return {k: int(v) for k, v in mine["stats"].items() if k in ("stored", "max_avail")}

    # Capacity is what the pool holds plus what it can still take, as `ceph df` says.
    d = df()
    assert p["capacity"] == pytest.approx(d["stored"] + d["max_avail"], rel=0.05)
    assert p["free"] == pytest.approx(d["max_avail"], rel=0.05)

    name = volume(rbd_server, 32 * MiB, thick=True)
    before = p["used"]

    def grown() -> dict[str, object] | None:
        q = cli_json(rbd_server, "pool", "info", BV_POOL)
        return q if q["used"] >= before + 32 * MiB and q["allocated"] >= 32 * MiB else None

    q = wait_for("the thick volume in the pool's figures", grown)
    assert q["provisioned"] >= 32 * MiB and q["volumes"] >= 1
    assert q["used"] == pytest.approx(df()["stored"], rel=0.2)
    listed = {x["name"]: x for x in cli_json(rbd_server, "pool", "list")}
    assert listed[BV_POOL]["backend"] == "rbd" and listed["default"]["backend"] == "file"
    text = rbd_server.cli("pool", "info", BV_POOL).stdout
    assert f"Ceph pool {module_ceph_pool}" in text and "capacity:" in text
    assert f"rbd:{module_ceph_pool}" in rbd_server.cli("pool", "list").stdout
    rbd_server.api.delete(f"/api/v1/volumes/{name}")


# ---------------------------------------------------------------------------- volumes


def test_a_volume_is_a_plain_rbd_image(rbd_server: BlockvirtServer, ceph_view: CephView) -> None:
    thin = volume(rbd_server, 20 * MiB)
    thick = volume(rbd_server, 8 * MiB, thick=True)
    listed = {v["name"]: v for v in cli_json(rbd_server, "volume", "list")}
    assert listed[thin]["pool"] == BV_POOL and listed[thin]["size"] == 20 * MiB
    assert listed[thin]["thick"] is False and listed[thick]["thick"] is True
    info = cli_json(rbd_server, "volume", "info", thin)
    assert info["size"] == 20 * MiB and info["pool"] == BV_POOL and info["snapshots"] == 0

    assert {thin, thick} <= set(ceph_view.ls())
    img = ceph_view.info(thin)
    assert img["size"] == 20 * MiB and img["format"] == 2
    assert {"layering", "exclusive-lock", "object-map", "fast-diff"} <= set(img["features"])
    assert ceph_view.meta(thin) == {"blockvirt.volume": thin}
    # Thin: nothing allocated; thick: every object written at create.
    assert ceph_view.used(thin) == 0
    assert ceph_view.used(thick) == 8 * MiB

    rbd_server.api.delete(f"/api/v1/volumes/{thin}")
    cli_json(rbd_server, "volume", "delete", thick)
    assert not {thin, thick} & set(ceph_view.ls())
    assert "no volume" in cli_error(rbd_server, "volume", "info", thin)


def test_duplicate_and_cross_pool_names_are_conflicts(rbd_server: BlockvirtServer) -> None:
    name = volume(rbd_server, MiB)
    assert "already exists" in cli_error(
        rbd_server, "volume", "create", name, "--size", "1M", "--pool", BV_POOL
    )
    # Names are one namespace across pools of every kind.
    assert "already exists" in cli_error(rbd_server, "volume", "create", name, "--size", "1M")
    rbd_server.create_volume(f"{name}-f", MiB)
    assert "already exists" in cli_error(
        rbd_server, "volume", "create", f"{name}-f", "--size", "1M", "--pool", BV_POOL
    )
    rbd_server.api.delete(f"/api/v1/volumes/{name}")
    rbd_server.api.delete(f"/api/v1/volumes/{name}-f")


async def test_one_name_created_in_two_pools_at_once_is_made_once(rbd_server: BlockvirtServer) -> None:
    # Each RBD pool has its own edit lock, apart from the file pools': two creates of one
    # name may run at once, and the name is still made once.
    def create(name: str, pool: str) -> str:
        try:
            rbd_server.create_volume(name, 8 * MiB, pool=pool)
        except ApiError as e:
            return f"{e.status} {e}"
        return "made"

    for _ in range(8):
        name = unique("race")
        got = await asyncio.gather(
            asyncio.to_thread(create, name, BV_POOL), asyncio.to_thread(create, name, "default")
        )
        assert got.count("made") == 1, got
        [refusal] = [g for g in got if g != "made"]
        assert refusal.startswith("409 "), refusal
        assert "already exists" in refusal or "is being created" in refusal, refusal
        [listed] = [v for v in rbd_server.api.get("/api/v1/volumes")["volumes"] if v["name"] == name]
        rbd_server.api.delete(f"/api/v1/volumes/{name}")
        assert listed["pool"] == (BV_POOL if got[0] == "made" else "default")


async def test_io_fua_and_flush_reach_ceph(rbd_server: BlockvirtServer, ceph_view: CephView) -> None:
    name = volume(rbd_server, 16 * MiB)
    data = os.urandom(MiB + 4096)
    async with await NbdClient.connect(rbd_server.uri(name)) as c:
        assert c.export.can_fua and c.export.can_flush and c.export.can_trim and c.export.can_zero
        await c.write(3 * MiB - 2048, data)  # unaligned, across an object boundary
        await c.write(10 * MiB, b"F" * 4096, fua=True)
        # A FUA write is on the OSDs when acknowledged: another Ceph client reads it.
        assert ceph_view.export(name)[10 * MiB : 10 * MiB + 4096] == b"F" * 4096
        await c.write(12 * MiB, b"f" * 8192)
        await c.flush()
        image = ceph_view.export(name)
        assert image[12 * MiB : 12 * MiB + 8192] == b"f" * 8192
        assert image[3 * MiB - 2048 : 3 * MiB - 2048 + len(data)] == data
        assert await c.read(3 * MiB - 2048, len(data)) == data
        assert await c.read(0, 4096) == bytes(4096)
        with pytest.raises(NbdClientError):
            await c.read(16 * MiB - 512, 1024)  # past the end
    async with await NbdClient.connect(rbd_server.uri(name)) as c:  # a new session
        assert await c.read(10 * MiB, 4096) == b"F" * 4096
    rbd_server.api.delete(f"/api/v1/volumes/{name}")


async def test_deleting_a_volume_just_used_removes_its_image(
    rbd_server: BlockvirtServer, ceph_view: CephView, ceph_cluster: CephCluster
) -> None:
    name = volume(rbd_server, 2 * OBJ)
    for snap in ("a", "b"):
        await write(rbd_server, name, 0, snap.encode() * 4096)
        rbd_server.api.post(f"/api/v1/volumes/{name}/snapshots", {"name": snap})
    assert await read(rbd_server, f"{name}@a", 0, 1) == b"a"  # the snapshot export is open too
    rbd_server.api.delete(f"/api/v1/volumes/{name}")
    assert name not in ceph_view.ls()
    # Removed, not moved to the RBD trash (as it would be if it were still open).
    trash = json.loads(ceph_cluster.rbd("trash", "ls", "-p", ceph_view.pool, "--format", "json"))
    assert trash == []
    assert f"image {name} moved to the RBD trash" not in rbd_server.log()


async def test_a_volume_left_in_the_trash_is_purged_in_the_background(
    rbd_server: BlockvirtServer, ceph_view: CephView, ceph_cluster: CephCluster
) -> None:
    # A delete that met a stale watch moves the image to the RBD trash; only a purge removes
    # it from there, and deletes of clones are not the only purges: the server's periodic
    # look purges too (every 6th look; 1 s apart in these tests). A foreign image in the
    # trash, or one of ours whose snapshots clones still read, is left alone.
    ours, foreign = unique("trashed"), unique("theirs")
    for image in (ours, foreign):
        ceph_cluster.rbd("create", "--size", "4M", ceph_view.spec(image))
    ceph_cluster.rbd("image-meta", "set", ceph_view.spec(ours), "blockvirt.volume", ours)
    for image in (ours, foreign):
        ceph_cluster.rbd("trash", "mv", ceph_view.spec(image))

    def trash() -> list[str]:
        return [
            t["name"]
            for t in json.loads(ceph_cluster.rbd("trash", "ls", "-p", ceph_view.pool, "--format", "json"))
        ]

    assert sorted(trash()) == sorted([ours, foreign])
    wait_for("the trashed volume purged", lambda: ours not in trash() or None, timeout=20, every=1.0)
    assert trash() == [foreign]
    assert f"image {ours} (id " in rbd_server.log() and "removed from the RBD trash" in rbd_server.log()
    ceph_cluster.rbd("trash", "purge", "-p", ceph_view.pool)


async def test_trim_and_write_zeroes_give_space_back(
    rbd_server: BlockvirtServer, ceph_view: CephView
) -> None:
    name = volume(rbd_server, 6 * OBJ)
    async with await NbdClient.connect(rbd_server.uri(name)) as c:
        for i in range(5):
            await c.write(i * OBJ, bytes([0x40 + i]) * OBJ)
        await c.flush()
        assert ceph_view.used(name) == 5 * OBJ
        await c.trim(1 * OBJ, OBJ)  # TRIM of a whole object: freed
        await c.zero(2 * OBJ, OBJ)  # WRITE_ZEROES that may punch holes: freed
        await c.zero(3 * OBJ, OBJ, no_hole=True)  # NO_HOLE: stays allocated
        # A trim smaller than RBD's discard granularity still reads back as zeros.
        await c.trim(4 * OBJ + 4096, 8192)
        await c.flush()
        assert ceph_view.used(name) == 3 * OBJ
        assert await c.read(OBJ, 3 * OBJ) == bytes(3 * OBJ)
        assert await c.read(4 * OBJ, 4096) == b"\x44" * 4096
        assert await c.read(4 * OBJ + 4096, 8192) == bytes(8192)
        assert await c.read(4 * OBJ + 12288, 4096) == b"\x44" * 4096

        # base:allocation from RBD's allocation data: freed objects are holes, the rest data.
        extents = (await c.block_status(0, 6 * OBJ))["base:allocation"]
        runs, pos = [], 0
        for e in extents:
            runs.append((pos, e.length, e.flags))
            pos += e.length
        assert runs == [
            (0, OBJ, 0),
            (OBJ, 2 * OBJ, HOLE | ZERO),
            (3 * OBJ, 2 * OBJ, 0),
            (5 * OBJ, OBJ, HOLE | ZERO),
        ], runs
    rbd_server.api.delete(f"/api/v1/volumes/{name}")


async def test_allocation_figures_are_what_rbd_du_counts(
    rbd_server: BlockvirtServer, ceph_view: CephView, ceph_cluster: CephCluster
) -> None:
    name = volume(rbd_server, 8 * OBJ)
    await write(rbd_server, name, 0, b"a" * (2 * OBJ))  # objects 0, 1
    rbd_server.api.post(f"/api/v1/volumes/{name}/snapshots", {"name": "a"})
    await write(rbd_server, name, OBJ, b"b" * OBJ)  # object 1 again, and 2 new
    await write(rbd_server, name, 2 * OBJ, b"b" * OBJ)
    rbd_server.api.post(f"/api/v1/volumes/{name}/snapshots", {"name": "b"})
    await write(rbd_server, name, 5 * OBJ, b"h" * 4096)  # object 5
    clone = unique("clone")
    rbd_server.api.post("/api/v1/volumes", {"name": clone, "source": f"{name}@b"})

    du = json.loads(ceph_cluster.rbd("du", ceph_view.spec(name), "--format", "json"))
    used = {e.get("snapshot"): int(e["used_size"]) for e in du["images"]}
    assert used == {"a": 2 * OBJ, "b": 2 * OBJ, None: OBJ}, used  # what RBD itself says

    def figures() -> dict[str, int] | None:
        info = rbd_server.api.get(f"/api/v1/volumes/{name}")
        return info if info["allocated"] == 5 * OBJ else None

    info = wait_for("the volume's figures", figures)
    assert info["head_allocated"] == OBJ and info["chain_depth"] == 1
    c = rbd_server.api.get(f"/api/v1/volumes/{clone}")
    assert (c["allocated"], c["chain_depth"]) == (0, 2)  # its data is still its parent's
    rbd_server.api.delete(f"/api/v1/volumes/{clone}")
    rbd_server.api.delete(f"/api/v1/volumes/{name}")


async def test_thick_volumes_keep_their_space(rbd_server: BlockvirtServer, ceph_view: CephView) -> None:
    name = volume(rbd_server, 2 * OBJ, thick=True)
    async with await NbdClient.connect(rbd_server.uri(name)) as c:
        await c.write(0, b"t" * OBJ)
        await c.trim(0, OBJ)
        await c.zero(OBJ, OBJ)
        await c.flush()
        assert await c.read(0, 2 * OBJ) == bytes(2 * OBJ)
        extents = (await c.block_status(0, 2 * OBJ))["base:allocation"]
        assert [(e.length, e.flags) for e in extents] == [(2 * OBJ, 0)]
    assert ceph_view.used(name) == 2 * OBJ
    # Growing a thick volume allocates the new range too.
    cli_json(rbd_server, "volume", "resize", name, str(3 * OBJ))
    assert ceph_view.used(name) == 3 * OBJ
    rbd_server.api.delete(f"/api/v1/volumes/{name}")


async def test_resize_live(rbd_server: BlockvirtServer, ceph_view: CephView) -> None:
    name = volume(rbd_server, 4 * MiB)
    uri = rbd_server.uri(name)
    async with await NbdClient.connect(uri) as c:
        await c.write(0, b"a" * 4096)
        info = cli_json(rbd_server, "volume", "resize", name, "12M")
        assert info["size"] == 12 * MiB and info["resized_from"] == 4 * MiB
        assert ceph_view.info(name)["size"] == 12 * MiB
        # The connected client keeps working, then learns the new size and uses it.
        await c.write(4096, b"b" * 4096)
        assert await c.read(0, 8192) == b"a" * 4096 + b"b" * 4096
        assert await c.refresh_size() == 12 * MiB
        await c.write(12 * MiB - 4096, b"c" * 4096)
        assert await c.read(12 * MiB - 4096, 4096) == b"c" * 4096
        # Shrinking under a connected client is refused.
        assert "connected" in cli_error(rbd_server, "volume", "resize", name, "4M", "--force")
    async with await NbdClient.connect(uri) as c2:
        assert c2.size == 12 * MiB
        assert await c2.read(12 * MiB - 4096, 4096) == b"c" * 4096
    msg = cli_error(rbd_server, "volume", "resize", name, "4M")
    # The data at 12M-4K would go (RBD counts an object from its start to its last byte).
    assert "--force" in msg and "would discard" in msg
    info = cli_json(rbd_server, "volume", "resize", name, "4M", "--force")
    assert info["size"] == 4 * MiB and ceph_view.info(name)["size"] == 4 * MiB
    async with await NbdClient.connect(uri) as c:
        assert c.size == 4 * MiB
        assert await c.read(0, 8192) == b"a" * 4096 + b"b" * 4096
    rbd_server.api.delete(f"/api/v1/volumes/{name}")


# ---------------------------------------------------------------------------- snapshots


async def write(server: BlockvirtServer, export: str, offset: int, data: bytes) -> None:
    async with await NbdClient.connect(server.uri(export)) as c:
        await c.write(offset, data)
        await c.flush()


async def read(server: BlockvirtServer, export: str, offset: int, length: int) -> bytes:
    async with await NbdClient.connect(server.uri(export)) as c:
        return await c.read(offset, length)


def tree(server: BlockvirtServer, name: str) -> list[tuple[str, str | None, bool]]:
    return [(s["name"], s["parent"], s["current"]) for s in cli_json(server, "snapshot", "list", name)]


async def test_snapshots_revert_to_a_branch_and_delete(
    rbd_server: BlockvirtServer, ceph_view: CephView
) -> None:
    name = volume(rbd_server, 8 * MiB)
    await write(rbd_server, name, 0, b"1" * 4096)
    cli_json(rbd_server, "snapshot", "create", name, "s1")
    await write(rbd_server, name, 0, b"2" * 4096)
    cli_json(rbd_server, "snapshot", "create", name, "s2")
    await write(rbd_server, name, 0, b"3" * 4096)
    assert ceph_view.snaps(name) == ["s1", "s2"]  # plain RBD snapshots, named as in blockvirt
    assert ceph_view.export(name, "s1")[:4096] == b"1" * 4096
    assert tree(rbd_server, name) == [("s1", None, False), ("s2", "s1", True)]
    assert cli_json(rbd_server, "volume", "info", name)["snapshots"] == 2

    # VOL@SNAP: read-only exports of each snapshot.
    async with await NbdClient.connect(rbd_server.uri(f"{name}@s1")) as s:
        assert s.export.read_only and s.size == 8 * MiB
        assert await s.read(0, 4096) == b"1" * 4096
        with pytest.raises(NbdClientError):
            await s.write(0, b"x" * 512)
    assert await read(rbd_server, f"{name}@s2", 0, 4096) == b"2" * 4096

    # Revert keeps the newer snapshot: the head starts a branch off s1.
    cli_json(rbd_server, "snapshot", "revert", name, "s1")
    assert await read(rbd_server, name, 0, 4096) == b"1" * 4096
    assert tree(rbd_server, name) == [("s1", None, True), ("s2", "s1", False)]
    await write(rbd_server, name, 4096, b"b" * 4096)
    cli_json(rbd_server, "snapshot", "create", name, "s3")
    assert tree(rbd_server, name) == [("s1", None, False), ("s2", "s1", False), ("s3", "s1", True)]
    assert await read(rbd_server, f"{name}@s2", 0, 8192) == b"2" * 4096 + bytes(4096)
    assert await read(rbd_server, f"{name}@s3", 0, 8192) == b"1" * 4096 + b"b" * 4096
    assert ceph_view.snaps(name) == ["s1", "s2", "s3"]

    # Revert under a connected client needs --force, which disconnects it.
    async with await NbdClient.connect(rbd_server.uri(name)) as c:
        assert "connected" in cli_error(rbd_server, "snapshot", "revert", name, "s2")
        cli_json(rbd_server, "snapshot", "revert", name, "s2", "--force")
        with pytest.raises((NbdClientError, ConnectionError)):
            await c.read(0, 4096)
    assert await read(rbd_server, name, 0, 4096) == b"2" * 4096

    # Deleting a snapshot with children hands them to its parent.
    cli_json(rbd_server, "snapshot", "delete", name, "s1")
    assert tree(rbd_server, name) == [("s2", None, True), ("s3", None, False)]
    assert ceph_view.snaps(name) == ["s2", "s3"]
    assert await read(rbd_server, f"{name}@s3", 0, 8192) == b"1" * 4096 + b"b" * 4096
    assert "no snapshot" in cli_error(rbd_server, "snapshot", "delete", name, "s1")
    assert "already has" in cli_error(rbd_server, "snapshot", "create", name, "s2")
    rbd_server.api.delete(f"/api/v1/volumes/{name}")
    assert name not in ceph_view.ls()


async def test_snapshot_export_in_use_cannot_be_deleted(rbd_server: BlockvirtServer) -> None:
    name = volume(rbd_server, MiB)
    cli_json(rbd_server, "snapshot", "create", name, "busy")
    async with await NbdClient.connect(rbd_server.uri(f"{name}@busy")):
        assert "disconnect" in cli_error(rbd_server, "snapshot", "delete", name, "busy")
    cli_json(rbd_server, "snapshot", "delete", name, "busy")
    rbd_server.api.delete(f"/api/v1/volumes/{name}")


async def test_clone_is_linked_and_flatten_is_a_job(rbd_server: BlockvirtServer, ceph_view: CephView) -> None:
    name = volume(rbd_server, 3 * OBJ)
    data = os.urandom(3 * OBJ)
    await write(rbd_server, name, 0, data)
    cli_json(rbd_server, "snapshot", "create", name, "base")
    clone = unique("clone")
    t0 = time.monotonic()
    rec = cli_json(rbd_server, "volume", "clone", f"{name}@base", clone)
    took = time.monotonic() - t0
    assert rec["size"] == 3 * OBJ and rec["pool"] == BV_POOL
    assert took < 3, took  # linked: nothing is copied (the CLI's own start is most of it)
    parent = ceph_view.info(clone)["parent"]
    assert (parent["pool"], parent["image"], parent["snapshot"]) == (ceph_view.pool, name, "base")
    assert ceph_view.used(clone) == 0
    assert ceph_view.meta(clone) == {"blockvirt.volume": clone}

    # The clone reads through to the snapshot; writes to either stay apart.
    assert await read(rbd_server, clone, 0, 3 * OBJ) == data
    await write(rbd_server, clone, 0, b"c" * 4096)
    await write(rbd_server, name, OBJ, b"p" * 4096)
    assert await read(rbd_server, clone, OBJ, 4096) == data[OBJ : OBJ + 4096]
    assert await read(rbd_server, name, 0, 4096) == data[:4096]

    # A snapshot that a clone reads cannot disappear from under it.
    cli_json(rbd_server, "snapshot", "delete", name, "base")
    assert await read(rbd_server, clone, 2 * OBJ, 4096) == data[2 * OBJ : 2 * OBJ + 4096]
    assert "base" not in ceph_view.snaps(name)

    job = cli_json(rbd_server, "volume", "flatten", clone, "--wait")
    job = rbd_server.api.get(f"/api/v1/jobs/{job['id']}")
    assert job["state"] == "done" and job["kind"] == "flatten", job
    assert job["total"] > 0 and job["done"] == job["total"]
    assert "parent" not in ceph_view.info(clone)
    assert ceph_view.used(clone) == 3 * OBJ
    assert await read(rbd_server, clone, 0, 3 * OBJ) == b"c" * 4096 + data[4096:]
    assert "nothing to flatten" in cli_error(rbd_server, "volume", "flatten", clone)

    # The source can go now that no clone needs its data.
    rbd_server.api.delete(f"/api/v1/volumes/{name}")
    rbd_server.api.delete(f"/api/v1/volumes/{clone}")
    assert not {name, clone} & set(ceph_view.ls())


async def test_deleting_a_cloned_volume_keeps_the_clones_working(
    rbd_server: BlockvirtServer, ceph_view: CephView, ceph_cluster: CephCluster
) -> None:
    name = volume(rbd_server, OBJ)
    await write(rbd_server, name, 0, b"s" * 4096)
    cli_json(rbd_server, "snapshot", "create", name, "snap")
    clones = [unique("clone"), unique("clone")]
    for clone in clones:
        cli_json(rbd_server, "volume", "clone", f"{name}@snap", clone)

    def trashed() -> list[str]:
        trash = json.loads(ceph_cluster.rbd("trash", "ls", "-p", ceph_view.pool, "--format", "json"))
        return [t["name"] for t in trash]

    rbd_server.api.delete(f"/api/v1/volumes/{name}")
    assert name not in ceph_view.ls() and trashed() == [name]  # the clones still read it
    for clone in clones:
        assert await read(rbd_server, clone, 0, 4096) == b"s" * 4096
    rbd_server.api.delete(f"/api/v1/volumes/{clones[0]}")
    assert trashed() == [name]  # the other clone still reads it
    # Once no clone reads it (flattened or deleted), it leaves the trash.
    job = cli_json(rbd_server, "volume", "flatten", clones[1], "--wait")
    assert job["state"] == "done"
    assert trashed() == []
    assert await read(rbd_server, clones[1], 0, 4096) == b"s" * 4096
    rbd_server.api.delete(f"/api/v1/volumes/{clones[1]}")


# ---------------------------------------------------------------------------- settings


async def test_qos_and_access_rules_live_in_the_ceph_catalog(
    rbd_server: BlockvirtServer, ceph_view: CephView
) -> None:
    name = volume(rbd_server, MiB)
    cli_json(rbd_server, "qos", "set", name, "--limit", "500", "--shares", "300")
    q = rbd_server.api.get(f"/api/v1/volumes/{name}/qos")
    assert (q["limit"], q["shares"], q["pool"]) == (500, 300, BV_POOL)
    rule = cli_json(rbd_server, "volume", "acl", "add", name, "--address", "10.9.0.0/16")
    assert {f"acl/{name}", f"qos/{name}", f"vol/{name}"} <= set(ceph_view.catalog_keys())

    # 127.0.0.1 matches no rule: refused; a rule for it lets it in, read-only.
    with pytest.raises(NbdClientError):
        await NbdClient.connect(rbd_server.uri(name))
    cli_json(rbd_server, "volume", "acl", "add", name, "--address", "127.0.0.1", "--read-only")
    async with await NbdClient.connect(rbd_server.uri(name)) as c:
        assert c.export.read_only
    rbd_server.api.delete(f"/api/v1/volumes/{name}/acl/{rule['id']}")
    acl = cli_json(rbd_server, "volume", "acl", "show", name)
    assert [r["value"] for r in acl["rules"]] == ["127.0.0.1/32"]
    rbd_server.api.delete(f"/api/v1/volumes/{name}/acl")

    # The limit holds on the RBD volume: 60 reads at 20 IOPS take about 3 s.
    cli_json(rbd_server, "qos", "set", name, "--limit", "20", "--shares", "0")
    async with await NbdClient.connect(rbd_server.uri(name)) as c:
        t0 = time.monotonic()
        for _ in range(60):
            await c.read(0, 4096)
        took = time.monotonic() - t0
    assert 2.0 < took < 6, took
    rbd_server.api.delete(f"/api/v1/volumes/{name}")
    assert not [k for k in ceph_view.catalog_keys() if k.endswith(f"/{name}")]


# ---------------------------------------------------------------------------- metrics


async def test_metrics_cover_rbd_volumes_and_pools(rbd_server: BlockvirtServer) -> None:
    name = volume(rbd_server, 2 * OBJ)
    async with await NbdClient.connect(rbd_server.uri(name)) as c:
        await c.write(0, b"m" * 65536)
        await c.read(0, 65536)
        await c.flush()
        with pytest.raises(NbdClientError):
            await c.read(2 * OBJ, 4096)  # beyond the end: refused before the backend

        def scraped() -> str | None:
            text = scrape(rbd_server)
            alloc = metric(text, "blockvirt_volume_allocated_bytes", volume=name)
            return text if alloc and alloc >= 65536 else None

        text = await asyncio.to_thread(wait_for, "the volume's allocation in /metrics", scraped)
    assert metric(text, "blockvirt_volume_write_bytes_total", volume=name) == 65536
    assert metric(text, "blockvirt_volume_read_bytes_total", volume=name) == 65536
    assert metric(text, "blockvirt_volume_ops_total", volume=name, op="flush") == 1
    assert metric(text, "blockvirt_volume_size_bytes", volume=name) == 2 * OBJ
    assert metric(text, "blockvirt_volume_errors_total", volume=name) == 1
    assert metric(text, "blockvirt_connections", volume=name) == 1
    assert (metric(text, "blockvirt_pool_capacity_bytes", pool=BV_POOL) or 0) > 0
    assert metric(text, "blockvirt_pool_used_bytes", pool=BV_POOL) is not None
    assert (metric(text, "blockvirt_pool_provisioned_bytes", pool=BV_POOL) or 0) >= 2 * OBJ
    assert metric(text, "blockvirt_pool_watermark_state", pool=BV_POOL) == 0
    rbd_server.api.delete(f"/api/v1/volumes/{name}")


def test_an_empty_rbd_pool_can_be_deleted_and_attached_again(
    rbd_server: BlockvirtServer, ceph_cluster: CephCluster
) -> None:
    other = unique("bvx")
    ceph_cluster.create_pool(other)
    try:
        conf = str(ceph_cluster.conf_path)
        cli_json(rbd_server, "pool", "create", "extra", "--rbd", other, "--ceph-conf", conf)
        name = volume_in(rbd_server, "extra", MiB)
        assert "holds" in cli_error(rbd_server, "pool", "delete", "extra")
        rbd_server.api.delete(f"/api/v1/volumes/{name}")
        assert rbd_server.cli("pool", "delete", "extra").returncode == 0
        assert "no pool" in cli_error(rbd_server, "pool", "info", "extra")

        # The node left the pool's member list and heartbeats there no more.
        def members() -> list[str]:
            argv = ["rados", "-c", conf, "-p", other, "listomapkeys", "blockvirt.nodes"]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
            return [k for k in out.split() if k.startswith("node/")]

        assert members() == []
        time.sleep(2.5)  # two heartbeat periods
        assert members() == []
        # The Ceph pool keeps what blockvirt left there (its empty catalog): attach again.
        p = cli_json(rbd_server, "pool", "create", "extra", "--rbd", other, "--ceph-conf", conf)
        assert p["volumes"] == 0
        rbd_server.api.delete("/api/v1/pools/extra")
    finally:
        ceph_cluster.delete_pool(other)


def test_api_answers_for_rbd_pools(rbd_server: BlockvirtServer) -> None:
    # An RBD pool cannot be deleted while it holds volumes, and has no directory settings.
    name = volume(rbd_server, MiB)
    with pytest.raises(ApiError) as e:
        rbd_server.api.delete(f"/api/v1/pools/{BV_POOL}")
    assert e.value.status == 409 and name in e.value.message
    rbd_server.api.delete(f"/api/v1/volumes/{name}")
    p = rbd_server.api.request("PATCH", f"/api/v1/pools/{BV_POOL}", {"iops_capacity": 5000})
    assert p["settings"]["iops_capacity"] == 5000
    rbd_server.api.request("PATCH", f"/api/v1/pools/{BV_POOL}", {"iops_capacity": 0})
    # Allocation units are a file pool's: refused here, nothing changed.
    with pytest.raises(ApiError) as e:
        rbd_server.api.request("PATCH", f"/api/v1/pools/{BV_POOL}", {"alloc_unit": 0})
    assert e.value.status == 400 and "RADOS objects" in e.value.message
    assert rbd_server.api.get(f"/api/v1/pools/{BV_POOL}")["settings"]["iops_capacity"] == 0


async def test_many_clients_at_once(rbd_server: BlockvirtServer) -> None:
    name = volume(rbd_server, 16 * MiB)
    async with await NbdClient.connect(rbd_server.uri(name)) as c:
        blocks = {i: os.urandom(65536) for i in range(64)}
        await asyncio.gather(*(c.write(i * 65536, d) for i, d in blocks.items()))
        await c.flush()
        got = await asyncio.gather(*(c.read(i * 65536, 65536) for i in blocks))
        assert got == list(blocks.values())
    rbd_server.api.delete(f"/api/v1/volumes/{name}")
