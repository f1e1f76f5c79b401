"""`serve --loop` and `--busy-poll-us`: every choice serves the same bytes, and says which
loop it runs (uvloop comes with the `fast` extra, which the test setup installs)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

MiB = 1 << 20


@pytest.mark.parametrize(
    ("args", "logged"),
    [
        (("--loop", "uvloop"), "event loop: uvloop, adaptive polling off"),
        (("--busy-poll-us", "0"), "event loop: asyncio, adaptive polling off"),
        ((), "event loop: asyncio, adaptive polling 100 us"),
        (("--busy-poll-us", "2000"), "event loop: asyncio, adaptive polling 2000 us"),
    ],
)
async def test_each_loop_serves_pipelined_io(tmp_path: Path, args: tuple[str, ...], logged: str) -> None:
    with BlockvirtServer(tmp_path / "data", extra_args=args, log_level="info") as server:
        server.create_volume("v", 4 * MiB)
        blocks = {i: os.urandom(4096) for i in range(0, 1024, 7)}
        c = await NbdClient.connect(server.uri("v"))
        try:
            await asyncio.gather(*(c.write(i * 4096, data) for i, data in blocks.items()))
            await c.flush()
            got = await asyncio.gather(*(c.read(i * 4096, 4096) for i in blocks))
            assert got == list(blocks.values())
            assert await c.read(4096, 4096) == bytes(4096)  # never written
        finally:
            await c.close()
        assert logged in server.log_path.read_text()


def test_polling_with_uvloop_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockvirt",
            "serve",
            "--data-dir",
            str(tmp_path / "d"),
            "--loop",
            "uvloop",
            "--busy-poll-us",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r
    assert "--busy-poll-us needs --loop asyncio" in r.stderr
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
