"""Closing a layer while a commit is under way (a FLUSH passes the drain of a migration's
switchover, which retires the source layers): the commit ends normally and the files close
after it, never under its thread; a layer released and opened again meanwhile is shared,
not opened a second time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockvirt.storage.backends.cowfile.layer import Layer
from blockvirt.storage.backends.cowfile.layer_map import DATA, ZERO
from blockvirt.storage.backends.cowfile.registry import LayerRegistry
from blockvirt.storage.catalog import Catalog, LayerRecord
from blockvirt.storage.fileio import FileIO

MiB = 1 << 20


class HeldSync(FileIO):
    """Real files; an fdatasync waits (in its thread) until the test lets it go."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed: list[int] = []

    def fdatasync(self, fd: int) -> None:
        self.entered.set()
        assert self.release.wait(10), "the test never let the sync go"
        super().fdatasync(fd)

    def close(self, fd: int) -> None:
        self.closed.append(fd)
        super().close(fd)


@pytest.fixture
def io() -> Iterator[HeldSync]:
    io = HeldSync()
    yield io
    io.release.set()  # a failed test must not leave a thread waiting


async def _until(event: threading.Event) -> None:
    for _ in range(1000):
        if event.is_set():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the commit never reached its sync")


async def test_a_close_during_a_commit_waits_for_it(tmp_path: Path, io: HeldSync) -> None:
    lid, size = "5" * 32, 16 * MiB
    Layer.create(io, str(tmp_path), lid, size)
    layer = Layer.open(io, str(tmp_path), lid, size, writable=True)
    fds = {layer.fd, layer.map_fd}
    io.closed.clear()  # create's descriptors had these numbers before
    layer.map.set_data(0, 1)
    layer.map.set_zero(100, 1)
    commit = asyncio.create_task(layer.commit())
    await _until(io.entered)

    layer.close()  # the switchover retires it while the commit's thread syncs it
    assert layer.close_pending and not layer.closed
    assert not fds & set(io.closed), "a descriptor was closed under the commit's thread"

    io.release.set()
    await commit  # no error: it journals into files that are still its own
    assert layer.closed and not layer.close_pending
    assert fds <= set(io.closed)

    again = Layer.open(io, str(tmp_path), lid, size, writable=False)
    try:
        assert again.map.state(0) == DATA and again.map.state(100) == ZERO
    finally:
        again.close()


async def test_a_cancelled_flush_still_closes_when_its_commit_ends(tmp_path: Path, io: HeldSync) -> None:
    lid, size = "6" * 32, 16 * MiB
    Layer.create(io, str(tmp_path), lid, size)
    layer = Layer.open(io, str(tmp_path), lid, size, writable=True)
    layer.map.set_data(8, 1)
    flush = asyncio.create_task(layer.commit())
    await _until(io.entered)
    flush.cancel()  # the caller goes (a shutdown); the commit runs on
    with pytest.raises(asyncio.CancelledError):
        await flush
    layer.close()
    assert layer.close_pending
    io.release.set()
    for _ in range(1000):
        if layer.closed:
            break
        await asyncio.sleep(0.005)
    assert layer.closed


async def test_a_layer_opened_again_while_closing_is_shared(tmp_path: Path, io: HeldSync) -> None:
    catalog = Catalog(str(tmp_path / "data"))
    try:
        catalog.add_pool("p", str(tmp_path / "p"))
        rec = LayerRecord("7" * 32, "p", None, 16 * MiB, False, 0.0)
        with catalog.transaction() as t:
            t.add_layer(rec)
        Layer.create(io, catalog.layer_dir(rec), rec.id, rec.size)
        reg = LayerRegistry(catalog, io)
        first = reg.acquire(rec, writable=True)
        first.map.set_data(0, 1)
        commit = asyncio.create_task(first.commit())
        await _until(io.entered)

        reg.release(first)  # the last user goes while the commit syncs
        assert first.close_pending and reg.get(rec.id) is None
        second = reg.acquire(rec, writable=True)
        assert second is first and not first.close_pending, "the journal would have two writers"

        io.release.set()
        await commit
        assert not first.closed and reg.get(rec.id) is first
        reg.release(first)
        assert first.closed
    finally:
        io.release.set()
        catalog.close()
