"""take_lock (storage/backends/rbd/ownership.py) against a real Ceph, two client instances
standing for two nodes: the lock of a holder presumed alive is never broken, whatever the
catalog says; a holder presumed dead is fenced (blocklisted) before the taker writes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.cephcluster import CephCluster
from tests.cluster.conftest import BINDINGS_ERROR, MiB, _pool
from tests.needs import missing

pytestmark = pytest.mark.ceph

if BINDINGS_ERROR is None:
    from blockvirt.storage.backends.rbd.cluster import CephConfig, CephConnection
    from blockvirt.storage.backends.rbd.errors import RbdError
    from blockvirt.storage.backends.rbd.ownership import HeldByLiveNode, take_lock
    from blockvirt.storage.backends.rbd.pool import RbdPool


@pytest.fixture
def lock_pool(ceph_cluster: CephCluster) -> Iterator[str]:
    if BINDINGS_ERROR is not None:
        missing(f"Ceph's Python bindings are missing: {BINDINGS_ERROR}")
    name = f"bvlk-{uuid.uuid4().hex[:8]}"
    _pool(ceph_cluster, name, create=True)
    yield name
    _pool(ceph_cluster, name, create=False)


@pytest.fixture
async def two_clients(ceph_cluster: CephCluster, lock_pool: str) -> AsyncIterator[tuple[CephConnection, ...]]:
    cfg = CephConfig(pool=lock_pool, conf_file=str(ceph_cluster.conf_path), osd_op_timeout=10)
    a, b = CephConnection(cfg), CephConnection(cfg)
    await a.connect()
    await b.connect()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_live_holder_is_never_broken_a_dead_one_is_fenced(
    two_clients: tuple[CephConnection, CephConnection], ceph_cluster: CephCluster
) -> None:
    a, b = two_clients
    await RbdPool(a).create("img", 4 * MiB)
    img_b = await RbdPool(b).open("img")
    img_a = await RbdPool(a).open("img")
    try:
        assert await take_lock(img_b, lambda _: None) == []  # B serves the volume
        await img_b.write(b"b" * 4096, 0)
        b_addr = b.client_address()

        # A's record says A (say: it claimed, froze, resumed), but B is alive: A refuses.
        with pytest.raises(HeldByLiveNode) as refused:
            await take_lock(img_a, lambda addr: ("node-b", True) if addr == b_addr else None)
        assert refused.value.node == "node-b"
        assert b_addr not in ceph_cluster.blocklist_ls()
        await img_b.write(b"B" * 4096, 0)  # B still writes
        with pytest.raises(RbdError) as erofs:
            await img_a.write(b"a" * 4096, 0)  # and A cannot (managed lock: EROFS)
        assert erofs.value.lock_lost and not erofs.value.fenced

        # B presumed dead: A breaks the lock, which blocklists B before A writes a byte.
        fenced = await take_lock(img_a, lambda addr: ("node-b", False) if addr == b_addr else None)
        assert fenced == [b_addr]
        assert b_addr in ceph_cluster.blocklist_ls()
        await img_a.write(b"A" * 4096, 0)
        with pytest.raises(RbdError) as lost:
            await img_b.write(b"x" * 4096, 0)
        assert lost.value.fenced
        assert await img_a.read(0, 4096) == b"A" * 4096

    finally:
        await img_a.close()
        await img_b.close()
