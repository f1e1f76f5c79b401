"""Fixtures for the tests against a real one-node Ceph (the session's `ceph_cluster`).

Without python3-rados/python3-rbd only test_bindings.py is collected: it skips, or fails
under BLOCKVIRT_REQUIRE_INTEROP=1, and says why.
"""

from __future__ import annotations

import asyncio
import errno
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from blockvirt.testing import BlockvirtServer
from tests.ceph.rbdpool import SERVE_ARGS, CephView, attach
from tests.cephcluster import CephCluster

try:
    import rados  # noqa: F401
    import rbd  # noqa: F401

    BINDINGS_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on the machine
    BINDINGS_ERROR = str(e)

collect_ignore_glob = [] if BINDINGS_ERROR is None else ["test_rbd_*.py", "test_omap*.py"]

if BINDINGS_ERROR is None:
    from blockvirt.storage.backends.rbd.cluster import CephConfig, CephConnection
    from blockvirt.storage.backends.rbd.image import AsyncImage
    from blockvirt.storage.backends.rbd.pool import RbdPool
    from blockvirt.storage.node import StorageError

MiB = 1 << 20
POOL = "bvtest"


@pytest.fixture(scope="session")
def ceph_pool(ceph_cluster: CephCluster) -> str:
    """An RBD pool shared by the session's tests (they use unique image names); it goes
    with the cluster."""
    ceph_cluster.create_pool(POOL)
    return POOL


@pytest.fixture(scope="module")
def module_ceph_pool(ceph_cluster: CephCluster) -> Iterator[str]:
    """A Ceph pool of this module's own (blockvirt's catalog in it is the module's alone);
    deleted, with whatever it holds, after the module."""
    name = unique("bvmod")
    ceph_cluster.create_pool(name)
    try:
        yield name
    finally:
        ceph_cluster.delete_pool(name)


@pytest.fixture(scope="module")
def rbd_server(
    tmp_path_factory: pytest.TempPathFactory, ceph_cluster: CephCluster, module_ceph_pool: str
) -> Iterator[BlockvirtServer]:
    """A `blockvirt serve` with the module's Ceph pool attached as pool "rbd" (and its file
    pool "default"); tests use unique volume names."""
    with BlockvirtServer(
        tmp_path_factory.mktemp("rbd") / "data", extra_args=SERVE_ARGS, log_level="info"
    ) as server:
        attach(server, ceph_cluster, module_ceph_pool)
        yield server


@pytest.fixture(scope="module")
def ceph_view(ceph_cluster: CephCluster, module_ceph_pool: str) -> CephView:
    return CephView(ceph_cluster, module_ceph_pool)


@pytest.fixture
def ceph_config(ceph_cluster: CephCluster, ceph_pool: str) -> CephConfig:
    return CephConfig(
        pool=ceph_pool,
        conf_file=str(ceph_cluster.conf_path),
        connect_timeout=5,
        mon_op_timeout=5,
        osd_op_timeout=10,
    )


@pytest.fixture
async def conn(ceph_config: CephConfig) -> AsyncIterator[CephConnection]:
    async with CephConnection(ceph_config) as c:
        yield c


@pytest.fixture
def pool(conn: CephConnection) -> RbdPool:
    return RbdPool(conn)


def unique(prefix: str = "img") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def image(pool: RbdPool) -> AsyncIterator[AsyncImage]:
    """A fresh, empty 64 MiB image, opened; closed and removed afterwards."""
    name = unique()
    await pool.create(name, 64 * MiB)
    img = await pool.open(name)
    try:
        yield img
    finally:
        await img.close()
        await remove_image(pool, name)


async def remove_image(pool: RbdPool, name: str) -> None:
    """Remove an image even if a failed test left snapshots on it."""
    try:
        await pool.remove(name)
    except StorageError as e:
        if e.errno != errno.ENOTEMPTY:
            raise
        img = await pool.open(name)
        for snap in await img.snapshots():
            if await img.snapshot_is_protected(snap.name):
                await img.snapshot_unprotect(snap.name)
            await img.snapshot_remove(snap.name)
        await img.close()
        await pool.remove(name)


class LoopLag:
    """Measure how late the loop runs a 10 ms timer while something else goes on."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.period)
            self.worst = max(self.worst, time.monotonic() - t - self.period)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
