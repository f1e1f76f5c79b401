"""Large reads answered from the page cache's pages (the default) or copied first
(`serve --no-zero-copy`) give the same bytes to real clients, across a snapshot chain, an
overwrite right after a read, and a shrink and a regrow of the volume."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

MiB = 1 << 20


async def _read_all(uri: str, size: int, chunk: int) -> bytes:
    c = await NbdClient.connect(uri)
    try:
        parts = await asyncio.gather(*(c.read(off, chunk) for off in range(0, size, chunk)))
    finally:
        await c.close()
    return b"".join(parts)


@pytest.mark.parametrize("args", [(), ("--no-zero-copy",)], ids=["zero-copy", "copied"])
async def test_large_reads_give_the_written_bytes(tmp_path: Path, args: tuple[str, ...]) -> None:
    size = 16 * MiB
    with BlockvirtServer(tmp_path / "data", extra_args=args) as server:
        uri = server.create_volume("v", size)
        expect = bytearray(size)
        first = os.urandom(8 * MiB)
        c = await NbdClient.connect(uri)
        try:
            await asyncio.gather(*(c.write(off, first[off : off + MiB]) for off in range(0, len(first), MiB)))
            await c.flush()
        finally:
            await c.close()
        expect[: len(first)] = first
        server.cli("snapshot", "create", "v", "s1", check=True)  # the data is now a layer below
        patch = os.urandom(256 * 1024 + 4096)
        c = await NbdClient.connect(uri)
        try:
            await c.write(MiB - 4096, patch)  # the head owns part of the first MiB and more
            expect[MiB - 4096 : MiB - 4096 + len(patch)] = patch
            assert await c.read(0, 2 * MiB) == expect[: 2 * MiB]
            again = os.urandom(MiB)
            await c.write(0, again)  # just read from the page cache: the next read sees this
            expect[:MiB] = again
            assert await c.read(0, 2 * MiB) == expect[: 2 * MiB]
        finally:
            await c.close()
        assert await _read_all(uri, size, MiB) == expect  # pipelined, holes and two layers
        assert await _read_all(server.uri("v@s1"), size, 4 * MiB) == first + bytes(size - len(first))

        out = tmp_path / "copy.img"
        subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=120)  # multi-conn, 256K
        assert out.read_bytes() == expect

        server.cli("volume", "resize", "v", "4M", "--force", check=True)
        server.cli("volume", "resize", "v", "16M", check=True)
        expect[4 * MiB :] = bytes(size - 4 * MiB)  # the shrink dropped it; the regrow is zeros
        assert await _read_all(uri, size, 2 * MiB) == expect
