"""`blockvirt check` against data directories a real server built and the test then damaged,
with plain file operations and sqlite3: every kind of damage the check claims to detect
exits 1 with a message naming it; leaks and torn tails exit 0 and `--repair` removes them,
leaving a directory the next check calls clean."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

KiB = 1024
MiB = 1024 * KiB
HEADER = 4096  # docs/cow-format.md: the map's header, then journal batches


@dataclass
class Built:
    data_dir: Path
    default: Path  # the default pool's directory
    extra: Path  # pool "extra"'s directory
    head: str  # volume vol: head layer, over snapshot s1's layer
    snap: str
    other_head: str  # volume other (pool extra): head layer, over snapshot o1's layer
    other_snap: str

    def file(self, layer: str, kind: str) -> Path:
        pool = self.extra if layer in (self.other_head, self.other_snap) else self.default
        return pool / f"{layer}.{kind}"


async def _write(uri: str, *writes: tuple[int, bytes]) -> None:
    async with await NbdClient.connect(uri) as c:
        for offset, data in writes:
            await c.write(offset, data)
        await c.flush()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Built]:
    """Built once; each test gets a fresh copy at the same place (the catalog holds the
    pools' absolute paths)."""
    base = tmp_path_factory.mktemp("check")
    work, keep = base / "work", base / "pristine"
    data_dir = work / "data"
    with BlockvirtServer(data_dir) as s:
        s.create_volume("vol", 4 * MiB)
        asyncio.run(_write(s.uri("vol"), (0, b"a" * 64 * KiB), (2 * MiB, b"b" * 64 * KiB)))
        s.api.post("/api/v1/volumes/vol/snapshots", {"name": "s1"})
        asyncio.run(_write(s.uri("vol"), (MiB, b"c" * 4 * KiB)))
        s.api.post("/api/v1/pools", {"name": "extra", "path": str(work / "extra")})
        s.create_volume("other", MiB, pool="extra")
        asyncio.run(_write(s.uri("other"), (0, b"d" * 8 * KiB)))
        s.api.post("/api/v1/volumes/other/snapshots", {"name": "o1"})
        asyncio.run(_write(s.uri("other"), (0, b"e" * 4 * KiB)))
    db = sqlite3.connect(data_dir / "catalog.sqlite")
    try:
        heads = dict(db.execute("SELECT name, head FROM volumes"))
        snaps = dict(db.execute("SELECT name, layer FROM snapshots"))
    finally:
        db.close()
    shutil.copytree(work, keep, symlinks=True)
    b = Built(
        data_dir, data_dir / "pools" / "default", work / "extra",
        heads["vol"], snaps["s1"], heads["other"], snaps["o1"],
    )  # fmt: skip
    return work, keep, b


@pytest.fixture
def built(pristine: tuple[Path, Path, Built]) -> Built:
    work, keep, b = pristine
    shutil.rmtree(work)
    shutil.copytree(keep, work, symlinks=True)
    return b


def check(b: Built, *extra: str) -> tuple[int, list[str]]:
    r = subprocess.run(
        [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(b.data_dir), *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout.splitlines()


def sql(b: Built, statement: str, *params: object) -> None:
    db = sqlite3.connect(b.data_dir / "catalog.sqlite")  # foreign keys off: the damage goes in
    try:
        db.execute(statement, params)
        db.commit()
    finally:
        db.close()


def batch(seq: int, entries: list[tuple[int, int, int]]) -> bytes:
    """One journal batch as docs/cow-format.md lays it out (big-endian)."""
    body = b"".join(struct.pack(">QHH", *e) for e in entries)
    head = struct.pack(">IIQI", 0x42564A54, len(entries), seq, 0)
    crc = zlib.crc32(body, zlib.crc32(head))
    return struct.pack(">IIQI", 0x42564A54, len(entries), seq, crc) + body


def test_a_built_directory_is_clean(built: Built) -> None:
    rc, out = check(built)
    assert rc == 0 and out[-1] == "clean", out
    assert out[0] == "checked 2 volume(s), 4 layer(s)"


def _truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _flip(path: Path, offset: int) -> None:
    """Invert one byte: a byte of a random layer id is 0xff one time in 256, so writing a
    fixed value there would sometimes change nothing."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0xFF]))


def _data_and_zero(b: Built) -> None:
    # Cluster 0 of the snapshot's layer: block 0 both DATA and ZERO.
    m = b.file(b.snap, "map")
    _truncate(m, HEADER)
    with open(m, "ab") as f:
        f.write(batch(0, [(0, 0x0001, 0x0001)]))


DAMAGE: dict[str, tuple[Callable[[Built], None], Callable[[Built], str]]] = {
    "missing data file": (
        lambda b: b.file(b.head, "data").unlink(),
        lambda b: f"layer {b.head}: data file missing",
    ),
    "missing map file": (
        lambda b: b.file(b.snap, "map").unlink(),
        lambda b: f"layer {b.snap}: map file missing",
    ),
    "map truncated inside its header": (
        lambda b: _truncate(b.file(b.snap, "map"), 20),
        lambda b: f"layer {b.snap}: file too short for a layer header",
    ),
    "bad magic": (
        lambda b: _patch(b.file(b.head, "map"), 0, b"NOTALAYR"),
        lambda b: f"layer {b.head}: not a blockvirt layer map (bad magic)",
    ),
    "header checksum": (
        lambda b: _flip(b.file(b.snap, "map"), 30),  # inside the layer id
        lambda b: f"layer {b.snap}: layer header checksum mismatch",
    ),
    "catalog row without files": (
        lambda b: sql(b, "INSERT INTO layers VALUES (?, 'default', NULL, 4096, 0, 0)", "f" * 32),
        lambda b: f"layer {'f' * 32}: data file missing",
    ),
    "volume head row missing": (
        lambda b: sql(b, "DELETE FROM layers WHERE id = ?", b.head),
        lambda b: f"volume vol: head layer {b.head} missing",
    ),
    "snapshot layer row missing": (
        lambda b: sql(b, "DELETE FROM layers WHERE id = ?", b.snap),
        lambda b: f"snapshot vol@s1: layer {b.snap} missing",
    ),
    "parent row missing": (
        lambda b: sql(b, "DELETE FROM layers WHERE id = ?", b.snap),
        lambda b: f"layer {b.head}: parent {b.snap} missing",
    ),
    "cycle": (
        lambda b: sql(b, "UPDATE layers SET parent = ? WHERE id = ?", b.head, b.snap),
        lambda b: f"layer {b.head}: chain has a cycle",
    ),
    "DATA and ZERO at once": (
        _data_and_zero,
        lambda b: f"layer {b.snap}: cluster 0 has blocks both DATA and ZERO",
    ),
    "missing pool directory": (
        lambda b: shutil.rmtree(b.extra),
        lambda b: f"pool extra: directory {b.extra} missing",
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_found_and_named(built: Built, kind: str) -> None:
    damage, message = DAMAGE[kind]
    damage(built)
    rc, out = check(built)
    assert rc == 1, out
    assert f"DAMAGE: {message(built)}" in out, out
    assert out[-1] == "damaged"
    # --repair does not hide damage it cannot fix.
    rc, out = check(built, "--repair")
    assert rc == 1 and f"DAMAGE: {message(built)}" in out, out


def test_orphan_files_are_leaks_and_repair_removes_them(built: Built) -> None:
    orphan = "0123456789abcdef0123456789abcdef"
    for kind in ("data", "map"):
        (built.default / f"{orphan}.{kind}").write_bytes(b"x")
    (built.default / "README").write_text("the operator's")
    rc, out = check(built)
    assert rc == 0 and out[-1] == "clean (with leaks)", out
    assert f"leak: pool default: file {orphan}.data belongs to no layer" in out
    assert "note: pool default: README is not blockvirt's (left alone)" in out
    rc, out = check(built, "--repair")
    assert rc == 0 and f"repaired: removed {orphan}.map from pool default" in out, out
    rc, out = check(built)
    assert rc == 0 and out[-1] == "clean", out
    assert not list(built.default.glob(f"{orphan}.*"))
    assert (built.default / "README").read_text() == "the operator's"


def test_unreferenced_layers_are_leaks_and_repair_removes_them(built: Built) -> None:
    sql(built, "DELETE FROM snapshots WHERE volume = 'other'")
    sql(built, "DELETE FROM volumes WHERE name = 'other'")
    rc, out = check(built)
    assert rc == 0, out
    for layer in (built.other_head, built.other_snap):
        assert f"leak: layer {layer} is referenced by nothing" in out
    rc, out = check(built, "--repair")
    assert rc == 0, out
    rc, out = check(built)
    assert rc == 0 and out[-1] == "clean", out
    assert not list(built.extra.iterdir())


def test_repair_ends_on_unreferenced_layers_that_point_at_each_other(built: Built) -> None:
    sql(built, "DELETE FROM snapshots WHERE volume = 'other'")
    sql(built, "DELETE FROM volumes WHERE name = 'other'")
    sql(built, "UPDATE layers SET parent = ? WHERE id = ?", built.other_head, built.other_snap)
    rc, out = check(built)
    assert rc == 1 and f"DAMAGE: layer {built.other_head}: chain has a cycle" in out, out
    rc, out = check(built, "--repair")  # a bounded run (the helper's timeout), not a loop
    for layer in (built.other_head, built.other_snap):
        assert f"repaired: removed unreferenced layer {layer}" in out, out
    rc, out = check(built)
    assert rc == 0 and out[-1] == "clean", out
    assert not list(built.extra.iterdir())


def test_torn_tail_is_noted_and_repair_cuts_it(built: Built) -> None:
    m = built.file(built.head, "map")
    good = m.stat().st_size
    with open(m, "ab") as f:
        f.write(batch(99, [(1, 1, 0)])[:-5])  # a batch cut short, as a crash mid-commit leaves
    rc, out = check(built)
    assert rc == 0, out
    assert f"note: layer {built.head}: torn journal tail after byte {good} (ignored)" in out
    rc, out = check(built, "--repair")
    assert rc == 0 and f"repaired: layer {built.head}: cut torn journal tail" in out, out
    rc, out = check(built)
    assert rc == 0 and out[-1] == "clean" and not any("torn" in line for line in out), out
    assert m.stat().st_size == good


def test_map_entries_past_the_size_are_noted(built: Built) -> None:
    # An interrupted shrink: the catalog's size is already the new one.
    sql(built, "UPDATE layers SET size = ? WHERE id = ?", MiB, built.snap)
    rc, out = check(built)
    assert rc == 0, out
    assert f"note: layer {built.snap}: 1 map entries past its size (ignored)" in out


def test_repaired_directory_serves_again(built: Built) -> None:
    """After --repair the server starts on it and the data is there."""
    orphan = "0123456789abcdef0123456789abcdef"
    (built.default / f"{orphan}.map").write_bytes(b"x")
    with open(built.file(built.head, "map"), "ab") as f:
        f.write(b"\x00" * 7)
    assert check(built, "--repair")[0] == 0
    assert check(built)[1][-1] == "clean"

    async def read() -> bytes:
        async with await NbdClient.connect(server.uri("vol")) as c:
            return await c.read(0, 4096) + await c.read(MiB, 4096) + await c.read(2 * MiB, 4096)

    with BlockvirtServer(built.data_dir) as server:
        assert asyncio.run(read()) == b"a" * 4096 + b"c" * 4096 + b"b" * 4096
