"""Storage I/O control through the API, the CLI and the asyncio client against a real server:
settings and their validation, persistence, limits felt by a client, live retune, a waiting
request whose client goes away, shutdown with requests waiting, and migration copies charged
to the background class. (The shares/reservation/limit/nested scenarios with fio are in
tests/interop/test_qos.py; the exact math in tests/unit/test_qos_scheduler.py.)"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvirt.cli.client import ApiError
from blockvirt.client import NbdClient
from blockvirt.qos.calibrate import S0_MAX, S0_MIN
from blockvirt.testing import BlockvirtServer
from tests.needs import missing

MiB = 1 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BlockvirtServer]:
    with BlockvirtServer(tmp_path / "data", log_level="info") as s:
        yield s


def qos(server: BlockvirtServer, volume: str, **changes: Any) -> dict[str, Any]:
    out: dict[str, Any] = server.api.request("PATCH", f"/api/v1/volumes/{volume}/qos", changes)
    return out


def refused(status: int, fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ApiError) as ei:
        fn(*args, **kwargs)
    assert ei.value.status == status, ei.value.message
    return ei.value.message


async def rate(uri: str, seconds: float, qd: int = 8) -> float:
    """4 KiB reads per second one client gets at queue depth `qd`."""
    async with await NbdClient.connect(uri) as c:
        n = 0
        stop = time.monotonic() + seconds

        async def one(i: int) -> None:
            nonlocal n
            off = i * 4096
            while time.monotonic() < stop:
                await c.read(off, 4096)
                n += 1

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(qd)))
        return n / (time.monotonic() - t0)


# ---------------------------------------------------------------------------- settings


def test_settings_validation_and_persistence(server: BlockvirtServer) -> None:
    server.create_volume("v1", MiB)
    server.create_volume("v2", MiB)
    r = server.cli("qos", "set", "v1", "--shares", "2000", "--limit", "500", "--bps-limit", "10M", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    got = (out["shares"], out["limit"], out["bps_limit"], out["effective_limit"])
    assert got == (2000, 500, 10 * MiB, 500)
    assert "reservation" in refused(409, qos, server, "v1", reservation=600)  # above its limit
    for bad in ({"shares": -1}, {"limit": "lots"}, {"reservation": True}, {"shares": 1.5}, {"color": 1}):
        refused(400, qos, server, "v1", **bad)
    refused(404, qos, server, "ghost", shares=5)
    # Groups: nesting, limits narrowing down, reservations adding up, no cycles.
    server.api.post("/api/v1/qos/groups", {"name": "A", "reservation": 1000, "limit": 3000})
    server.api.post("/api/v1/qos/groups", {"name": "B", "parent": "A", "limit": 800})
    out = qos(server, "v2", group="B", limit=2000)
    assert out["effective_limit"] == 800  # the narrower group wins
    assert "reservation" in refused(409, qos, server, "v2", reservation=900)  # above B's limit
    qos(server, "v2", reservation=700)
    assert "members reserve" in refused(409, qos, server, "v1", group="A", reservation=400)
    assert "cycle" in refused(400, server.api.request, "PATCH", "/api/v1/qos/groups/A", {"parent": "B"})
    refused(404, qos, server, "v1", group="nope")
    assert "bps_limit" in refused(400, server.api.request, "PATCH", "/api/v1/qos/groups/A", {"bps_limit": 5})
    assert "not empty" in refused(409, server.api.delete, "/api/v1/qos/groups/A")
    # Pool capacity against reservations (top of the tree: A's 1000 covers its members).
    refused(409, server.api.request, "PATCH", "/api/v1/pools/default", {"iops_capacity": 900})
    server.api.request("PATCH", "/api/v1/pools/default", {"iops_capacity": 4000})
    assert "capacity" in refused(409, qos, server, "v1", reservation=3500, limit=0)
    shown = server.api.get("/api/v1/qos")
    [pool] = shown["pools"]
    assert pool["capacity"] == 4000 and pool["reserved"] == 1000
    text = server.cli("qos", "show").stdout
    assert "pool default: capacity 4000 IOPS" in text and "group A" in text and "group B" in text
    assert "v2: shares 1000, reservation 700, limit 2000 (capped at 800 above)" in text
    # Everything survives a restart.
    server.stop()
    server.start()
    again = server.api.get("/api/v1/qos")
    assert again["groups"] == shown["groups"]
    assert server.api.get("/api/v1/volumes/v1/qos")["limit"] == 500
    # A deleted volume's settings go with it.
    server.api.delete("/api/v1/volumes/v1")
    server.create_volume("v1", MiB)
    assert server.api.get("/api/v1/volumes/v1/qos")["limit"] == 0
    # An emptied group can go.
    qos(server, "v2", group=None, reservation=0)
    server.api.delete("/api/v1/qos/groups/B")
    server.api.delete("/api/v1/qos/groups/A")
    assert server.api.get("/api/v1/qos/groups")["groups"] == []
    r = server.cli("qos", "set", "v2")
    assert r.returncode == 2 and "at least one" in r.stderr


# ---------------------------------------------------------------------------- behaviour


async def test_limit_and_live_retune_felt_by_a_client(server: BlockvirtServer) -> None:
    uri = server.create_volume("lim", MiB)
    qos(server, "lim", limit=300)
    got = await rate(uri, 2.0)
    assert 0.85 * 300 <= got <= 1.1 * 300, got
    async with await NbdClient.connect(uri) as c:  # a connected client feels a retune at once
        qos(server, "lim", limit=1500)
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.0:
            await asyncio.gather(*(c.read(i * 4096, 4096) for i in range(8)))
            n += 8
        assert n >= 0.8 * 1500, n
    qos(server, "lim", limit=0)  # cleared: not held back any more
    assert await rate(uri, 1.0) > 3000


async def test_waiting_request_honours_client_disconnect(server: BlockvirtServer) -> None:
    server.create_volume("slow", MiB)
    qos(server, "slow", limit=5)
    sock = socket.create_connection((server.nbd_host, server.nbd_port))
    try:
        sock.settimeout(10)
        _handshake(sock, "slow")
        for i in range(40):  # 40 reads at 5 IOPS: most of them wait
            sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, i * 4096, 4096))
        deadline = time.monotonic() + 5
        while server.api.get("/api/v1/volumes/slow/qos")["queued"] < 20:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        sock.close()  # gone: its waiting requests must not linger (or be served)
    deadline = time.monotonic() + 2
    while (q := server.api.get("/api/v1/volumes/slow/qos"))["queued"]:
        assert time.monotonic() < deadline, q
        await asyncio.sleep(0.05)
    assert server.api.get("/api/v1/volumes/slow")["connections"] == 0
    # The volume and the server are fine.
    qos(server, "slow", limit=0)
    async with await NbdClient.connect(server.uri("slow")) as c:
        assert await c.read(0, 4096) == bytes(4096)


def _handshake(sock: socket.socket, export: str) -> None:
    def recv(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "closed"
            buf += chunk
        return buf

    recv(18)
    sock.sendall(struct.pack(">I", 1))  # FIXED_NEWSTYLE
    name = export.encode()
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)  # EXPORT_NAME
    recv(8 + 2 + 124)


async def test_shutdown_lets_waiting_requests_go(server: BlockvirtServer) -> None:
    uri = server.create_volume("sd", MiB)
    qos(server, "sd", limit=2)
    async with await NbdClient.connect(uri) as c:
        tasks = [asyncio.ensure_future(c.write(i * 4096, bytes([i + 1]) * 4096)) for i in range(20)]
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await asyncio.to_thread(server.stop)
        assert time.monotonic() - t0 < 8  # not 20 requests at 2 IOPS
        done = await asyncio.gather(*tasks, return_exceptions=True)
    acked = [i for i, d in enumerate(done) if d is None]
    assert len(acked) >= 18, done  # the queue was let go; writes completed and were acknowledged
    server.start()
    async with await NbdClient.connect(uri) as c:
        for i in acked:
            assert await c.read(i * 4096, 4096) == bytes([i + 1]) * 4096


async def test_migration_copies_are_background(server: BlockvirtServer, tmp_path: Path) -> None:
    """In a capped pool, a migration's copy gets the background class's shares: a busy volume
    keeps most of the capacity, and the migration still moves on."""
    server.api.post("/api/v1/pools", {"name": "other", "path": str(tmp_path / "other")})
    server.api.request("PATCH", "/api/v1/pools/default", {"iops_capacity": 2000})
    busy = server.create_volume("busy", MiB)
    mover = server.create_volume("mover", 32 * MiB)
    async with await NbdClient.connect(mover) as c:
        for i in range(16):  # 16 chunks of ~103 cost units: many seconds of a 9% share
            await c.write(i * MiB, b"m" * MiB)
        await c.flush()
    baseline = await rate(busy, 2.0, qd=16)
    assert 1600 <= baseline <= 2100, baseline  # the pool's cap binds
    job = server.api.post("/api/v1/volumes/mover/migrate", {"pool": "other"})
    # 3 s, not 2: the job's start (opening the target, inserting its mirror) is a smaller
    # part of the window; the copy itself needs ~9 s at its share, so it still runs after.
    during = await rate(busy, 3.0, qd=16)
    state = server.api.get(f"/api/v1/jobs/{job['id']}")
    assert state["state"] == "running" and state["done"] > 0, state  # moving, slowly
    assert during >= 0.85 * baseline, (during, baseline)  # the volume kept ~1000/1100 of it
    shown = server.api.get("/api/v1/qos")["pools"]
    bg = next(p for p in shown if p["pool"] == "default")["background"]
    assert bg["served"]["weight"] + bg["served"]["immediate"] > 0
    server.api.request("PATCH", "/api/v1/pools/default", {"iops_capacity": 0})
    final = server.api.get(f"/api/v1/jobs/{job['id']}?wait=1")
    assert final["state"] == "done", final


def fio_iops(directory: Path, bs: str) -> float:
    """What fio measures on the same device, the way calibrate does it: random reads, direct
    I/O, 16 synchronous readers."""
    if shutil.which("fio") is None:
        missing("fio is not installed")
    out = subprocess.run(
        ["fio", "--name=cal", f"--directory={directory}", "--size=64M", "--rw=randread", f"--bs={bs}",
         "--direct=1", "--ioengine=psync", "--numjobs=16", "--group_reporting", "--time_based",
         "--runtime=1", "--output-format=json"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return float(json.loads(out.stdout)["jobs"][0]["read"]["iops"])


def test_pool_calibrate(server: BlockvirtServer, tmp_path: Path) -> None:
    r = server.cli("pool", "calibrate", "default", "--seconds", "1", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    dry = json.loads(r.stdout)
    assert dry["applied"] is False and dry["direct_io"], dry
    # The rates are the device's: fio, measuring the same file system right after, agrees
    # within a factor of 2 (they vary run to run on a shared machine, not by more).
    scratch = Path(server.api.get("/api/v1/pools/default")["path"]).parent / "fio-scratch"
    scratch.mkdir()
    try:
        for key, bs in (("iops_4k", "4k"), ("iops_1m", "1M")):
            theirs = fio_iops(scratch, bs)
            assert theirs / 2 <= dry[key] <= theirs * 2, (key, dry[key], theirs)
    finally:
        shutil.rmtree(scratch)
    # A capacity with 10 % headroom under the measured 4 KiB rate, and an S0 that the rates
    # determined (a device with both a per-request and a per-byte cost: not at a clamp).
    assert 0.85 * dry["iops_4k"] <= dry["iops_capacity"] <= 0.95 * dry["iops_4k"], dry
    assert S0_MIN < dry["cost_s0"] < S0_MAX, dry
    assert server.api.get("/api/v1/pools/default")["settings"]["iops_capacity"] == 0
    r = server.cli("pool", "calibrate", "default", "--seconds", "1", "--json")
    assert r.returncode == 0, r.stderr
    applied = json.loads(r.stdout)
    assert applied["applied"] is True
    settings = server.api.get("/api/v1/pools/default")["settings"]
    assert settings["iops_capacity"] == applied["iops_capacity"] and settings["cost_s0"] == applied["cost_s0"]
    assert [p for p in Path(server.api.get("/api/v1/pools/default")["path"]).iterdir()] == []
    with pytest.raises(ApiError) as ei:
        server.api.post("/api/v1/pools/default/calibrate", {"seconds": 0})
    assert ei.value.status == 400
