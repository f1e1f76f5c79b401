"""Live migration between a file pool and an RBD pool, both ways, with a snapshot tree and an
initiator writing throughout; checked byte for byte against what the test wrote, and with
Ceph's own tools."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from pathlib import Path
from typing import Any

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph

MiB = 1 << 20
SIZE = 16 * MiB
BLOCK = 4096


def cli_json(server: BlockvirtServer, *args: str) -> Any:
    r = server.cli(*args, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout) if r.stdout.strip() else None


async def write(uri: str, writes: list[tuple[int, bytes]]) -> None:
    async with await NbdClient.connect(uri) as disk:
        for off, data in writes:
            await disk.write(off, data)
        await disk.flush()


async def read_all(uri: str, size: int) -> bytes:
    async with await NbdClient.connect(uri) as disk:
        out = bytearray()
        for off in range(0, size, MiB):
            out += await disk.read(off, min(MiB, size - off))
        return bytes(out)


class Writer:
    """Writes random 4 KiB blocks with a flush every few, and remembers what it wrote."""

    def __init__(self, uri: str, model: bytearray, seed: int) -> None:
        self.uri, self.model = uri, model
        self.rng = random.Random(seed)
        self.stop = asyncio.Event()
        self.writes = 0

    async def run(self) -> None:
        async with await NbdClient.connect(self.uri) as disk:
            while not self.stop.is_set():
                off = self.rng.randrange(SIZE // BLOCK) * BLOCK
                data = self.rng.randbytes(BLOCK)
                await disk.write(off, data)
                self.model[off : off + BLOCK] = data
                self.writes += 1
                if self.writes % 16 == 0:
                    await disk.flush()
                await asyncio.sleep(0.002)
            await disk.flush()


@pytest.fixture
def server(tmp_path: Path, ceph_cluster: CephCluster, ceph_pool: str) -> Any:
    with BlockvirtServer(tmp_path / "data") as s:
        r = s.cli("pool", "create", "ceph", "--rbd", ceph_pool, "--ceph-conf", str(ceph_cluster.conf_path))
        assert r.returncode == 0, r.stderr
        yield s


async def test_a_snapshot_tree_moves_to_rbd_and_back_under_writes(
    server: BlockvirtServer, ceph_cluster: CephCluster, ceph_pool: str
) -> None:
    name = f"mig-{uuid.uuid4().hex[:8]}"
    server.create_volume(name, SIZE)
    uri = server.uri(name)
    rng = random.Random(1)
    model = bytearray(SIZE)
    snaps: dict[str, bytes] = {}

    async def put(off: int, n: int) -> None:
        data = rng.randbytes(n)
        await write(uri, [(off, data)])
        model[off : off + n] = data

    await put(0, 256 * 1024)
    await put(5 * MiB, 64 * 1024)
    cli_json(server, "snapshot", "create", name, "s1")
    snaps["s1"] = bytes(model)
    await put(64 * 1024, 128 * 1024)
    async with await NbdClient.connect(uri) as disk:  # a zeroed range must stay zero
        await disk.zero(5 * MiB, 64 * 1024)
        await disk.flush()
    model[5 * MiB : 5 * MiB + 64 * 1024] = bytes(64 * 1024)
    cli_json(server, "snapshot", "create", name, "s2")
    snaps["s2"] = bytes(model)
    r = server.cli("snapshot", "revert", name, "s1")
    assert r.returncode == 0, r.stderr
    model[:] = snaps["s1"]
    await put(9 * MiB, 300 * 1024)  # a branch beside s2
    cli_json(server, "snapshot", "create", name, "s3")
    snaps["s3"] = bytes(model)
    await put(12 * MiB, 100 * 1024)
    server.api.post(f"/api/v1/volumes/{name}/acl", {"kind": "address", "value": "127.0.0.0/8"})
    server.api.request("PATCH", f"/api/v1/volumes/{name}/qos", {"shares": 1500, "limit": 900})
    tree = {s["name"]: (s["parent"], s["current"]) for s in cli_json(server, "snapshot", "list", name)}
    assert tree == {"s1": (None, False), "s2": ("s1", False), "s3": ("s1", True)}

    for pool, kind in (("ceph", "rbd"), ("default", "file")):
        writer = Writer(uri, model, seed=hash(pool) & 0xFFFF)
        task = asyncio.ensure_future(writer.run())
        await asyncio.sleep(0.3)
        job = await asyncio.to_thread(cli_json, server, "migrate", name, "--pool", pool, "--wait")
        await asyncio.sleep(0.3)  # writes on the new home
        writer.stop.set()
        await task
        assert job["state"] == "done", job
        assert writer.writes > 20
        info = cli_json(server, "volume", "info", name)
        assert info["pool"] == pool
        got = {s["name"]: (s["parent"], s["current"]) for s in cli_json(server, "snapshot", "list", name)}
        assert got == tree, f"after moving to {pool}"
        assert await read_all(uri, SIZE) == bytes(model)
        for snap, content in snaps.items():
            assert await read_all(server.uri(f"{name}@{snap}"), SIZE) == content, f"{snap} in {pool}"
        rules = server.api.get(f"/api/v1/volumes/{name}/acl")["rules"]
        assert [(r["kind"], r["value"]) for r in rules] == [("address", "127.0.0.0/8")]
        qos = server.api.get(f"/api/v1/volumes/{name}/qos")
        assert (qos["shares"], qos["limit"]) == (1500, 900)
        images = ceph_cluster.rbd("ls", ceph_pool).split()
        if kind == "rbd":
            assert name in images
            listed = ceph_cluster.rbd("snap", "ls", f"{ceph_pool}/{name}", "--format", "json")
            rbd_snaps = {s["name"] for s in json.loads(listed)}
            assert rbd_snaps == {"s1", "s2", "s3"}
        else:
            assert name not in images  # the source copy is gone from Ceph

    server.stop()
    r = server.cli("check", "--data-dir", str(server.data_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "leak" not in r.stdout, r.stdout
