"""Storage pools (create, info, settings, watermarks, delete) and live resize, through the API,
the CLI and the asyncio NBD client against a real server."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvirt.cli.client import ApiError
from blockvirt.client import NbdClient, NbdClientError
from blockvirt.testing import BlockvirtServer

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockvirtServer]:
    with BlockvirtServer(tmp_path_factory.mktemp("pools") / "data") as s:
        yield s


def cli_json(server: BlockvirtServer, *args: str) -> Any:
    r = server.cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def cli_fails(server: BlockvirtServer, *args: str) -> str:
    r = server.cli(*args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


# ---------------------------------------------------------------------------- pools


def test_pool_info_space_and_overcommit(server: BlockvirtServer, tmp_path: Path) -> None:
    p = cli_json(server, "pool", "create", "thinpool", "--path", str(tmp_path / "tp"))
    assert p["state"] == "ok" and p["provisioned"] == 0 and p["volumes"] == 0
    assert p["capacity"] > 0 and p["free"] > 0 and p["used"] >= 0
    # A thin volume larger than the filesystem: allowed, and shown as overcommit.
    big = p["capacity"] * 3 // 4096 * 4096
    server.create_volume("huge", big, pool="thinpool")
    server.create_volume("small", 4 * MiB, pool="thinpool", thick=True)
    p = cli_json(server, "pool", "info", "thinpool")
    assert p["provisioned"] == big + 4 * MiB and p["volumes"] == 2
    assert p["overcommit"] == pytest.approx((big + 4 * MiB) / p["capacity"], rel=1e-3)
    assert any("promise" in w for w in p["warnings"])
    assert p["allocated"] >= 4 * MiB  # the thick volume's preallocation
    text = server.cli("pool", "info", "thinpool").stdout
    assert "overcommit" in text and "state:" in text
    listing = server.cli("pool", "list").stdout.splitlines()
    assert listing[0].split() == ["NAME", "PATH", "CAPACITY", "FREE", "PROVISIONED", "OVERCOMMIT", "STATE"]
    for name in ("huge", "small"):
        server.api.delete(f"/api/v1/volumes/{name}")


def test_pool_watermarks(server: BlockvirtServer, tmp_path: Path) -> None:
    p = cli_json(server, "pool", "create", "wm", "--path", str(tmp_path / "wm"))
    used = p["used_percent"]
    assert used is not None and used > 0
    # Watermarks below what the filesystem already uses: the pool turns warning, then critical.
    p = cli_json(server, "pool", "set", "wm", "--warn-percent", str(used / 2), "--critical-percent", "100")
    assert p["state"] == "warning" and p["settings"]["warn_percent"] == pytest.approx(used / 2)
    assert any("warning watermark" in w for w in p["warnings"])
    p = cli_json(server, "pool", "set", "wm", "--critical-percent", str(used * 3 / 4))
    assert p["state"] == "critical"
    p = cli_json(server, "pool", "set", "wm", "--warn-percent", "100", "--critical-percent", "100")
    assert p["state"] == "ok" and p["warnings"] == []
    # Settings persist.
    assert server.api.get("/api/v1/pools/wm")["settings"]["warn_percent"] == 100
    # Bad settings are refused clearly, nothing changes.
    for args in (
        ("--warn-percent", "95", "--critical-percent", "90"),
        ("--warn-percent", "0"),
        ("--critical-percent", "101"),
        ("--iops-capacity", "-5"),
    ):
        msg = cli_fails(server, "pool", "set", "wm", *args)
        assert "percent" in msg or "capacity" in msg
    assert server.api.get("/api/v1/pools/wm")["settings"]["critical_percent"] == 100
    r = server.cli("pool", "set", "wm")
    assert r.returncode == 2 and "at least one setting" in r.stderr


async def test_pool_allocation_unit(server: BlockvirtServer, tmp_path: Path) -> None:
    """Thin volumes of a file pool grow by its allocation unit (a setting like the others),
    read when a volume is opened; 0 leaves allocation to the file system's blocks."""
    p = cli_json(server, "pool", "create", "units", "--path", str(tmp_path / "u"), "--alloc-unit", "256K")
    assert p["settings"]["alloc_unit"] == 256 * KiB
    assert "thin growth:  256.0 KiB units" in server.cli("pool", "info", "units").stdout
    assert cli_json(server, "pool", "info", "default")["settings"]["alloc_unit"] == MiB
    for bad in ("3K", "128M"):
        assert "alloc_unit must be 0" in cli_fails(server, "pool", "set", "units", "--alloc-unit", bad)
    r = server.cli("pool", "set", "units", "--alloc-unit", "lots")
    assert r.returncode == 2 and "--alloc-unit: invalid size 'lots'" in r.stderr, r.stderr
    with pytest.raises(ApiError) as ei:
        server.api.post(
            "/api/v1/pools", {"name": "u2", "path": str(tmp_path / "u2"), "settings": {"alloc_unit": "1M"}}
        )
    assert ei.value.status == 400
    assert server.api.get("/api/v1/pools/units")["settings"]["alloc_unit"] == 256 * KiB

    async def first_write(name: str) -> int:
        uri = server.create_volume(name, 64 * MiB, pool="units")
        async with await NbdClient.connect(uri) as c:
            await c.write(8 * MiB + 8 * KiB, b"u" * 4096)
            await c.flush()
            assert await c.read(8 * MiB, 16 * KiB) == bytes(8 * KiB) + b"u" * 4096 + bytes(4 * KiB)
        allocated: int = server.api.get(f"/api/v1/volumes/{name}")["allocated"]
        server.api.delete(f"/api/v1/volumes/{name}")
        return allocated

    assert await first_write("unit1") >= 256 * KiB
    cli_json(server, "pool", "set", "units", "--alloc-unit", "0")
    assert "thin growth:  by file-system blocks" in server.cli("pool", "info", "units").stdout
    assert await first_write("unit2") < 64 * KiB


def test_pool_create_errors(server: BlockvirtServer, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "somefile").write_text("operator data")
    assert "not empty" in cli_fails(server, "pool", "create", "p1", "--path", str(full))
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "not a directory" in cli_fails(server, "pool", "create", "p2", "--path", str(afile))
    cli_json(server, "pool", "create", "outer", "--path", str(tmp_path / "outer"))
    assert "nest" in cli_fails(server, "pool", "create", "inner", "--path", str(tmp_path / "outer" / "in"))
    assert "data directory" in cli_fails(server, "pool", "create", "p3", "--path", str(server.data_dir))
    assert "already exists" in cli_fails(server, "pool", "create", "outer", "--path", str(tmp_path / "x"))
    with pytest.raises(ApiError) as ei:
        server.api.post(
            "/api/v1/pools", {"name": "p4", "path": str(tmp_path / "p4"), "settings": {"nope": 1}}
        )
    assert ei.value.status == 400 and "unknown field(s): 'nope' in 'settings'" in ei.value.message
    with pytest.raises(ApiError) as ei:
        server.api.post("/api/v1/pools", {"name": "p5", "path": str(tmp_path / "p5"), "settings": [1]})
    assert ei.value.status == 400
    assert not (tmp_path / "p4").exists() and not (tmp_path / "p5").exists()
    assert "full" in os.listdir(tmp_path)  # nothing of the operator's was touched
    assert (full / "somefile").read_text() == "operator data"


def test_pool_delete(server: BlockvirtServer, tmp_path: Path) -> None:
    cli_json(server, "pool", "create", "gone", "--path", str(tmp_path / "gone"))
    server.create_volume("ingone", MiB, pool="gone")
    msg = cli_fails(server, "pool", "delete", "gone")
    assert "ingone" in msg and "holds" in msg
    server.api.delete("/api/v1/volumes/ingone")
    assert server.cli("pool", "delete", "gone").returncode == 0
    assert not (tmp_path / "gone").exists()
    assert "no pool" in cli_fails(server, "pool", "info", "gone")
    assert "default pool" in cli_fails(server, "pool", "delete", "default")


# ---------------------------------------------------------------------------- resize


async def test_grow_live_with_client_connected(server: BlockvirtServer) -> None:
    uri = server.create_volume("grow1", 4 * MiB)
    async with await NbdClient.connect(uri) as c:
        await c.write(0, b"a" * 4096)
        info = cli_json(server, "volume", "resize", "grow1", "8M")
        assert info["size"] == 8 * MiB and info["resized_from"] == 4 * MiB
        # The connected client keeps working in its old range...
        await c.write(4096, b"b" * 4096)
        assert await c.read(0, 8192) == b"a" * 4096 + b"b" * 4096
        assert c.size == 4 * MiB
        # ...learns the new size without reconnecting, and may use it.
        assert await c.refresh_size() == 8 * MiB
        await c.write(8 * MiB - 4096, b"c" * 4096)
        assert await c.read(8 * MiB - 8192, 8192) == bytes(4096) + b"c" * 4096
        with pytest.raises(NbdClientError):
            await c.read(8 * MiB, 4096)
        await c.flush()
    async with await NbdClient.connect(uri) as c2:  # a new connection sees the new size
        assert c2.size == 8 * MiB
        assert await c2.read(4 * MiB, 4096) == bytes(4096)
        assert await c2.read(8 * MiB - 4096, 4096) == b"c" * 4096
    assert (await NbdClient.info(uri)).size == 8 * MiB  # NBD_OPT_INFO


async def test_grown_range_reads_zeros_over_larger_snapshot(server: BlockvirtServer) -> None:
    uri = server.create_volume("shrunk", 4 * MiB)
    async with await NbdClient.connect(uri) as c:
        await c.write(0, b"\xaa" * 4 * MiB)
        await c.flush()
    server.api.post("/api/v1/volumes/shrunk/snapshots", {"name": "big"})
    async with await NbdClient.connect(uri) as c:  # the head holds some blocks past 2M too
        await c.write(3 * MiB, b"\xbb" * 8192)
        await c.flush()
    msg = cli_fails(server, "volume", "resize", "shrunk", "2M")
    assert "--force" in msg and "discard" in msg
    info = cli_json(server, "volume", "resize", "shrunk", "2M", "--force")
    assert info["size"] == 2 * MiB
    info = cli_json(server, "volume", "resize", "shrunk", "6M")
    assert info["size"] == 6 * MiB
    async with await NbdClient.connect(uri) as c:
        assert c.size == 6 * MiB
        assert await c.read(0, 2 * MiB) == b"\xaa" * 2 * MiB
        # Neither the snapshot's data nor the head's own old blocks come back.
        assert await c.read(2 * MiB, 4 * MiB) == bytes(4 * MiB)
        status = await c.block_status(2 * MiB, 4 * MiB)
        assert all(e.flags & 2 for e in status["base:allocation"])  # reads as zeros
    async with await NbdClient.connect(server.uri("shrunk@big")) as s:  # the snapshot kept its size
        assert s.size == 4 * MiB
        assert await s.read(2 * MiB, 2 * MiB) == b"\xaa" * 2 * MiB
    snaps = server.api.get("/api/v1/volumes/shrunk/snapshots")["snapshots"]
    assert [(s["name"], s["size"]) for s in snaps] == [("big", 4 * MiB)]


async def test_unaligned_sizes_grow_reads_zero_tail(server: BlockvirtServer) -> None:
    size = 10 * 4096 + 512
    uri = server.create_volume("odd", size)
    async with await NbdClient.connect(uri) as c:
        await c.write(0, b"\x11" * size)
        await c.flush()
    server.api.post("/api/v1/volumes/odd/snapshots", {"name": "s"})
    cli_json(server, "volume", "resize", "odd", str(10 * 4096 + 1024))  # grow inside the last block
    async with await NbdClient.connect(uri) as c:
        assert await c.read(size - 512, 1024) == b"\x11" * 512 + bytes(512)
        await c.write(size, b"\x22" * 512)
        await c.flush()
    cli_json(server, "volume", "resize", "odd", "1M")
    async with await NbdClient.connect(uri) as c:
        assert await c.read(0, size) == b"\x11" * size
        assert await c.read(size, 512) == b"\x22" * 512
        assert await c.read(size + 512, MiB - size - 512) == bytes(MiB - size - 512)


async def test_shrink_refusals(server: BlockvirtServer) -> None:
    uri = server.create_volume("shr", 4 * MiB)
    msg = cli_fails(server, "volume", "resize", "shr", "2M")
    assert "--force" in msg and "no data" in msg  # nothing written: still needs --force
    async with await NbdClient.connect(uri) as c:
        await c.write(3 * MiB, b"x" * 4096)
        msg = cli_fails(server, "volume", "resize", "shr", "2M", "--force")
        assert "connected" in msg
        await c.flush()
    msg = cli_fails(server, "volume", "resize", "shr", "2M")
    assert "4096 bytes" in msg
    for bad in ("0", "1000", "17T", "lots"):
        r = server.cli("volume", "resize", "shr", bad)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr and r.stderr.strip()
    assert "no volume" in cli_fails(server, "volume", "resize", "ghost", "1M")
    assert server.api.get("/api/v1/volumes/shr")["size"] == 4 * MiB  # untouched by all that
    info = cli_json(server, "volume", "resize", "shr", "2M", "--force")
    assert info["size"] == 2 * MiB
    same = cli_json(server, "volume", "resize", "shr", "2M")
    assert same["size"] == 2 * MiB and same["resized_from"] == 2 * MiB


async def test_thick_grow_and_restart(tmp_path: Path) -> None:
    with BlockvirtServer(tmp_path / "data") as s:
        uri = s.create_volume("thick", 2 * MiB, thick=True)
        async with await NbdClient.connect(uri) as c:
            await c.write(0, b"t" * 2 * MiB)
            await c.flush()
        before = s.api.get("/api/v1/volumes/thick")["allocated"]
        info = cli_json(s, "volume", "resize", "thick", "6M")
        assert info["allocated"] >= before + 4 * MiB  # preallocated, still thick
        assert info["thick"] is True
    with BlockvirtServer(tmp_path / "data") as s:  # the new size survives a restart
        async with await NbdClient.connect(s.uri("thick")) as c:
            assert c.size == 6 * MiB
            assert await c.read(0, 2 * MiB) == b"t" * 2 * MiB
            assert await c.read(2 * MiB, 4 * MiB) == bytes(4 * MiB)
        assert s.cli("check", "--data-dir", str(s.data_dir)).returncode == 0


@pytest.mark.parametrize("thick", [False, True], ids=["thin", "thick"])
async def test_snapshot_delete_after_a_grow_keeps_the_grown_data(tmp_path: Path, thick: bool) -> None:
    """s1 (2 MiB) < s2 (grown to 6 MiB, data past s1's end) < head: deleting s1 lays s2 over
    s1's layer (a commit), which must first grow that layer. Then a restart reads the same."""
    old, new = 2 * MiB, 6 * MiB
    low, high = os.urandom(old), os.urandom(64 * KiB)  # s2 holds less than s1: a commit
    with BlockvirtServer(tmp_path / "data") as s:
        uri = s.create_volume("g", old, thick=thick)
        async with await NbdClient.connect(uri) as c:
            await c.write(0, low)
            await c.flush()
        s.api.post("/api/v1/volumes/g/snapshots", {"name": "s1"})
        cli_json(s, "volume", "resize", "g", "6M")
        async with await NbdClient.connect(uri) as c:
            await c.write(4 * MiB, high)
            await c.flush()
        s.api.post("/api/v1/volumes/g/snapshots", {"name": "s2"})
        out = s.api.delete("/api/v1/volumes/g/snapshots/s1")
        assert out["job"], out
        job = s.api.get(f"/api/v1/jobs/{out['job']}")
        for _ in range(200):
            if job["state"] not in ("queued", "running"):
                break
            await asyncio.sleep(0.05)
            job = s.api.get(f"/api/v1/jobs/{out['job']}")
        assert job["kind"] == "commit" and job["state"] == "done", job
        want = low + bytes(4 * MiB - old) + high + bytes(new - 4 * MiB - len(high))
        for export in ("g", "g@s2"):
            async with await NbdClient.connect(s.uri(export)) as c:
                assert c.size == new and await c.read(0, new) == want, export
    with BlockvirtServer(tmp_path / "data") as s:
        for export in ("g", "g@s2"):
            async with await NbdClient.connect(s.uri(export)) as c:
                assert await c.read(0, new) == want, export
        assert s.cli("check", "--data-dir", str(s.data_dir)).returncode == 0
