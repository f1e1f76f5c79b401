"""Pool directories as the filesystem sees them: symlinks must not let two pools share (or
nest in) one directory, a restart must never sweep away a pool's layers because another pool
reaches the same directory, and a refused `pool create` leaves no directory behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
from pathlib import Path

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

MiB = 1024 * 1024


def cli_fails(server: BlockvirtServer, *args: str) -> str:
    r = server.cli(*args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr.strip()


def check(data_dir: Path) -> tuple[int, dict[str, object]]:
    r = BlockvirtServer(data_dir).cli("check", "--data-dir", str(data_dir), "--json")
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


async def write(uri: str, data: bytes) -> None:
    async with await NbdClient.connect(uri) as c:
        await c.write(0, data)
        await c.flush()


async def read(uri: str, n: int) -> bytes:
    async with await NbdClient.connect(uri) as c:
        return await c.read(0, n)


def layer_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.suffix in (".data", ".map")}


def test_pool_create_sees_through_symlinks(tmp_path: Path) -> None:
    t = tmp_path / "t"
    t.mkdir()
    with BlockvirtServer(tmp_path / "data") as server:
        assert server.cli("pool", "create", "P1", "--path", str(t / "P1")).returncode == 0
        # The reproduction: a second pool through a symlink to the first one.
        (t / "lnk").symlink_to(t / "P1")
        assert "overlaps pool 'P1'" in cli_fails(server, "pool", "create", "P2", "--path", str(t / "lnk"))
        # Nested through a symlink, either way round.
        (t / "up").symlink_to(t)
        assert "overlaps pool 'P1'" in cli_fails(server, "pool", "create", "P3", "--path", str(t / "up"))
        assert "overlaps pool 'P1'" in cli_fails(
            server, "pool", "create", "P4", "--path", str(t / "lnk" / "sub")
        )
        # A pool whose own path is a symlink: a new pool at the real directory overlaps it.
        (t / "real5").mkdir()
        (t / "lnk5").symlink_to(t / "real5")
        assert server.cli("pool", "create", "P5", "--path", str(t / "lnk5")).returncode == 0
        assert "overlaps pool 'P5'" in cli_fails(server, "pool", "create", "P6", "--path", str(t / "real5"))
        # The data directory (and the default pool in it) through a symlink.
        (t / "dd").symlink_to(server.data_dir)
        assert "data directory" in cli_fails(server, "pool", "create", "P7", "--path", str(t / "dd"))
        (t / "dp").symlink_to(server.data_dir / "pools" / "default")
        assert "overlaps pool 'default'" in cli_fails(server, "pool", "create", "P8", "--path", str(t / "dp"))
        pools = {p["name"] for p in server.api.get("/api/v1/pools")["pools"]}
        assert pools == {"default", "P1", "P5"}
        assert not (t / "P1" / "sub").exists()


def test_two_pools_on_one_directory_keep_their_data_across_a_restart(tmp_path: Path) -> None:
    """The state a release without the checks above let an operator build: pools P1 and P2,
    P2's path a symlink to P1's directory, volumes with data in both."""
    t = tmp_path / "t"
    data_dir = tmp_path / "data"
    with BlockvirtServer(data_dir) as server:
        for pool in ("P1", "P2"):
            server.api.post("/api/v1/pools", {"name": pool, "path": str(t / pool)})
            server.create_volume(f"v{pool}", 4 * MiB, pool=pool)
            asyncio.run(write(server.uri(f"v{pool}"), pool.encode() * 1000))
            server.api.post(f"/api/v1/volumes/v{pool}/snapshots", {"name": "s"})
            asyncio.run(write(server.uri(f"v{pool}"), pool.lower().encode() * 100))
    for f in (t / "P2").iterdir():
        shutil.move(str(f), t / "P1")
    (t / "P2").rmdir()
    (t / "P2").symlink_to(t / "P1")
    files = layer_files(t / "P1")
    assert len(files) == 8  # two layers per volume, two files per layer

    rc, report = check(data_dir)
    assert rc == 1, report
    assert any("P1" in d and "P2" in d and "share" in d for d in report["damage"]), report  # type: ignore[union-attr]
    rc, report = check_repair(data_dir)
    assert layer_files(t / "P1") == files, report

    with BlockvirtServer(data_dir, log_level="info") as server:
        assert layer_files(t / "P1") == files  # the start's sweep removed nothing
        assert "shares its directory" in server.log()
        for pool in ("P1", "P2"):
            want = bytearray(4096)
            want[:2000] = pool.encode() * 1000  # in the snapshot's layer
            want[:200] = pool.lower().encode() * 100  # in the head
            assert asyncio.run(read(server.uri(f"v{pool}"), 4096)) == want
        # A move between them would first clear the target of stale copies: the source's files.
        assert "share one directory" in cli_fails(server, "migrate", "vP1", "--pool", "P2")
    assert layer_files(t / "P1") == files


def check_repair(data_dir: Path) -> tuple[int, dict[str, object]]:
    r = BlockvirtServer(data_dir).cli("check", "--data-dir", str(data_dir), "--repair", "--json")
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


def test_start_removes_stale_copies_only_where_the_real_ones_are_whole(tmp_path: Path) -> None:
    """Copies of a layer in a pool the catalog does not place it in (what a crashed migration
    leaves) still go at start; but not when the layer's own files are gone: then the copy
    may be all that is left of it."""
    data_dir = tmp_path / "data"
    with BlockvirtServer(data_dir) as server:
        server.api.post("/api/v1/pools", {"name": "P1", "path": str(tmp_path / "P1")})
        server.api.post("/api/v1/pools", {"name": "P2", "path": str(tmp_path / "P2")})
        for v in ("a", "b"):
            server.create_volume(v, 4 * MiB, pool="P1")
            asyncio.run(write(server.uri(v), v.encode() * 4096))
    for f in layer_files(tmp_path / "P1"):
        shutil.copy(tmp_path / "P1" / f, tmp_path / "P2" / f)
    db = sqlite3.connect(data_dir / "catalog.sqlite")
    heads = dict(db.execute("SELECT name, head FROM volumes").fetchall())
    db.close()
    by_volume = {v: {f"{heads[v]}.data", f"{heads[v]}.map"} for v in ("a", "b")}
    layer_b = heads["b"]
    # b's real files are lost; its copies in P2 are the only data left of it.
    for f in by_volume["b"]:
        os.unlink(tmp_path / "P1" / f)
    unknown = "0123456789abcdef0123456789abcdef.data"  # a crash during a create
    (tmp_path / "P2" / unknown).write_bytes(b"")
    with BlockvirtServer(data_dir, log_level="info") as server:
        assert layer_files(tmp_path / "P2") == by_volume["b"]
        assert layer_files(tmp_path / "P1") == by_volume["a"]
        assert f"not removing {layer_b}.data" in server.log()
        assert asyncio.run(read(server.uri("a"), 4096)) == b"a" * 4096


def test_failed_pool_create_leaves_no_directory(tmp_path: Path) -> None:
    with BlockvirtServer(tmp_path / "data") as server:
        assert server.cli("pool", "create", "P1", "--path", str(tmp_path / "P1")).returncode == 0
        # The catalog refuses the name after the directories were made: all of them go...
        msg = cli_fails(server, "pool", "create", "P1", "--path", str(tmp_path / "new" / "deeper"))
        assert "already exists" in msg
        assert not (tmp_path / "new").exists()
        # ...but never a directory the call did not make.
        (tmp_path / "mine").mkdir()
        assert "already exists" in cli_fails(server, "pool", "create", "P1", "--path", str(tmp_path / "mine"))
        assert (tmp_path / "mine").is_dir()
        (tmp_path / "keep").mkdir()
        msg = cli_fails(server, "pool", "create", "P1", "--path", str(tmp_path / "keep" / "made"))
        assert "already exists" in msg
        assert (tmp_path / "keep").is_dir() and not (tmp_path / "keep" / "made").exists()
