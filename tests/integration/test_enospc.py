"""A full pool: writers get ENOSPC, readers and other pools keep working, and writing resumes
once space is freed. The small pool is a size-limited tmpfs (needs root to mount)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockvirt.client import NbdClient, NbdClientError
from blockvirt.nbd.constants import Errno
from blockvirt.testing import BlockvirtServer
from tests.needs import need_root

MiB = 1024 * 1024
pytestmark = pytest.mark.root


@pytest.fixture
def small_pool(tmp_path: Path) -> Iterator[Path]:
    need_root("mounting a tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


async def test_full_pool_gives_enospc_to_the_writer_only(
    blockvirt_server: BlockvirtServer, small_pool: Path
) -> None:
    server = blockvirt_server
    server.api.post("/api/v1/pools", {"name": "small", "path": str(small_pool)})
    pools = {p["name"]: p for p in server.api.get("/api/v1/pools")["pools"]}
    assert pools["small"]["capacity"] == 8 * MiB  # visible before it fills
    full_uri = server.create_volume("crowded", 64 * MiB, pool="small")
    other_uri = server.create_volume("elsewhere", 16 * MiB)
    chunk = b"\xab" * MiB
    async with await NbdClient.connect(full_uri) as full, await NbdClient.connect(other_uri) as other:
        written, error = await _fill(full, chunk)
        assert error is not None and error.errno == Errno.ENOSPC
        assert 0 < written < 8
        # Reads of what was written still work, and so does another pool.
        assert await full.read(0, MiB) == chunk
        await other.write(0, chunk)
        await other.flush()
        assert await other.read(0, MiB) == chunk
        # Give space back: writing resumes.
        await full.trim(0, written * MiB)
        await full.flush()
        await full.write(0, chunk)
        await full.flush()
        assert await full.read(0, MiB) == chunk


async def _fill(client: NbdClient, chunk: bytes) -> tuple[int, NbdClientError | None]:
    """Write (and flush) chunk after chunk until the server refuses one."""
    for i in range(client.size // len(chunk)):
        try:
            await client.write(i * len(chunk), chunk)
            await client.flush()
        except NbdClientError as e:
            return i, e
    return client.size // len(chunk), None
