"""OmapDocument: atomic versioned updates, conflicts, paging, watch/notify."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator

import pytest

from blockvirt.storage.backends.rbd.cluster import CephConnection
from blockvirt.storage.backends.rbd.errors import EBLOCKLISTED
from blockvirt.storage.backends.rbd.omap import OmapDocument, VersionConflict
from tests.ceph.conftest import unique
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph


@pytest.fixture
async def other(conn: CephConnection) -> AsyncIterator[CephConnection]:
    """A second client instance: another node, as far as Ceph can tell."""
    async with CephConnection(conn.config) as c:
        yield c


async def test_update_get_items(conn: CephConnection) -> None:
    doc = OmapDocument(conn, unique("doc"))
    assert await doc.version() == 0
    assert (await doc.read()).items == {}
    assert await doc.get("vol/a") is None
    v1 = await doc.update(set={"vol/a": {"size": 1 << 30, "qos": None}, "vol/b": [1, 2], "cfg": "x"})
    assert v1 == 1
    assert await doc.get("vol/a") == {"size": 1 << 30, "qos": None}
    assert await doc.items("vol/") == {"vol/a": {"size": 1 << 30, "qos": None}, "vol/b": [1, 2]}
    v2 = await doc.update(set={"vol/b": [3]}, remove=["cfg", "never-there"])
    assert v2 == 2
    snap = await doc.read()
    assert snap.version == 2 and snap.items == {"vol/a": {"size": 1 << 30, "qos": None}, "vol/b": [3]}
    with pytest.raises(ValueError, match="reserved"):
        await doc.update(set={"@version": 9})
    await doc.delete(expect_version=2)
    assert await doc.version() == 0


async def test_compare_and_set_conflicts_are_detected(conn: CephConnection, other: CephConnection) -> None:
    oid = unique("doc")
    a, b = OmapDocument(conn, oid), OmapDocument(other, oid)
    assert await a.update(set={"owner": "a"}, expect_version=0) == 1
    with pytest.raises(VersionConflict) as created:
        await b.update(set={"owner": "b"}, expect_version=0)  # both thought it new
    assert created.value.actual == 1

    seen = await b.read()
    assert await a.update(set={"owner": "a2"}, expect_version=seen.version) == 2
    with pytest.raises(VersionConflict) as stale:
        await b.update(set={"owner": "b"}, expect_version=seen.version)
    assert (stale.value.expected, stale.value.actual) == (1, 2)
    assert await b.get("owner") == "a2"  # the loser changed nothing

    with pytest.raises(VersionConflict):
        await b.delete(expect_version=1)
    assert await a.version() == 2
    await a.delete()


async def test_concurrent_read_modify_write_loses_nothing(
    conn: CephConnection, other: CephConnection
) -> None:
    oid = unique("counter")
    docs = [OmapDocument(conn, oid), OmapDocument(other, oid)]

    async def increment(doc: OmapDocument) -> None:
        while True:
            snap = await doc.read()
            try:
                await doc.update(set={"n": snap.items.get("n", 0) + 1}, expect_version=snap.version)
                return
            except VersionConflict:
                await asyncio.sleep(0)

    await asyncio.gather(*(increment(docs[i % 2]) for i in range(30)))
    assert await docs[0].get("n") == 30
    assert await docs[0].version() == 30
    await docs[0].delete()


async def test_reads_page_through_large_documents(conn: CephConnection) -> None:
    doc = OmapDocument(conn, unique("doc"), page_size=3)
    await doc.update(set={f"k{i:02d}": i for i in range(10)} | {"other": True})
    assert await doc.items("k") == {f"k{i:02d}": i for i in range(10)}
    assert len((await doc.read()).items) == 11
    await doc.delete()


async def test_watch_hears_notify_from_another_client(conn: CephConnection, other: CephConnection) -> None:
    oid = unique("doc")
    watcher, writer = OmapDocument(conn, oid), OmapDocument(other, oid)
    heard: asyncio.Queue[str] = asyncio.Queue()
    errors: list[int] = []
    watch = await watcher.watch(heard.put_nowait, errors.append)
    try:
        await writer.update(set={"vol/a": 1})
        assert await writer.notify("vol/a") == 1  # one watcher acknowledged
        assert await asyncio.wait_for(heard.get(), 5) == "vol/a"
        assert await watcher.get("vol/a") == 1
    finally:
        await watch.close()
    assert errors == [] and watch.closed
    assert await writer.notify("nobody") == 0
    await writer.delete()


async def test_reconnect_closes_watches_and_says_so(conn: CephConnection) -> None:
    doc = OmapDocument(conn, unique("doc"))
    errors: list[int] = []
    watch = await doc.watch(lambda _m: None, errors.append)
    await conn.reconnect()
    assert watch.closed and errors == [errno.ESHUTDOWN]
    await doc.delete()  # the document works through the new client instance


async def test_a_watch_lost_in_ceph_says_so(conn: CephConnection, ceph_cluster: CephCluster) -> None:
    # Fenced (blocklisted), the watcher's client loses its watch: librados calls the error
    # callback from its own thread. python3-rados passes it two arguments; a callback of one
    # raised TypeError there, so the loss went unseen and the watch was never made again.
    doc = OmapDocument(conn, unique("doc"))
    errors: list[int] = []
    lost = asyncio.Event()

    def on_error(code: int) -> None:
        errors.append(code)
        lost.set()

    watch = await doc.watch(lambda _m: None, on_error)
    try:
        ceph_cluster.ceph("osd", "blocklist", "add", conn.client_address())
        await asyncio.wait_for(lost.wait(), 30)
        print("watch lost:", errors)
        assert errors[0] in (errno.ENOTCONN, EBLOCKLISTED), errors
        if errors[0] == EBLOCKLISTED:
            assert conn.fenced  # noticed through the watch alone
    finally:
        await watch.close()
        ceph_cluster.blocklist_clear()
    await conn.reconnect()
    await doc.delete()
