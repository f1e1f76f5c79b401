"""The cluster going away under I/O, a full cluster, a restarted monitor.

Each test puts the shared cluster back as it found it (OSD up, full ratios reset), so the
order of tests does not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest

from blockvirt.storage.backends.rbd.cluster import CephConfig, CephConnection
from blockvirt.storage.backends.rbd.errors import RbdError
from blockvirt.storage.backends.rbd.image import AsyncImage
from blockvirt.storage.backends.rbd.pool import RbdPool
from blockvirt.storage.node import StorageError
from tests.ceph.conftest import LoopLag, remove_image, unique
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph

KiB, MiB = 1 << 10, 1 << 20
OP_TIMEOUT = 3.0


@pytest.fixture
async def short_timeouts(ceph_config: CephConfig) -> AsyncIterator[CephConnection]:
    async with CephConnection(replace(ceph_config, osd_op_timeout=OP_TIMEOUT, mon_op_timeout=3)) as c:
        yield c


@contextlib.contextmanager
def osd_gone(ceph: CephCluster, how: str) -> Iterator[None]:
    if how == "stop":
        ceph.stop_osd()
    else:
        ceph.freeze_osd()  # alive to TCP, answers nothing: a hung node
    try:
        yield
    finally:
        if how == "stop":
            ceph.start_osd()
        else:
            ceph.thaw_osd()


@pytest.mark.parametrize("how", ["stop", "freeze"])
async def test_io_fails_within_the_op_timeout_when_the_osd_goes_away(
    how: str, short_timeouts: CephConnection, ceph_cluster: CephCluster
) -> None:
    pool = RbdPool(short_timeouts)
    name = unique()
    await pool.create(name, 64 * MiB)
    img = await pool.open(name)
    data = os.urandom(64 * KiB)
    try:
        await img.write(os.urandom(1 * MiB), 0)
        with osd_gone(ceph_cluster, how):
            async with LoopLag() as lag:
                t0 = time.monotonic()
                writes = [img.write(data, i * 64 * KiB) for i in range(16)]
                reads = [img.read(i * 64 * KiB, 64 * KiB) for i in range(16)]
                data_ops = asyncio.gather(*writes, *reads, return_exceptions=True)
                # A control call waits on one of the connection's own threads.
                snapshot = asyncio.gather(img.snapshot_create("x"), return_exceptions=True)
                # Meanwhile the loop and its default executor carry on.
                ticks = 0
                while not data_ops.done():
                    await asyncio.to_thread(time.sleep, 0.01)
                    ticks += 1
                data_results = await data_ops
                data_took = time.monotonic() - t0
                (snap_result,) = await snapshot
                snap_took = time.monotonic() - t0
        print(
            f"{how}: {len(data_results)} data ops failed after {data_took:.2f} s, the snapshot "
            f"after {snap_took:.2f} s (op timeout {OP_TIMEOUT:g} s); worst loop lag "
            f"{lag.worst * 1000:.1f} ms"
        )
        for r in data_results:
            assert isinstance(r, StorageError) and r.errno == errno.EIO and "timed out" in str(r), r
        assert isinstance(snap_result, StorageError) and snap_result.errno == errno.EIO
        assert OP_TIMEOUT - 0.5 < data_took < OP_TIMEOUT + 2
        assert snap_took < 2 * OP_TIMEOUT + 3  # a snapshot makes two round trips
        assert lag.worst < 0.2 and ticks > 10

        # The same image and client carry on once the OSD is back.
        await img.write(b"back" * 1024, 0)
        assert await img.read(0, 4096) == b"back" * 1024
    finally:
        await img.close()
        await remove_image(pool, name)


@contextlib.contextmanager
def full_cluster(ceph: CephCluster) -> Iterator[None]:
    ceph.set_osd_full(True)
    try:
        yield
    finally:
        ceph.set_osd_full(False)


async def write_until(image: AsyncImage, offsets: Iterator[int], *, fails: bool) -> float:
    """Write 4 KiB at each offset in turn (0.25 s apart) until a write fails (fails=True) or
    succeeds; return how long that write took. Gives up after 20 s."""
    deadline = time.monotonic() + 20
    for offset in offsets:
        t0 = time.monotonic()
        try:
            await image.write(b"w" * 4096, offset)
            if not fails:
                return time.monotonic() - t0
        except RbdError as e:
            if e.errno != errno.ENOSPC:
                raise
            if fails:
                return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise AssertionError(f"no {'failing' if fails else 'successful'} write within 20 s")
        await asyncio.sleep(0.25)
    raise AssertionError("ran out of offsets")


async def test_full_cluster_fails_writes_with_enospc(
    image: AsyncImage, pool: RbdPool, ceph_cluster: CephCluster
) -> None:
    await image.write(b"x" * (4 * MiB), 0)
    with full_cluster(ceph_cluster):
        # A write that needs new space fails with ENOSPC at once (the ioctx has full-try set)
        # instead of waiting for the op timeout. Each try goes to a new object (overwrites
        # may still succeed), and tries go on until this client has the newest OSD map.
        took = await write_until(image, iter(range(8 * MiB, 64 * MiB, 4 * MiB)), fails=True)
        assert took < 1
        assert (await pool.quota()).full
        await image.discard(0, 4 * MiB)  # freeing space still works
        assert await image.read(0, 4) == bytes(4)
    await write_until(image, iter([60 * MiB] * 100), fails=False)


async def test_connection_survives_a_monitor_restart(conn: CephConnection, ceph_cluster: CephCluster) -> None:
    pool = RbdPool(conn)
    name = unique()
    await pool.create(name, 4 * MiB)
    ceph_cluster.restart_mon()
    # The client hunts for the mon again; mon commands and image ops carry on.
    assert name in await pool.list()
    assert conn.config.pool in await conn.mon_command("osd pool ls")
    await pool.remove(name)
