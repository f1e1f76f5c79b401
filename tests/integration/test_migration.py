"""Live migration between pools, through the API/CLI and the asyncio NBD client: snapshot
trees move whole, writers keep writing (their data is checked against an exact model), cancel
and restart leave one complete copy, conversions thin <-> thick, and clear refusals."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvirt.cli.client import ApiError
from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer
from tests.needs import missing, need_root

KiB = 1024
MiB = 1024 * KiB
SIZE = 32 * MiB


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BlockvirtServer]:
    with BlockvirtServer(tmp_path / "data", log_level="info") as s:
        s.api.post("/api/v1/pools", {"name": "fast", "path": str(tmp_path / "fast")})
        yield s


def pool_dir(server: BlockvirtServer, pool: str) -> Path:
    return Path(server.api.get(f"/api/v1/pools/{pool}")["path"])


def layer_files(server: BlockvirtServer, pool: str) -> set[str]:
    return set(os.listdir(pool_dir(server, pool)))


async def digest(server: BlockvirtServer, export: str) -> str:
    async with await NbdClient.connect(server.uri(export)) as c:
        h = hashlib.sha256()
        for off in range(0, c.size, 4 * MiB):
            h.update(await c.read(off, min(4 * MiB, c.size - off)))
        return h.hexdigest()


def wait_job(server: BlockvirtServer, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = server.api.get(f"/api/v1/jobs/{job_id}")
        if job["state"] != "running":
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


async def build_tree(server: BlockvirtServer, name: str, depth: int = 3, *, thick: bool = False) -> None:
    """A volume with `depth` snapshots, each layer holding distinct data, plus head data."""
    uri = server.create_volume(name, SIZE, thick=thick)
    rng = random.Random(name)
    async with await NbdClient.connect(uri) as c:
        for i in range(depth):
            for _ in range(8):
                off = rng.randrange(SIZE // 4096) * 4096
                await c.write(off, rng.randbytes(4096 * rng.randint(1, 16))[: SIZE - off])
            await c.zero(rng.randrange(SIZE // 4096) * 4096, 8192)
            await c.flush()
            server.api.post(f"/api/v1/volumes/{name}/snapshots", {"name": f"s{i}"})
        await c.write(5 * MiB, b"head" * 4096)
        await c.flush()


def exports(server: BlockvirtServer, name: str) -> list[str]:
    snaps = server.api.get(f"/api/v1/volumes/{name}/snapshots")["snapshots"]
    return [name, *(f"{name}@{s['name']}" for s in snaps)]


class Writer:
    """Writes 4 KiB blocks (pattern = block number and version) at queue depth 8 until told to
    stop, with FUA or FLUSH now and then, keeping the exact expected content and the times
    replies arrived (for the largest gap an initiator saw). Each of the 8 workers owns a slice
    of the blocks, so the last write acknowledged for a block is what it must hold."""

    def __init__(self, uri: str, blocks: range, seed: int = 7) -> None:
        self.uri = uri
        self.blocks = blocks
        self.rng = random.Random(seed)
        self.model: dict[int, bytes] = {}
        self.acks: list[float] = []
        self.errors: list[BaseException] = []
        self.stop = asyncio.Event()

    @staticmethod
    def content(block: int, version: int) -> bytes:
        return (block.to_bytes(8, "big") + version.to_bytes(8, "big")) * 256

    async def run(self) -> None:
        async with await NbdClient.connect(self.uri) as c:
            version = 0

            # One block per worker at a time, so "last sent" is "last written" for it.
            workers = 8
            per = len(self.blocks) // workers
            slices = [self.blocks[i * per : (i + 1) * per] for i in range(workers)]
            rngs = [random.Random(i) for i in range(workers)]

            async def worker(blocks: range, rng: random.Random) -> None:
                nonlocal version
                while not self.stop.is_set():
                    version += 1
                    block = rng.choice(blocks)
                    data = self.content(block, version)
                    try:
                        await c.write(block * 4096, data, fua=version % 97 == 0)
                    except Exception as e:
                        self.errors.append(e)
                        return
                    self.model[block] = data
                    self.acks.append(time.perf_counter())
                    if version % 50 == 0:
                        await c.flush()

            await asyncio.gather(*(worker(b, r) for b, r in zip(slices, rngs, strict=True)))
            await c.flush()

    def max_gap(self, since: float, until: float) -> float:
        times = [t for t in self.acks if since <= t <= until]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    async def verify(self, uri: str) -> None:
        async with await NbdClient.connect(uri) as c:
            for block, data in self.model.items():
                got = await c.read(block * 4096, 4096)
                assert got == data, f"block {block} lost its last write"


# ---------------------------------------------------------------------------- tests


async def test_tree_moves_whole_and_byte_identical(server: BlockvirtServer) -> None:
    await build_tree(server, "vol", depth=3)
    before = {e: await digest(server, e) for e in exports(server, "vol")}
    default_before = layer_files(server, "default")
    r = server.cli("migrate", "vol", "--pool", "fast", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["state"] == "done" and job["pool"] == "fast" and job["unit"] == "bytes"
    assert job["done"] == job["total"] > 0
    assert job["result"]["pause_seconds"] < 1
    after = {e: await digest(server, e) for e in exports(server, "vol")}
    assert after == before
    info = server.api.get("/api/v1/volumes/vol")
    assert info["pool"] == "fast" and info["chain_depth"] == 4
    # Four layers (head + 3 snapshots), data + map each, now in the new pool; the old pool
    # gave its space back.
    assert len(layer_files(server, "fast")) == 8
    assert layer_files(server, "default") == set()
    assert len(default_before) == 8
    server.stop()
    r = server.cli("check", "--data-dir", str(server.data_dir))
    assert r.returncode == 0 and "clean" in r.stdout and "leak" not in r.stdout, r.stdout


async def test_writes_during_migration_are_kept(server: BlockvirtServer) -> None:
    await build_tree(server, "busy", depth=2)
    writer = Writer(server.uri("busy"), range(0, 4096))  # the first 16 MiB
    task = asyncio.ensure_future(writer.run())
    await asyncio.sleep(0.3)
    t0 = time.perf_counter()
    job = server.api.post("/api/v1/volumes/busy/migrate", {"pool": "fast", "bps_limit": "16M"})
    job = await asyncio.to_thread(wait_job, server, job["id"])
    t1 = time.perf_counter()
    await asyncio.sleep(0.3)
    writer.stop.set()
    await task
    assert not writer.errors, writer.errors
    assert job["state"] == "done", job
    assert job["result"]["mirrored_writes"] > 0  # writes landed on copied chunks and were mirrored
    assert len([t for t in writer.acks if t0 <= t <= t1]) > 100
    await writer.verify(server.uri("busy"))
    # Snapshots did not change (only the head takes writes).
    assert server.api.get("/api/v1/volumes/busy")["pool"] == "fast"
    assert writer.max_gap(t0, t1 + 0.3) < 1.0


async def test_flush_in_flight_at_the_switchover_succeeds(tmp_path: Path) -> None:
    """A FLUSH passes the switchover's drain (a drain never waits for an fdatasync), so one
    can still be committing on the source when the switch retires it. The source's syncs are
    slowed so that one always is: every FLUSH must succeed and every acknowledged write stay."""
    with BlockvirtServer(tmp_path / "data", log_level="info", extra_args=("--fault-injection",)) as s:
        s.api.post("/api/v1/pools", {"name": "fast", "path": str(tmp_path / "fast")})
        uri = s.create_volume("slow", 8 * MiB)
        writer = Writer(uri, range(0, 1024))
        writing = asyncio.ensure_future(writer.run())
        flushes: list[float] = []
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def flusher() -> None:
            async with await NbdClient.connect(uri) as c:
                while not stop.is_set():
                    t = time.perf_counter()
                    try:
                        await c.flush()
                    except Exception as e:
                        failures.append(e)
                        return
                    flushes.append(time.perf_counter() - t)

        s.api.request("PUT", "/api/v1/debug/faults", {"pool": "default", "ops": ["sync"], "delay_ms": 150})
        flushing = asyncio.ensure_future(flusher())
        await asyncio.sleep(0.5)
        job = s.api.post("/api/v1/volumes/slow/migrate", {"pool": "fast"})
        job = await asyncio.to_thread(wait_job, s, job["id"])
        await asyncio.sleep(0.5)  # flushes on the target now
        stop.set()
        writer.stop.set()
        await asyncio.gather(flushing, writing)
        assert job["state"] == "done", job
        assert not failures and not writer.errors, (failures, writer.errors)
        assert any(d >= 0.15 for d in flushes), "no FLUSH was slowed: the test tests nothing"
        s.api.delete("/api/v1/debug/faults/default")
        await writer.verify(uri)


async def test_cancel_leaves_source_whole(server: BlockvirtServer) -> None:
    await build_tree(server, "cv", depth=2)
    writer = Writer(server.uri("cv"), range(0, 2048))
    task = asyncio.ensure_future(writer.run())
    job = server.api.post("/api/v1/volumes/cv/migrate", {"pool": "fast", "bps_limit": 256 * KiB})
    await asyncio.sleep(0.5)
    r = server.cli("job", "cancel", job["id"])
    assert r.returncode == 0, r.stderr
    job = await asyncio.to_thread(wait_job, server, job["id"])
    assert job["state"] == "cancelled"
    await asyncio.sleep(0.2)
    writer.stop.set()
    await task
    assert not writer.errors
    await writer.verify(server.uri("cv"))
    assert server.api.get("/api/v1/volumes/cv")["pool"] == "default"
    assert layer_files(server, "fast") == set()  # the partial copy is gone
    with pytest.raises(ApiError) as ei:  # cancelling twice, or a finished job, is a clear error
        server.api.post(f"/api/v1/jobs/{job['id']}/cancel", {})
    assert ei.value.status == 409
    # It can be migrated again afterwards.
    job = server.api.post("/api/v1/volumes/cv/migrate", {"pool": "fast"})
    assert (await asyncio.to_thread(wait_job, server, job["id"]))["state"] == "done"
    await writer.verify(server.uri("cv"))


async def test_restart_mid_migration_resumes(server: BlockvirtServer) -> None:
    await build_tree(server, "rs", depth=2)
    before = {e: await digest(server, e) for e in exports(server, "rs")}
    job = server.api.post("/api/v1/volumes/rs/migrate", {"pool": "fast", "bps_limit": 512 * KiB})
    await asyncio.sleep(0.5)
    assert server.api.get(f"/api/v1/jobs/{job['id']}")["state"] == "running"
    server.stop()
    server.start()  # the job resumes (from scratch: the source stayed authoritative)
    job = await asyncio.to_thread(wait_job, server, job["id"])
    assert job["state"] == "done", job
    assert {e: await digest(server, e) for e in exports(server, "rs")} == before
    assert layer_files(server, "default") == set()


async def test_thin_to_thick_and_back(server: BlockvirtServer) -> None:
    uri = server.create_volume("conv", 8 * MiB)
    async with await NbdClient.connect(uri) as c:
        await c.write(MiB, b"\x5a" * MiB)
        await c.flush()
    before = await digest(server, "conv")
    job = server.api.post("/api/v1/volumes/conv/migrate", {"pool": "fast", "provisioning": "thick"})
    assert (await asyncio.to_thread(wait_job, server, job["id"]))["state"] == "done"
    info = server.api.get("/api/v1/volumes/conv")
    assert info["thick"] is True and info["allocated"] >= 8 * MiB
    assert await digest(server, "conv") == before
    job = server.api.post("/api/v1/volumes/conv/migrate", {"pool": "default", "provisioning": "thin"})
    assert (await asyncio.to_thread(wait_job, server, job["id"]))["state"] == "done"
    info = server.api.get("/api/v1/volumes/conv")
    assert info["thick"] is False
    assert info["allocated"] <= 2 * MiB  # the zero blocks were not copied
    assert await digest(server, "conv") == before
    async with await NbdClient.connect(uri) as c:  # and it is thin: unwritten blocks are holes
        ext = (await c.block_status(0, 8 * MiB))["base:allocation"]
        assert ext[0].flags & 1 and ext[0].length == MiB


async def test_clone_sharing_a_moved_layer(server: BlockvirtServer) -> None:
    await build_tree(server, "orig", depth=1)
    server.api.post("/api/v1/volumes", {"name": "kid", "source": "orig@s0"})
    async with await NbdClient.connect(server.uri("kid")) as kid:  # open while it moves
        await kid.write(0, b"k" * 4096)
        before = await digest(server, "kid")
        job = server.api.post("/api/v1/volumes/orig/migrate", {"pool": "fast"})
        assert (await asyncio.to_thread(wait_job, server, job["id"]))["state"] == "done"
        assert await kid.read(0, 4096) == b"k" * 4096
        await kid.flush()
    assert await digest(server, "kid") == before
    # The clone's own head stays in its pool; the shared snapshot layer moved.
    assert server.api.get("/api/v1/volumes/kid")["pool"] == "default"
    assert len(layer_files(server, "default")) == 2


async def test_refusals(server: BlockvirtServer, tmp_path: Path) -> None:
    await build_tree(server, "ref", depth=1)

    def fails(status: int, method: str, path: str, body: dict[str, Any] | None = None) -> str:
        with pytest.raises(ApiError) as ei:
            server.api.request(method, path, body)
        assert ei.value.status == status, ei.value.message
        return ei.value.message

    assert "already in pool" in fails(409, "POST", "/api/v1/volumes/ref/migrate", {"pool": "default"})
    assert "no pool" in fails(404, "POST", "/api/v1/volumes/ref/migrate", {"pool": "nope"})
    assert "no volume" in fails(404, "POST", "/api/v1/volumes/nope/migrate", {"pool": "fast"})
    assert "provisioning" in fails(
        400, "POST", "/api/v1/volumes/ref/migrate", {"pool": "fast", "provisioning": "fat"}
    )
    fails(400, "POST", "/api/v1/volumes/ref/migrate", {"pool": "fast", "bps_limit": -1})
    fails(400, "POST", "/api/v1/volumes/ref/migrate", {})
    job = server.api.post("/api/v1/volumes/ref/migrate", {"pool": "fast", "bps_limit": 128 * KiB})
    try:
        assert "migrating" in fails(409, "POST", "/api/v1/volumes/ref/snapshots", {"name": "x"})
        assert "migrating" in fails(409, "POST", "/api/v1/volumes/ref/snapshots/s0/revert", {"force": True})
        assert "migrating" in fails(409, "DELETE", "/api/v1/volumes/ref/snapshots/s0")
        assert "migrating" in fails(409, "POST", "/api/v1/volumes", {"name": "c", "source": "ref@s0"})
        fails(409, "POST", "/api/v1/volumes/ref/resize", {"size": "64M"})
        fails(409, "DELETE", "/api/v1/volumes/ref")
        fails(409, "POST", "/api/v1/volumes/ref/migrate", {"pool": "fast"})
        fails(409, "DELETE", "/api/v1/pools/fast")  # a running job's target
    finally:
        server.api.post(f"/api/v1/jobs/{job['id']}/cancel", {})
        wait_job(server, job["id"])
    assert "no job" in fails(404, "POST", "/api/v1/jobs/nothing/cancel", {})
    # CLI errors are one line.
    r = server.cli("migrate", "ref", "--pool", "fast", "--bps-limit", "lots")
    assert r.returncode == 2 and "bps-limit" in r.stderr
    r = server.cli("migrate", "ref", "--pool", "nope")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1


async def test_migrate_into_full_pool_is_refused(server: BlockvirtServer, tmp_path: Path) -> None:
    need_root("mounting a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    rc = os.system(f"mount -t tmpfs -o size=4m tmpfs {small} 2>/dev/null")
    if rc != 0:
        missing("cannot mount tmpfs here")
    try:
        server.api.post("/api/v1/pools", {"name": "small", "path": str(small / "p")})
        uri = server.create_volume("big", 16 * MiB)
        async with await NbdClient.connect(uri) as c:
            await c.write(0, os.urandom(8 * MiB))
            await c.flush()
        with pytest.raises(ApiError) as ei:
            server.api.post("/api/v1/volumes/big/migrate", {"pool": "small"})
        assert ei.value.status == 507 and "free" in ei.value.message
        assert server.api.get("/api/v1/volumes/big")["pool"] == "default"
    finally:
        server.stop()
        os.system(f"umount {small}")
