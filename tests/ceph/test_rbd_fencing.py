"""Fencing: node B breaks node A's image lock, which blocklists A's client instance.

A's next I/O fails at once with a fencing errno, never silently lands; A recovers only by
reconnecting as a new instance. This is the mechanism failover between blockvirt nodes
will rely on (safety from the blocklist, not from timeouts).
"""

from __future__ import annotations

import errno
import time

import pytest

from blockvirt.storage.backends.rbd.cluster import CephConnection
from blockvirt.storage.backends.rbd.errors import RbdError
from blockvirt.storage.backends.rbd.image import AsyncImage
from blockvirt.storage.backends.rbd.pool import RbdPool
from tests.ceph.conftest import remove_image, unique
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph

MiB = 1 << 20


async def test_lock_break_fences_the_old_owner(
    conn: CephConnection, pool: RbdPool, ceph_cluster: CephCluster
) -> None:
    name = unique("fenced")
    await pool.create(name, 64 * MiB)
    node_b = await CephConnection.open(conn.config)
    a = await pool.open(name)
    b: AsyncImage | None = None
    try:
        await a.lock_acquire()
        await a.write(b"A" * 4096, 0)
        assert await a.is_lock_owner()
        a_addr = conn.client_address()

        b = await AsyncImage.open(node_b, name)
        with pytest.raises(RbdError) as refused:  # a managed lock is not handed over
            await b.write(b"B" * 4096, 0)
        assert refused.value.errno == errno.EROFS and refused.value.lock_lost
        assert not refused.value.fenced
        assert [o.owner for o in await b.lock_owners()] == [a_addr]

        t0 = time.monotonic()
        broken = await b.lock_break()
        await b.lock_acquire()
        await b.write(b"B" * 4096, 0)
        takeover = time.monotonic() - t0
        assert [o.owner for o in broken] == [a_addr]
        assert a_addr in ceph_cluster.blocklist_ls()

        t0 = time.monotonic()
        with pytest.raises(RbdError) as fenced:
            await a.write(b"Z" * 4096, 0)
        late = time.monotonic() - t0
        assert fenced.value.errno == errno.ESHUTDOWN and fenced.value.fenced
        assert conn.fenced
        assert await b.read(0, 4096) == b"B" * 4096  # A's late write did not land
        print(
            f"takeover (break + acquire + write) {takeover * 1000:.0f} ms, fenced write failed in "
            f"{late * 1000:.1f} ms"
        )
        assert takeover < 5 and late < 2

        # A comes back as a new client instance; its old image handle is closed.
        await conn.reconnect()
        assert not conn.fenced and conn.client_address() != a_addr
        assert a.closed
        with pytest.raises(RbdError) as stale:
            await a.read(0, 1)
        assert stale.value.errno == errno.ESHUTDOWN
        a = await pool.open(name)
        assert await a.read(0, 4096) == b"B" * 4096
        with pytest.raises(RbdError) as still_bs:
            await a.write(b"A" * 4096, 0)
        assert still_bs.value.errno == errno.EROFS

        # A planned handoff back: B releases, A takes the lock without breaking anything.
        await b.lock_release()
        await a.lock_acquire()
        await a.write(b"a" * 4096, 0)
        assert await a.read(0, 4096) == b"a" * 4096
    finally:
        await a.close()
        if b is not None:
            await b.close()
        await node_b.close()
        await remove_image(pool, name)
        ceph_cluster.blocklist_clear()


async def test_cooperative_lock_moves_to_the_writer(conn: CephConnection, pool: RbdPool) -> None:
    # Without lock_acquire, librbd hands the lock to whoever writes (the default mode):
    # fine for one node, never what two serving nodes should do (lock ping-pong).
    name = unique()
    await pool.create(name, 8 * MiB)
    node_b = await CephConnection.open(conn.config)
    a = await pool.open(name)
    b = await AsyncImage.open(node_b, name)
    try:
        await a.write(b"a" * 512, 0)
        assert await a.is_lock_owner()
        await b.write(b"b" * 512, 0)
        assert await b.is_lock_owner() and not await a.is_lock_owner()
        assert await a.read(0, 512) == b"b" * 512
    finally:
        await a.close()
        await b.close()
        await node_b.close()
        await remove_image(pool, name)
