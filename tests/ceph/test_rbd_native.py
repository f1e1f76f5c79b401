"""The eventfd completion path (native.py): finding the handle, errors, cancelled waiters, no leaks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import time
from collections.abc import AsyncIterator, Callable

import pytest

from blockvirt.storage.backends.rbd import native
from blockvirt.storage.backends.rbd.cluster import CephConfig, CephConnection, Session
from blockvirt.storage.backends.rbd.errors import RbdError, rbd_error
from blockvirt.storage.backends.rbd.image import AsyncImage
from blockvirt.storage.backends.rbd.omap import OmapDocument
from blockvirt.storage.backends.rbd.pool import RbdPool
from tests.ceph.conftest import remove_image, unique

pytestmark = pytest.mark.ceph

KiB, MiB = 1 << 10, 1 << 20


def _eventfds() -> int:
    """Open eventfds: each image on this path has one; librados's own sockets and pipes are
    not counted, as it opens and closes them on its own schedule."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    return n


async def test_the_handle_is_found_and_checked(image: AsyncImage, conn: CephConnection) -> None:
    raw, ioctx = image._image, conn.session.ioctx
    handle = native.image_handle(raw, ioctx, image.name)
    assert handle is not None
    # Anything that does not match the image is refused rather than trusted.
    assert native.image_handle(raw, ioctx, image.name + "-other") is None
    assert native.image_handle(raw, object(), image.name) is None
    assert native.image_handle(object(), ioctx, image.name) is None


async def test_librbd_errors_reach_the_waiter(binding_conn: CephConnection) -> None:
    # AsyncImage checks ranges itself; straight through NativeIo (on an image opened for the
    # binding's callbacks, so it has no eventfd of its own), librbd's own refusal of a write
    # past the end arrives as a failed completion.
    name = unique()
    await RbdPool(binding_conn).create(name, 16 * MiB)
    img = await AsyncImage.open(binding_conn, name)
    try:
        handle = native.image_handle(img._image, binding_conn.session.ioctx, name)
        assert handle is not None
        seen: list[int] = []
        nio = native.NativeIo(handle, asyncio.get_running_loop(), rbd_error, name)
        try:
            with pytest.raises(RbdError) as e:
                await nio.write(1 << 40, b"x" * 4096, seen.append)
            assert e.value.errno == errno.EINVAL and seen == [-errno.EINVAL]
            await nio.write(8192, b"y" * 4096, seen.append)
            assert bytes(await nio.read(8192, 4096, seen.append)) == b"y" * 4096
            assert seen == [-errno.EINVAL, 0, 4096] and nio.inflight == 0  # a read returns its length
        finally:
            nio.close()
    finally:
        await img.close()
        await remove_image(RbdPool(binding_conn), name)


async def test_a_cancelled_waiter_leaves_the_op_to_finish(pool: RbdPool) -> None:
    name = unique()
    await pool.create(name, 64 * MiB)
    img = await pool.open(name, queue_depth=8)
    try:
        assert img.native
        data = os.urandom(256 * KiB)
        writes = [asyncio.create_task(img.write(data, i * 256 * KiB)) for i in range(32)]
        await asyncio.sleep(0)
        for t in writes[::2]:
            t.cancel()
        await asyncio.gather(*writes, return_exceptions=True)
        # Cancelled or not, every op ran to its end and gave its slot back.
        async with asyncio.timeout(30):
            while img.inflight:
                await asyncio.sleep(0.01)
        got = await asyncio.gather(*(img.read(i * 256 * KiB, 256 * KiB) for i in range(1, 32, 2)))
        assert all(g == data for g in got)
    finally:
        await img.close()
        await remove_image(pool, name)


async def test_images_leave_no_descriptors_behind(pool: RbdPool) -> None:
    name = unique()
    await pool.create(name, 16 * MiB)
    try:
        first = await pool.open(name)
        await first.write(b"a" * 4096, 0)
        await first.close()  # the first open starts librbd's threads and sockets
        before = _eventfds()
        for _ in range(10):
            img = await pool.open(name)
            assert img.native and _eventfds() == before + 1
            await img.write(b"b" * 4096, 0)
            assert await img.read(0, 4096) == b"b" * 4096
            await img.close()
        assert _eventfds() == before
    finally:
        await remove_image(pool, name)


@pytest.fixture
async def binding_conn(ceph_config: CephConfig) -> AsyncIterator[CephConnection]:
    async with CephConnection(dataclasses.replace(ceph_config, native_aio=False)) as c:
        yield c


async def test_the_binding_path_when_asked(binding_conn: CephConnection) -> None:
    # CephConfig.native_aio=False (serve --ceph-binding-callbacks) keeps python3-rbd's way.
    name = unique()
    await RbdPool(binding_conn).create(name, 16 * MiB)
    try:
        img = await AsyncImage.open(binding_conn, name)
        try:
            assert not img.native
            await img.write(b"c" * 8192, 4096)
            assert await img.read(4096, 8192) == b"c" * 8192
        finally:
            await img.close()
    finally:
        await remove_image(RbdPool(binding_conn), name)


class _CountingPolls:
    """librbd's functions as NativeIo calls them, counting rbd_poll_io_events once `armed`."""

    def __init__(self, held: object) -> None:
        self._held = held
        self.armed = False
        self.polls = 0

    def __getattr__(self, name: str) -> object:
        fn = getattr(self._held, name)
        if name != "rbd_poll_io_events":
            return fn

        def counted(*args: object) -> object:
            if self.armed:
                self.polls += 1
            return fn(*args)

        return counted


class _SlowClose:
    """Wraps a handle whose close() is held 0.5 s on its thread, noting the order of events.
    If the client was shut down first, the real close is skipped: it would abort the test run
    as it once aborted a fenced node (Objecter: FAILED ceph_assert(initialized))."""

    def __init__(self, close: Callable[[], None], order: list[str]) -> None:
        self._close, self._order = close, order

    def close(self) -> None:
        time.sleep(0.5)
        if "client shut down" not in self._order:
            self._close()
            self._order.append("closed")


def _noting_teardown(session: Session, order: list[str]) -> None:
    real = session.teardown

    def teardown() -> None:
        order.append("client shut down")
        real()

    session.teardown = teardown  # type: ignore[method-assign]


async def test_a_client_is_never_shut_down_under_a_close_under_way(ceph_config: CephConfig) -> None:
    # A fenced node closes its volumes' images on tasks of their own (which its stop may
    # cancel) while it replaces its client; a lost watch is closed the same way. The old
    # client's teardown must wait for every such close still in librbd.
    name = unique()
    conn = CephConnection(ceph_config)
    await conn.connect()
    try:
        pool = RbdPool(conn)
        await pool.create(name, 16 * MiB)
        img = await pool.open(name)
        await img.write(b"d" * 4096, 0)
        watch = await OmapDocument(conn, f"doc-{name}").watch(lambda _: None)
        order: list[str] = []
        img._close_blocking = _SlowClose(img._close_blocking, order).close  # type: ignore[method-assign]
        watch._handle = _SlowClose(watch._handle.close, order)
        _noting_teardown(conn.session, order)
        closing = [asyncio.ensure_future(img.close()), asyncio.ensure_future(watch.close())]
        await asyncio.sleep(0.1)  # both closes are on their threads now
        for task in closing:
            task.cancel()  # their callers give up: the closes go on
        await conn.close()
        assert order == ["closed", "closed", "client shut down"], order
    finally:
        await conn.close()
        async with CephConnection(ceph_config) as c:
            await remove_image(RbdPool(c), name)
            with contextlib.suppress(Exception):
                await c.run(lambda: c.session.ioctx.remove_object(f"doc-{name}"))


async def test_the_loop_never_polls_an_image_while_it_closes(pool: RbdPool) -> None:
    # The eventfd may be readable with nothing to collect: librbd signals after queueing a
    # completion, so a poll can take the event before its signal lands. A signal that late,
    # seen while another thread closes the image, had the loop poll a dying image (a
    # use-after-free that once killed a fenced node). Here the late signal is made by hand
    # while the close is held open on its thread.
    name = unique()
    await pool.create(name, 16 * MiB)
    try:
        img = await pool.open(name)
        assert img.native and img._native is not None
        await img.write(b"d" * 4096, 0)
        nio = img._native
        counting = _CountingPolls(nio._held)
        nio._held = counting  # type: ignore[assignment]
        real_close = img._close_blocking

        def close_late() -> None:
            counting.armed = True
            os.eventfd_write(nio._fd, 1)  # a completion's signal, late
            time.sleep(0.3)  # the loop is free meanwhile: a watched eventfd would be serviced
            real_close()

        img._close_blocking = close_late  # type: ignore[method-assign]
        await img.close()
        assert counting.polls == 0, "the loop polled the image while it was being closed"
    finally:
        await remove_image(pool, name)
