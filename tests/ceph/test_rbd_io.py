"""The data path: librbd aio bridged to asyncio, and allocation reporting.

Every test here runs on both completion paths: librbd's C API with an eventfd (the default)
and python3-rbd's per-op callbacks (`--ceph-binding-callbacks`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import time

import pytest
import rbd

from blockvirt.storage.backends.rbd.cluster import CephConfig, CephConnection
from blockvirt.storage.backends.rbd.errors import RbdError
from blockvirt.storage.backends.rbd.image import AsyncImage
from blockvirt.storage.backends.rbd.pool import RbdPool
from blockvirt.storage.node import HOLE, ZERO
from tests.ceph.conftest import LoopLag, unique

pytestmark = pytest.mark.ceph

KiB, MiB = 1 << 10, 1 << 20
OBJ = 4 * MiB  # the default object size (order 22)
UNALLOCATED = HOLE | ZERO


@pytest.fixture(params=[True, False], ids=["eventfd", "callbacks"])
def ceph_config(ceph_config: CephConfig, request: pytest.FixtureRequest) -> CephConfig:
    return dataclasses.replace(ceph_config, native_aio=request.param)


async def test_the_path_asked_for_is_the_one_used(image: AsyncImage, conn: CephConnection) -> None:
    assert image.native is conn.config.native_aio
    snap_view = None
    await image.snapshot_create("s")
    try:
        snap_view = await AsyncImage.open(conn, image.name, snapshot="s")
        assert snap_view.native is conn.config.native_aio
    finally:
        if snap_view is not None:
            await snap_view.close()
        await image.snapshot_remove("s")


async def test_write_read_round_trips(image: AsyncImage) -> None:
    cases = [(0, os.urandom(4 * KiB)), (5 * MiB + 123, os.urandom(10_000)), (OBJ - 512, os.urandom(1 * KiB))]
    for offset, data in cases:
        await image.write(data, offset)
    for offset, data in cases:
        assert await image.read(offset, len(data)) == data
    # bytearray and memoryview are accepted too (the NBD server hands out either).
    await image.write(bytearray(b"b" * 512), 0)
    await image.write(memoryview(b"m" * 512), 512, fua=True)
    await image.flush()
    assert await image.read(0, 1024) == b"b" * 512 + b"m" * 512
    assert await image.read(60 * MiB, 4 * KiB) == bytes(4 * KiB)  # never written: zeros


async def test_fua_writes_are_visible_to_another_client(image: AsyncImage, conn: CephConnection) -> None:
    # No client cache, so a completed (FUA) write is on the OSDs: a second client instance
    # sees it at once.
    await image.write(b"durable!" * 512, 8 * MiB, fua=True)
    other = await CephConnection.open(conn.config)
    try:
        reader = await AsyncImage.open(other, image.name, read_only=True)
        assert await reader.read(8 * MiB, 4096) == b"durable!" * 512
        await reader.close()
    finally:
        await other.close()


async def test_ranges_beyond_the_end_are_refused(image: AsyncImage) -> None:
    # librbd would silently clip these.
    with pytest.raises(RbdError) as w:
        await image.write(b"x" * 4096, image.size - 1024)
    assert w.value.errno == errno.ENOSPC
    with pytest.raises(RbdError) as r:
        await image.read(image.size - 1024, 4096)
    assert r.value.errno == errno.EINVAL


async def test_queue_depth_bounds_ops_in_flight(pool: RbdPool) -> None:
    name = unique()
    await pool.create(name, 64 * MiB)
    img = await pool.open(name, queue_depth=4)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, img.inflight)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        data = os.urandom(64 * KiB)
        await asyncio.gather(*(img.write(data, i * 64 * KiB) for i in range(64)))
        got = await asyncio.gather(*(img.read(i * 64 * KiB, 64 * KiB) for i in range(64)))
    finally:
        watcher.cancel()
        await img.close()
        await pool.remove(name)
    assert all(g == data for g in got)
    assert 1 <= peak <= 4


async def test_write_zeroes_and_discard_give_space_back(image: AsyncImage) -> None:
    await image.write(os.urandom(3 * OBJ), 0)  # objects 0, 1, 2
    assert await image.allocation(0, 3 * OBJ) == [(3 * OBJ, 0)]
    assert await image.allocated_bytes() == 3 * OBJ

    await image.write_zeroes(0, OBJ)  # a whole object: freed
    await image.discard(OBJ, OBJ)  # likewise
    await image.write_zeroes(2 * OBJ + 4 * KiB, 4 * KiB)  # part of one: zeroed in place
    assert await image.read(0, 8 * KiB) == bytes(8 * KiB)
    assert await image.read(OBJ, 8 * KiB) == bytes(8 * KiB)
    assert await image.read(2 * OBJ + 4 * KiB, 4 * KiB) == bytes(4 * KiB)
    assert await image.allocation(0, 3 * OBJ) == [(2 * OBJ, UNALLOCATED), (OBJ, 0)]
    assert await image.allocated_bytes() == OBJ


async def test_small_discards_are_advisory(image: AsyncImage) -> None:
    # Below rbd_discard_granularity_bytes (64 KiB) librbd keeps the data: TRIM semantics.
    await image.write(b"k" * (128 * KiB), 0)
    await image.discard(4 * KiB, 4 * KiB)
    assert await image.read(4 * KiB, 4) == b"kkkk"
    await image.discard(64 * KiB, 64 * KiB)
    assert await image.read(64 * KiB, 4) == bytes(4)


async def test_allocation_reports_holes_and_data(image: AsyncImage) -> None:
    assert await image.allocation(0, image.size) == [(image.size, UNALLOCATED)]
    await image.write(b"d" * (64 * KiB), 10 * MiB)
    # Without snapshots an object's data is reported from its start to its highest written
    # byte (RADOS knows the object's size, not its sparseness): conservative, never short.
    assert await image.allocation(0, image.size) == [
        (2 * OBJ, UNALLOCATED),
        (2 * MiB + 64 * KiB, 0),
        (image.size - 10 * MiB - 64 * KiB, UNALLOCATED),
    ]
    # A window starting inside the data.
    assert await image.allocation(10 * MiB + 4 * KiB, 1 * MiB) == [
        (60 * KiB, 0),
        (1 * MiB - 60 * KiB, UNALLOCATED),
    ]


async def test_allocation_is_fast_enough_for_block_status(pool: RbdPool) -> None:
    # One diff_iterate per query. Objects the object map marks absent cost nothing; each
    # present object costs one OSD round trip. Bounds are generous (a shared 2-core box).
    name = unique()
    await pool.create(name, 1 << 30)
    img = await pool.open(name)
    try:
        t0 = time.monotonic()
        assert await img.allocation(0, img.size) == [(img.size, UNALLOCATED)]
        empty = time.monotonic() - t0
        await asyncio.gather(*(img.write(b"x" * 4096, i * OBJ) for i in range(64)))  # 64 objects
        t0 = time.monotonic()
        extents = await img.allocation(0, img.size)
        sparse = time.monotonic() - t0
        assert len(extents) == 128
    finally:
        await img.close()
        await pool.remove(name)
    print(f"allocation over 1 GiB: empty {empty * 1000:.1f} ms, 64 objects {sparse * 1000:.1f} ms")
    assert empty < 0.5 and sparse < 2


async def test_read_only_and_closed_images(image: AsyncImage, conn: CephConnection) -> None:
    ro = await AsyncImage.open(conn, image.name, read_only=True)
    with pytest.raises(RbdError) as e:
        await ro.write(b"x", 0)
    assert e.value.errno == errno.EROFS
    await ro.close()
    await ro.close()
    with pytest.raises(RbdError) as closed:
        await ro.read(0, 1)
    assert closed.value.errno == errno.ESHUTDOWN


async def test_resize_and_refresh(image: AsyncImage, conn: CephConnection) -> None:
    other = await AsyncImage.open(conn, image.name)
    try:
        await image.resize(128 * MiB)
        assert image.size == 128 * MiB
        assert other.size == 64 * MiB  # until it looks again
        assert await other.refresh_size() == 128 * MiB
        await other.write(b"tail", 128 * MiB - 4)
        assert await image.read(128 * MiB - 4, 4) == b"tail"
        with pytest.raises(RbdError):
            await image.resize(32 * MiB)  # shrinking must be asked for
        info = await image.stat()
        assert info["size"] == 128 * MiB and info["obj_size"] == OBJ
    finally:
        await other.close()


async def test_metadata(image: AsyncImage) -> None:
    assert await image.metadata_get("owner") is None
    await image.metadata_set("owner", "node-a")
    await image.metadata_set("qos", '{"iops": 100}')
    assert await image.metadata_get("owner") == "node-a"
    assert await image.metadata() == {"owner": "node-a", "qos": '{"iops": 100}'}
    await image.metadata_remove("owner")
    await image.metadata_remove("owner")  # already gone: fine
    assert await image.metadata() == {"qos": '{"iops": 100}'}


async def test_loop_stays_responsive_under_io(image: AsyncImage) -> None:
    data = os.urandom(64 * KiB)
    async with LoopLag() as lag:
        for _ in range(4):
            await asyncio.gather(*(image.write(data, i * 64 * KiB) for i in range(256)))
            await asyncio.gather(*(image.read(i * 64 * KiB, 64 * KiB) for i in range(256)))
    print(f"worst loop lag during 2048 x 64 KiB ops: {lag.worst * 1000:.1f} ms")
    assert lag.worst < 0.2


async def test_pool_figures(pool: RbdPool, image: AsyncImage) -> None:
    stats = await pool.stats()
    assert stats.images >= 1 and stats.provisioned_bytes >= image.size
    assert stats.quota.max_bytes == 0 and not stats.quota.full
    assert image.name in await pool.list()


async def test_allocation_without_an_object_map(pool: RbdPool) -> None:
    # Images made elsewhere may lack fast-diff: librbd then lists objects one by one, slower,
    # same answer.
    name = unique()
    await pool.create(name, 32 * MiB, features=rbd.RBD_FEATURE_LAYERING)
    img = await pool.open(name)
    try:
        await img.write(b"d" * 4096, OBJ)
        assert await img.allocation(0, 32 * MiB) == [
            (OBJ, UNALLOCATED),
            (4096, 0),
            (28 * MiB - 4096, UNALLOCATED),
        ]
    finally:
        await img.close()
        await pool.remove(name)
