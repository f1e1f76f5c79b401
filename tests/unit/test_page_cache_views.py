"""Zero-copy reads: views of the page cache (FileIO.view_nowait) and the chain's
read_view_nowait, on real files."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockvirt.storage.backends.cowfile.chain import ChainNode
from blockvirt.storage.backends.cowfile.layer import Layer
from blockvirt.storage.faults import FaultRule, FaultyFileIO
from blockvirt.storage.fileio import MAPS, REAL, FileIO
from blockvirt.storage.node import SPARSE_READ_MIN

MiB = 1 << 20


@pytest.fixture
def cached(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """A 4 MiB file of random bytes, all of it in the page cache."""
    data = os.urandom(4 * MiB)
    fd = REAL.open(str(tmp_path / "f.data"), write=True, create=True)
    try:
        REAL.pwrite(fd, data, 0)
        os.fsync(fd)
        yield fd, data
    finally:
        REAL.close(fd)


def test_a_cached_range_is_a_view_of_the_file_not_a_copy(cached: tuple[int, bytes]) -> None:
    fd, data = cached
    view = REAL.view_nowait(fd, MiB + 512, MiB)
    assert view is not None and isinstance(view.obj, mmap.mmap) and view.readonly
    assert bytes(view) == data[MiB + 512 : 2 * MiB + 512]
    # Borrowed: it shows the file as it is when read (why callers send it at once).
    REAL.pwrite(fd, b"\xee" * 4096, MiB + 512)
    assert bytes(view[:4096]) == b"\xee" * 4096


def test_no_view_of_uncached_pages_or_past_the_end(cached: tuple[int, bytes]) -> None:
    fd, _ = cached
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages (fsynced): dropped
    assert REAL.view_nowait(fd, 0, MiB) is None  # reading it would wait for the disk
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: just what is read
    os.pread(fd, MiB, 0)
    assert REAL.view_nowait(fd, 0, MiB) is not None
    assert REAL.view_nowait(fd, 0, MiB + 4096) is None  # one page still uncached
    assert REAL.view_nowait(fd, 4 * MiB - 4096, 8192) is None  # past the end of the file


def test_truncate_and_close_drop_the_mapping_and_views_held_stay_readable(cached: tuple[int, bytes]) -> None:
    fd, data = cached
    held = REAL.view_nowait(fd, 3 * MiB, MiB)
    assert held is not None and fd in MAPS.by_fd
    REAL.truncate(fd, 2 * MiB)  # a mapping past the new end would fault where it is read
    assert fd not in MAPS.by_fd
    assert REAL.view_nowait(fd, 3 * MiB, MiB) is None
    REAL.truncate(fd, 4 * MiB)
    REAL.pwrite(fd, b"\x5a" * MiB, 3 * MiB)
    again = REAL.view_nowait(fd, 3 * MiB, MiB)  # mapped anew, over the grown file
    assert again is not None and bytes(again) == b"\x5a" * MiB
    assert bytes(REAL.view_nowait(fd, 0, MiB) or b"") == data[:MiB]
    del held, again


def test_a_device_with_a_read_fault_rule_gives_no_views(tmp_path: Path) -> None:
    io = FaultyFileIO()
    fd = io.open(str(tmp_path / "f.data"), write=True, create=True)
    try:
        io.pwrite(fd, b"\1" * MiB, 0)
        assert io.view_nowait(fd, 0, MiB) is not None
        io.set_rule(str(tmp_path), FaultRule(error=5, ops=frozenset({"read"})))
        assert io.view_nowait(fd, 0, MiB) is None  # reads must meet the injected fault
    finally:
        io.close(fd)


def _layer(io: FileIO, pool: Path, lid: str, size: int, *, writable: bool) -> Layer:
    if not (pool / f"{lid}.data").exists():
        Layer.create(io, str(pool), lid, size)
    return Layer.open(io, str(pool), lid, size, writable=writable)


async def test_chain_views_match_copies_across_layers_and_holes(tmp_path: Path) -> None:
    size = 8 * MiB
    base_id, head_id = "1" * 32, "2" * 32
    base = _layer(REAL, tmp_path, base_id, size, writable=True)
    node = ChainNode([base], size, writable=True)
    await node.write(0, os.urandom(2 * MiB))
    await node.flush()
    await node.close()
    head = _layer(REAL, tmp_path, head_id, size, writable=True)
    base = _layer(REAL, tmp_path, base_id, size, writable=False)
    node = ChainNode([head, base], size, writable=True)
    try:
        await node.write(MiB, os.urandom(256 * 1024))  # the head owns [1 MiB, 1.25 MiB)
        await node.write(MiB + 512 * 1024, os.urandom(4096))  # and a block too small to view
        length = 4 * MiB  # [2 MiB, 4 MiB) is a hole
        views = node.read_view_nowait(0, length)
        copies = node.read_sparse_nowait(0, length)
        assert views is not None and copies is not None
        assert [(o, n, d is None) for o, n, d in views] == [(o, n, d is None) for o, n, d in copies]
        assert [bytes(d) if d is not None else None for _, _, d in views] == [
            bytes(d) if d is not None else None for _, _, d in copies
        ]
        kinds = [type(d.obj) for _, _, d in views if isinstance(d, memoryview)]
        assert kinds.count(mmap.mmap) >= 3  # base, head, base again: page-cache views
        assert any(d is not None and not isinstance(d, memoryview) for _, _, d in views)  # the 4 KiB run
        assert any(d is None for _, _, d in views)
        small = node.read_view_nowait(0, SPARSE_READ_MIN - 4096)  # below it: a plain read
        assert small is not None and len(small) == 1 and not isinstance(small[0][2], memoryview)
    finally:
        await node.close()
