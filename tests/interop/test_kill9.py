"""kill -9 loops: a writer with an exact oracle, fio hammering another region, snapshots being
taken, then SIGKILL at a random moment. After every restart, no write acknowledged before a
completed FLUSH is lost, every block holds one of the versions written to it (never garbage
or another block's data), snapshots read only versions that were written, and the offline
check finds no damage."""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from blockvirt.client import NbdClient, NbdClientError
from blockvirt.testing import BlockvirtServer

from .conftest import need

pytestmark = [pytest.mark.interop, pytest.mark.slow]

BLOCK = 4096
ORACLE_BLOCKS = 512  # the first 2 MiB: our writer's blocks
SIZE = 32 * 1024 * 1024
ROUNDS = 8


def _content(block: int, version: int) -> bytes:
    """A block's contents for one version: unique to (block, version), checkable."""
    head = struct.pack(">QQ", block, version)
    return (head * (BLOCK // len(head)))[:BLOCK]


def _decode(data: bytes) -> tuple[int, int] | None:
    if data == bytes(BLOCK):
        return None
    block, version = struct.unpack(">QQ", data[:16])
    return (block, version) if data == _content(block, version) else (-1, -1)


class Oracle:
    def __init__(self) -> None:
        self.durable = [0] * ORACLE_BLOCKS  # version guaranteed after a crash (0: zeros)
        self.written: list[set[int]] = [{0} for _ in range(ORACLE_BLOCKS)]  # every version ever sent
        self.version = 0

    def check(self, block: int, data: bytes, where: str) -> None:
        got = _decode(data)
        if got is None:
            version = 0
        else:
            assert got[0] == block, f"{where}: block {block} holds data of block {got[0]}"
            version = got[1]
        assert version in self.written[block], f"{where}: block {block} holds unknown version {version}"
        assert version >= self.durable[block], (
            f"{where}: block {block} lost flushed version {self.durable[block]} (reads {version})"
        )


async def _writer(uri: str, oracle: Oracle, rng: random.Random, stop: asyncio.Event) -> None:
    async with await NbdClient.connect(uri) as c:
        pending: dict[int, int] = {}  # block -> latest acknowledged, unflushed version
        while not stop.is_set():
            for _ in range(rng.randint(1, 16)):
                block = rng.randrange(ORACLE_BLOCKS)
                oracle.version += 1
                v = oracle.version
                oracle.written[block].add(v)
                fua = rng.random() < 0.1
                await c.write(block * BLOCK, _content(block, v), fua=fua)
                if fua:
                    oracle.durable[block] = max(oracle.durable[block], v)
                else:
                    pending[block] = v
            covered = dict(pending)  # replies received before the FLUSH is sent
            await c.flush()
            for block, v in covered.items():
                oracle.durable[block] = max(oracle.durable[block], v)
            pending.clear()


async def _snapshotter(
    server: BlockvirtServer, rng: random.Random, stop: asyncio.Event, taken: list[str]
) -> None:
    n = 0
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.05, 0.3))
        n += 1
        name = f"s{len(taken)}-{n}"
        try:
            await asyncio.to_thread(server.api.post, "/api/v1/volumes/vol/snapshots", {"name": name})
        except Exception:
            return  # the server is being killed
        taken.append(name)


@pytest.mark.timeout(600)
async def test_kill9_loops_keep_flushed_writes_and_a_clean_catalog(tmp_path: Path) -> None:
    need("fio")
    rng = random.Random(20261123)
    data_dir = tmp_path / "data"
    oracle = Oracle()
    snapshots: list[str] = []
    server = BlockvirtServer(data_dir)
    server.start()
    try:
        server.create_volume("vol", SIZE)
        for rnd in range(ROUNDS):
            uri = server.uri("vol")
            fio = subprocess.Popen(
                [
                    "fio",
                    "--name=load",
                    "--ioengine=nbd",
                    f"--uri={uri}",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=8",
                    f"--offset={SIZE // 2}",
                    f"--size={SIZE // 2}",
                    "--time_based",
                    "--runtime=30",
                    "--eta=never",
                    "--output=/dev/null",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=tmp_path,
            )
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(_writer(uri, oracle, rng, stop)),
                asyncio.create_task(_snapshotter(server, rng, stop, snapshots)),
            ]
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            server.kill()  # SIGKILL mid-write, mid-snapshot, mid-fio
            stop.set()
            for t in tasks:
                with contextlib.suppress(NbdClientError, ConnectionError, OSError):
                    await t
            fio.kill()
            fio.wait()
            # Offline check of the crashed state: no damage (torn tails and leaks allowed).
            chk = subprocess.run(
                [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(data_dir), "--json"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert chk.returncode == 0, f"round {rnd}: check found damage:\n{chk.stdout}{chk.stderr}"
            server = BlockvirtServer(data_dir)
            server.start()
            async with await NbdClient.connect(server.uri("vol")) as c:
                data = await c.read(0, ORACLE_BLOCKS * BLOCK)
            for b in range(ORACLE_BLOCKS):
                oracle.check(b, data[b * BLOCK : (b + 1) * BLOCK], f"round {rnd}, volume")
            # Every surviving snapshot reads only versions that were written.
            listed = [s["name"] for s in server.api.get("/api/v1/volumes/vol/snapshots")["snapshots"]]
            for name in rng.sample(listed, min(3, len(listed))):
                async with await NbdClient.connect(server.uri(f"vol@{name}")) as c:
                    sdata = await c.read(0, ORACLE_BLOCKS * BLOCK)
                for b in range(ORACLE_BLOCKS):
                    got = _decode(sdata[b * BLOCK : (b + 1) * BLOCK])
                    version = 0 if got is None else got[1]
                    assert got is None or got[0] == b, f"snapshot {name}: block {b} holds another block"
                    assert version in oracle.written[b], f"snapshot {name}: block {b} unknown version"
            # Keep the chain from growing without bound: drop most snapshots.
            for name in listed[:-2]:
                server.api.delete(f"/api/v1/volumes/vol/snapshots/{name}")
        assert snapshots, "no snapshot was taken"
    finally:
        server.stop()
    chk = subprocess.run(
        [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chk.returncode == 0, chk.stdout + chk.stderr
