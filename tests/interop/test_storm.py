"""A connection storm: 300 initiators on one volume at once, each a full GO handshake and a read.

They connect from 300 loopback addresses (127.0.1.1 ...), as 300 hosts would: one address
may hold at most 512 connections by default (serve --max-connections-per-address)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

from .conftest import KiB, MiB, volume_info

pytestmark = pytest.mark.interop

N = 300
BLOCK = 4 * KiB


def _host(i: int) -> str:
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


async def test_300_concurrent_connections(blockvirt_server: BlockvirtServer) -> None:
    uri = blockvirt_server.create_volume("storm", N * BLOCK + MiB)
    data = os.urandom(N * BLOCK)
    setup = await NbdClient.connect(uri)
    try:
        await setup.write(0, data)
        await setup.flush()
    finally:
        await setup.close()

    clients: list[NbdClient] = []
    start = time.monotonic()
    try:
        # All 300 handshakes in flight together, then every one holds its session open.
        results = await asyncio.wait_for(
            asyncio.gather(
                *(NbdClient.connect(uri, local_host=_host(i)) for i in range(N)), return_exceptions=True
            ),
            60,
        )
        clients = [c for c in results if isinstance(c, NbdClient)]
        errors = [r for r in results if not isinstance(r, NbdClient)]
        assert not errors, f"{len(errors)} of {N} connects failed, e.g. {errors[0]!r}"
        assert volume_info(blockvirt_server, "storm")["connections"] == N

        reads = await asyncio.wait_for(
            asyncio.gather(*(c.read(i * BLOCK, BLOCK) for i, c in enumerate(clients))), 60
        )
        bad = [i for i, got in enumerate(reads) if got != data[i * BLOCK : (i + 1) * BLOCK]]
        assert not bad, f"{len(bad)} reads returned wrong data, e.g. client {bad[0]}"
    finally:
        await asyncio.wait_for(asyncio.gather(*(c.close() for c in clients), return_exceptions=True), 60)
    assert time.monotonic() - start < 60

    # The server is still serving, and it let go of every session.
    after = await NbdClient.connect(uri)
    try:
        await after.write(N * BLOCK, b"x" * BLOCK, fua=True)
        assert await after.read(0, N * BLOCK) == data
        assert await after.read(N * BLOCK, BLOCK) == b"x" * BLOCK
    finally:
        await after.close()
    deadline = time.monotonic() + 10
    while (n := volume_info(blockvirt_server, "storm")["connections"]) != 0:
        assert time.monotonic() < deadline, f"{n} sessions still open after all clients closed"
        await asyncio.sleep(0.1)
