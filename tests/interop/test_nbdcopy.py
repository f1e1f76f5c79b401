"""nbdcopy (libnbd): file -> volume and volume -> file, single and multi-connection."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import MiB, need, run, volume_info

pytestmark = pytest.mark.interop

SIZE = 48 * MiB


def _source(path: Path) -> str:
    """A sparse file: random data, a run of explicit zeros, holes; returns its sha256."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, length in ((0, 3 * MiB), (7 * MiB + 512, 1 * MiB), (20 * MiB, 8 * MiB), (SIZE - MiB, MiB)):
            f.seek(off)
            f.write(os.urandom(length))
        f.seek(12 * MiB)
        f.write(bytes(2 * MiB))  # allocated zeros
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same(a: Path, b: Path) -> None:
    assert a.stat().st_size == b.stat().st_size
    r = run(["cmp", a, b], check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("connections", [1, 4])
def test_nbdcopy_file_to_volume_and_back(
    blockvirt_server: BlockvirtServer, tmp_path: Path, connections: int
) -> None:
    need("nbdcopy", "cmp")
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    digest = _source(src)
    uri = blockvirt_server.create_volume("copy", SIZE)
    # Dirty the whole volume first: nbdcopy must also zero the source's holes and zero runs.
    dirty = tmp_path / "dirty.img"
    dirty.write_bytes(b"\x5a" * SIZE)
    run(["nbdcopy", dirty, uri], timeout=120)
    dirty.unlink()
    conn = f"--connections={connections}"
    run(["nbdcopy", conn, "--requests=16", "--flush", src, uri], timeout=120)
    run(["nbdcopy", conn, uri, back], timeout=120)
    _same(src, back)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    # Thin volume: about what the source holds, not the full size.
    assert volume_info(blockvirt_server, "copy")["allocated"] >= 12 * MiB


def test_nbdcopy_volume_to_volume(blockvirt_server: BlockvirtServer, tmp_path: Path) -> None:
    need("nbdcopy", "cmp")
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    _source(src)
    a = blockvirt_server.create_volume("a", SIZE)
    b = blockvirt_server.create_volume("b", SIZE)
    run(["nbdcopy", "--connections=4", src, a], timeout=120)
    run(["nbdcopy", "--connections=4", a, b], timeout=120)
    run(["nbdcopy", b, back], timeout=120)
    _same(src, back)
