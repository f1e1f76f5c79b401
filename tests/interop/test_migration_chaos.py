"""50 live migrations of a volume with a 3-deep snapshot chain back and forth between two
pools while a writer with an exact oracle writes and flushes; each one is left to finish,
cancelled at a random moment, or ended by `kill -9` of the server at a random moment.

After each: no write acknowledged before a completed FLUSH (or with FUA) is lost, every block
holds a version that was written to it, snapshots are unchanged, every layer's files are in
exactly one pool (the one the catalog names), and the offline check finds no damage; at the
end, none of it leaked."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockvirt.cli.client import ApiError
from blockvirt.client import NbdClient, NbdClientError
from blockvirt.testing import BlockvirtServer

from .test_kill9 import BLOCK, ORACLE_BLOCKS, Oracle, _writer

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MiB = 1 << 20
SIZE = 32 * MiB
ROUNDS = 50


def _check(data_dir: Path) -> str:
    chk = subprocess.run(
        [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chk.returncode == 0, f"check found damage:\n{chk.stdout}{chk.stderr}"
    return chk.stdout


def _one_live_copy(data_dir: Path, pools: dict[str, Path], where: str = "") -> None:
    """Every layer's files are in the pool the catalog names, and in no other pool."""
    db = sqlite3.connect(f"file:{data_dir / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        layers = dict(db.execute("SELECT id, pool FROM layers").fetchall())
    finally:
        db.close()
    for lid, pool in layers.items():
        for name, path in pools.items():
            files = {p.name for p in path.glob(f"{lid}.*")}
            if name == pool:
                assert files == {f"{lid}.data", f"{lid}.map"}, f"{where}: layer {lid} incomplete in {name}"
            else:
                assert not files, f"{where}: layer {lid} has a second copy in pool {name}: {files}"


def _wait_idle(server: BlockvirtServer, timeout: float = 60) -> None:
    """Until no job runs (a resumed migration finishes, or is cancelled if it drags)."""
    deadline = time.monotonic() + timeout
    while True:
        running = [j for j in server.api.get("/api/v1/jobs")["jobs"] if j["state"] == "running"]
        if not running:
            return
        assert time.monotonic() < deadline, running
        time.sleep(0.05)


async def _snapshots(server: BlockvirtServer) -> dict[str, bytes]:
    out = {}
    for s in server.api.get("/api/v1/volumes/vol/snapshots")["snapshots"]:
        async with await NbdClient.connect(server.uri(f"vol@{s['name']}")) as c:
            out[s["name"]] = await c.read(0, SIZE)
    return out


@pytest.mark.timeout(900)
async def test_fifty_migrations_with_cancels_and_kill9(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    data_dir = tmp_path / "data"
    pools = {"default": data_dir / "pools" / "default", "other": tmp_path / "other"}
    oracle = Oracle()
    outcomes: dict[str, int] = {"done": 0, "cancelled": 0, "killed": 0}
    server = BlockvirtServer(data_dir, log_level="info")
    server.start()
    try:
        server.api.post("/api/v1/pools", {"name": "other", "path": str(pools["other"])})
        server.create_volume("vol", SIZE)
        # A 3-deep chain: each snapshot layer holds data of its own past the oracle's range.
        async with await NbdClient.connect(server.uri("vol")) as c:
            for i in range(3):
                await c.write(4 * MiB + i * MiB, rng.randbytes(MiB))
                await c.flush()
                server.api.post("/api/v1/volumes/vol/snapshots", {"name": f"s{i}"})
        snaps = await _snapshots(server)
        pool = "default"
        # The schedule is fixed up front so every action is exercised about a third of the
        # time whatever the timing; the writers draw from their own generator, so how many
        # writes a round managed cannot shift later rounds' actions.
        actions = ["wait", "cancel", "kill"] * (ROUNDS // 3 + 1)
        rng.shuffle(actions)
        writer_rng = random.Random(rng.random())
        for rnd, action in enumerate(actions[:ROUNDS]):
            target = "other" if pool == "default" else "default"
            stop = asyncio.Event()
            writer = asyncio.create_task(_writer(server.uri("vol"), oracle, writer_rng, stop))
            await asyncio.sleep(rng.uniform(0.02, 0.2))
            # A cancel aims at a job still copying: at 2-4 MiB/s the ~5 MiB to copy take longer
            # than the 0.6 s the cancel may wait. Waits and kills see every speed.
            bps = rng.choice([2, 4] if action == "cancel" else [4, 8, 16, 64]) * MiB
            job = server.api.post("/api/v1/volumes/vol/migrate", {"pool": target, "bps_limit": bps})
            await asyncio.sleep(rng.uniform(0.0, 0.6))
            killed = False
            if action == "kill":
                server.kill()
                killed = True
            elif action == "cancel":
                with contextlib.suppress(ApiError):  # 409 if it finished already
                    server.api.post(f"/api/v1/jobs/{job['id']}/cancel", {})
            if not killed:
                state = server.api.get(f"/api/v1/jobs/{job['id']}?wait=1")["state"]
                assert state in ("done", "cancelled"), state
                outcomes[state] += 1
            stop.set()
            with contextlib.suppress(NbdClientError, ConnectionError, OSError):
                await writer
            if killed:
                outcomes["killed"] += 1
                _check(data_dir)  # the crashed state: no damage (orphans are allowed)
                server = BlockvirtServer(data_dir, log_level="info")
                server.start()
            _wait_idle(server)
            pool = server.api.get("/api/v1/volumes/vol")["pool"]
            _one_live_copy(data_dir, pools, f"round {rnd} ({action}, {bps // MiB} MiB/s)")
            async with await NbdClient.connect(server.uri("vol")) as c:
                data = await c.read(0, ORACLE_BLOCKS * BLOCK)
            for b in range(ORACLE_BLOCKS):
                oracle.check(b, data[b * BLOCK : (b + 1) * BLOCK], f"round {rnd} ({action})")
            if rnd % 10 == 9:
                assert await _snapshots(server) == snaps, f"round {rnd}: a snapshot changed"
        assert await _snapshots(server) == snaps
    finally:
        server.stop()
    _one_live_copy(data_dir, pools)
    report = _check(data_dir)
    assert "leak" not in report, report
    assert all(n >= 5 for n in outcomes.values()), outcomes
    assert outcomes["done"] + outcomes["cancelled"] + outcomes["killed"] == ROUNDS
