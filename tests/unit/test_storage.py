"""Storage: RawFileNode on real temporary files, FlushCoalescer, catalog validation."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from blockvirt.storage.catalog import (
    MAX_VOLUME_SIZE,
    Catalog,
    CatalogError,
    LayerRecord,
    PoolRecord,
    VolumeRow,
    parse_size,
    validate_name,
    validate_size,
)
from blockvirt.storage.drivers.memory import MemoryNode
from blockvirt.storage.drivers.raw import SPARSE_READ_MIN, RawFileNode
from blockvirt.storage.executor import FlushCoalescer
from blockvirt.storage.node import HOLE, ZERO, FilterNode, StorageError
from tests.needs import missing

MiB = 1 << 20
BLK = 4096


def _supports_punch(tmp: Path) -> bool:
    path = tmp / "probe"
    RawFileNode.create(str(path), MiB)
    node = RawFileNode(str(path))
    try:
        os.pwrite(node.fd, b"x" * MiB, 0)
        os.fsync(node.fd)
        before = node.allocated_bytes()
        node._zero(0, MiB, punch=True)
        return node.allocated_bytes() < before
    finally:
        os.close(node.fd)
        path.unlink()


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[Callable[..., RawFileNode]]:
    nodes: list[RawFileNode] = []

    def make(
        size: int = 4 * MiB, *, thick: bool = False, name: str = "vol.raw", read_only: bool = False
    ) -> RawFileNode:
        path = tmp_path / name
        if not path.exists():
            RawFileNode.create(str(path), size, thick=thick)
        node = RawFileNode(str(path), thick=thick, read_only=read_only)
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        await n.close()


@pytest.fixture(scope="module")
def punch_ok(tmp_path_factory: pytest.TempPathFactory) -> None:
    if not _supports_punch(tmp_path_factory.mktemp("punch")):
        missing("the temporary file system cannot punch holes")


# ---------------------------------------------------------------- creation


def test_thin_create_is_sparse(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node(64 * MiB)
    st = os.fstat(node.fd)
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 < MiB
    assert node.size == 64 * MiB
    assert node.allocated_bytes() == st.st_blocks * 512


def test_thick_create_is_allocated(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node(16 * MiB, thick=True)
    assert os.fstat(node.fd).st_blocks * 512 >= 16 * MiB
    assert node.allocated_bytes() >= 16 * MiB


def test_create_refuses_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "x.raw"
    RawFileNode.create(str(path), MiB)
    with pytest.raises(FileExistsError):
        RawFileNode.create(str(path), MiB)


async def test_thick_reads_zero_and_is_not_reported_as_hole(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node(MiB, thick=True)
    # Asked before any read: cached pages would make the unwritten extents look like data.
    extents = await node.block_status(0, MiB)
    assert sum(ln for ln, _ in extents) == MiB
    for _, flags in extents:
        assert not flags & HOLE  # allocated: a write there cannot hit ENOSPC
    assert await node.read(0, MiB) == bytes(MiB)


# ---------------------------------------------------------------- read and write


async def test_write_read_nowait_and_read(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node()
    data = os.urandom(3 * BLK + 17)
    await node.write(5000, data)
    assert bytes(await node.read(5000, len(data))) == data
    fast = node.read_nowait(5000, len(data))
    assert fast is None or bytes(fast) == data  # None is allowed: not in the page cache
    await node.write(MiB, data, fua=True)
    assert bytes(await node.read(MiB, len(data))) == data


async def test_large_write_goes_through_the_pool(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node()
    data = os.urandom(MiB + 3)
    assert not node.write_nowait(0, data)  # too large for the inline path
    await node.write(0, data)
    assert bytes(await node.read(0, len(data))) == data


async def test_small_write_nowait(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node()
    assert node.write_nowait(4096, b"inline")
    assert bytes(await node.read(4096, 6)) == b"inline"


async def test_read_only_node(make_node: Callable[..., RawFileNode]) -> None:
    make_node(MiB)
    ro = make_node(MiB, read_only=True)
    assert not ro.capabilities().writable
    with pytest.raises(StorageError):
        await ro.write(0, b"x" * 8192, fua=True)
    await ro.flush()  # nothing to do, no error


async def test_thin_write_allocates(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node()
    before = node.allocated_bytes()
    await node.write(0, b"\x01" * MiB)
    await node.flush()
    assert node.allocated_bytes() >= before + MiB


# ---------------------------------------------------------------- trim and zero


@pytest.mark.usefixtures("punch_ok")
async def test_trim_punches_holes(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node()
    await node.write(0, b"\xaa" * (2 * MiB))
    await node.flush()
    allocated = node.allocated_bytes()
    assert allocated >= 2 * MiB
    await node.trim(0, MiB)
    assert node.allocated_bytes() <= allocated - MiB
    assert bytes(await node.read(0, MiB)) == bytes(MiB)
    assert bytes(await node.read(MiB, MiB)) == b"\xaa" * MiB
    extents = await node.block_status(0, 2 * MiB)
    assert extents[0] == (MiB, HOLE | ZERO)
    assert extents[1] == (MiB, 0)


@pytest.mark.usefixtures("punch_ok")
async def test_zero_may_trim_gives_space_back(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node()
    await node.write(0, b"\xbb" * MiB)
    await node.flush()
    allocated = node.allocated_bytes()
    await node.zero(0, MiB, may_trim=True)
    assert node.allocated_bytes() <= allocated - MiB
    assert bytes(await node.read(0, MiB)) == bytes(MiB)


async def test_zero_without_trim_keeps_allocation(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node()
    await node.write(0, b"\xcc" * MiB)
    await node.flush()
    allocated = node.allocated_bytes()
    await node.zero(0, MiB, may_trim=False, fua=True)
    assert node.allocated_bytes() >= allocated
    assert bytes(await node.read(0, MiB)) == bytes(MiB)


async def test_unaligned_zero_reads_back_zero(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node()
    await node.write(0, b"\xdd" * (3 * BLK))
    await node.zero(100, 2 * BLK + 5, may_trim=True)
    got = bytes(await node.read(0, 3 * BLK))
    assert got == b"\xdd" * 100 + bytes(2 * BLK + 5) + b"\xdd" * (3 * BLK - 100 - 2 * BLK - 5)


async def test_thick_trim_keeps_allocation_but_zeroes(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node(2 * MiB, thick=True)
    await node.write(0, b"\xee" * MiB)
    await node.flush()
    await node.trim(0, MiB)
    assert node.allocated_bytes() >= 2 * MiB
    assert bytes(await node.read(0, MiB)) == bytes(MiB)


# ---------------------------------------------------------------- block status and sparse reads


async def test_block_status_of_empty_thin_volume(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node(4 * MiB)
    assert await node.block_status(0, 4 * MiB) == [(4 * MiB, HOLE | ZERO)]
    assert await node.block_status(MiB, 100) == [(100, HOLE | ZERO)]


async def test_block_status_data_and_holes(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node(4 * MiB)
    await node.write(MiB, b"x" * MiB)
    await node.flush()
    ext = await node.block_status(0, 4 * MiB)
    assert ext == [(MiB, HOLE | ZERO), (MiB, 0), (2 * MiB, HOLE | ZERO)]
    # starting inside the data, clipped at the end of the request
    assert await node.block_status(MiB + 512, 1024) == [(1024, 0)]


@pytest.mark.parametrize("nowait", [False, True])
async def test_read_sparse_segments(make_node: Callable[..., RawFileNode], nowait: bool) -> None:
    node = make_node(4 * MiB)
    payload = os.urandom(64 * 1024)
    await node.write(512 * 1024, payload)
    await node.flush()
    length = MiB
    assert length >= SPARSE_READ_MIN
    if nowait:
        segs = node.read_sparse_nowait(0, length)
        if segs is None:  # just written: cached, unless the inline path (RWF_NOWAIT) is missing
            missing("data not available without blocking: no preadv2(RWF_NOWAIT) inline read path")
    else:
        segs = await node.read_sparse(0, length)
    pos = 0
    content = b""
    for off, ln, data in segs:
        assert off == pos and ln > 0
        assert data is None or len(data) == ln
        content += bytes(ln) if data is None else bytes(data)
        pos += ln
    assert pos == length
    assert content == bytes(512 * 1024) + payload + bytes(length - 512 * 1024 - len(payload))
    assert any(d is None for _, _, d in segs)  # the holes are sent as holes
    assert segs[0][2] is None


async def test_small_read_sparse_is_one_data_segment(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node()
    segs = await node.read_sparse(0, 4096)
    assert len(segs) == 1 and segs[0][:2] == (0, 4096) and bytes(segs[0][2] or b"") == bytes(4096)


async def test_cache_and_close(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node()
    await node.write(0, b"keep")
    await node.cache(0, MiB)
    assert bytes(await node.read(0, 4)) == b"keep"
    await node.close()
    assert node.fd == -1
    await node.close()  # idempotent


async def test_data_survives_reopen(make_node: Callable[..., RawFileNode], tmp_path: Path) -> None:
    node = make_node(MiB)
    await node.write(100, b"persist")
    await node.flush()
    await node.close()
    again = RawFileNode(str(tmp_path / "vol.raw"))
    try:
        assert bytes(await again.read(100, 7)) == b"persist"
        assert again.size == MiB
    finally:
        await again.close()


# ---------------------------------------------------------------- FilterNode


async def test_filter_node_forwards_everything() -> None:
    child = MemoryNode(64 * 1024)
    f = FilterNode(child)
    assert f.size == child.size and f.capabilities() == child.capabilities()
    await f.write(0, b"abc")
    assert bytes(await f.read(0, 3)) == b"abc"
    assert f.read_nowait(0, 3) == b"abc"
    await f.zero(0, 1, may_trim=False)
    await f.trim(4096, 4096)
    await f.flush()
    await f.cache(0, 10)
    assert child.flushes == 1
    assert bytes(child.data[:3]) == b"\0bc"
    assert await f.block_status(0, 8192) == await child.block_status(0, 8192)
    assert await f.read_sparse(0, 3) == [(0, 3, b"\0bc")]
    assert await f.fast_zero_possible()
    assert f.allocated_bytes() == child.allocated_bytes()


# ---------------------------------------------------------------- FlushCoalescer


class FakeSync:
    """An async flush function whose every call waits for its own gate."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = asyncio.Event()
        self.gates: list[asyncio.Event] = []
        self.fail_next = False

    async def __call__(self) -> None:
        self.calls += 1
        gate = asyncio.Event()
        self.gates.append(gate)
        self.started.set()
        await gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise OSError(5, "sync failed")

    async def wait_calls(self, n: int) -> None:
        while self.calls < n:
            self.started.clear()
            await self.started.wait()


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_flush_alone_runs_one_sync() -> None:
    sync = FakeSync()
    fc = FlushCoalescer(sync)
    t = asyncio.ensure_future(fc.flush())
    await sync.wait_calls(1)
    assert not t.done()
    sync.gates[0].set()
    await t
    assert sync.calls == 1
    # a later flush needs its own sync
    t = asyncio.ensure_future(fc.flush())
    await sync.wait_calls(2)
    sync.gates[1].set()
    await t
    assert sync.calls == 2


async def test_concurrent_callers_share_a_sync() -> None:
    sync = FakeSync()
    fc = FlushCoalescer(sync)
    first = asyncio.ensure_future(fc.flush())
    await sync.wait_calls(1)
    waiters = [asyncio.ensure_future(fc.flush()) for _ in range(10)]
    await _settle()
    sync.gates[0].set()
    await first
    await sync.wait_calls(2)
    await _settle()
    assert sync.calls == 2  # all ten share the second sync
    assert not any(w.done() for w in waiters)
    sync.gates[1].set()
    await asyncio.gather(*waiters)
    assert sync.calls == 2


async def test_callers_of_one_loop_turn_share_the_first_sync() -> None:
    # Several FUA writes from one receive: each wrote before it asked for a flush, so the
    # sync that starts after them covers them all.
    sync = FakeSync()
    fc = FlushCoalescer(sync)
    callers = [asyncio.ensure_future(fc.flush()) for _ in range(8)]
    await sync.wait_calls(1)
    await _settle()
    sync.gates[0].set()
    await asyncio.gather(*callers)
    assert sync.calls == 1


async def test_caller_arriving_during_a_sync_waits_for_the_next() -> None:
    sync = FakeSync()
    fc = FlushCoalescer(sync)
    first = asyncio.ensure_future(fc.flush())
    await sync.wait_calls(1)
    late = asyncio.ensure_future(fc.flush())  # its writes may have missed the running sync
    await _settle()
    sync.gates[0].set()
    await first
    await _settle()
    assert not late.done()  # the first sync does not release it
    await sync.wait_calls(2)
    sync.gates[1].set()
    await late
    assert sync.calls == 2


async def test_failed_sync_propagates_and_next_caller_syncs_again() -> None:
    sync = FakeSync()
    fc = FlushCoalescer(sync)
    sync.fail_next = True
    first = asyncio.ensure_future(fc.flush())
    await sync.wait_calls(1)
    second = asyncio.ensure_future(fc.flush())
    await _settle()
    sync.gates[0].set()
    with pytest.raises(OSError, match="sync failed"):
        await first
    await sync.wait_calls(2)
    sync.gates[1].set()
    await second  # covered by a sync that succeeded
    assert sync.calls == 2


async def test_raw_node_flushes_coalesce(make_node: Callable[..., RawFileNode]) -> None:
    node = make_node()
    await node.write(0, b"x" * 4096)
    await asyncio.gather(*(node.flush() for _ in range(20)))


# ---------------------------------------------------------------- catalog validation


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/b",
        "",
        ".",
        "..",
        "x@y",
        "a" * 65,
        "-lead",
        ".hidden",
        "_x",
        "a b",
        "a\n",
        "abc\n",
        "\u00e9",
        "a\0b",
        "a:b",
        "/abs",
    ],
)
def test_validate_name_rejects(name: str) -> None:
    with pytest.raises(CatalogError) as e:
        validate_name(name)
    assert e.value.kind == "invalid"


@pytest.mark.parametrize("name", ["a", "A9", "a" * 64, "vm-disk_1.img", "0", "x.y-z_"])
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


def test_validate_name_rejects_non_strings() -> None:
    with pytest.raises(CatalogError):
        validate_name(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * MiB),
        ("10G", 10 << 30),
        ("1T", 1 << 40),
        ("1.5G", 3 << 29),
        ("4096", 4096),
        ("64k", 64 << 10),
        ("2GiB", 2 << 30),
        ("2gb", 2 << 30),
        (" 8M ", 8 * MiB),
        ("0.5K", 512),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["abc", "", "-1G", "1.5", "10X", "1e3", "0x10", "G", "1..5G", "1 G B", "\uff11\uff10", "1.1G"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(CatalogError) as e:
        parse_size(text)
    assert e.value.kind == "invalid"
    assert "size" in e.value.message


@pytest.mark.parametrize("size", [0, -512, 100, 513, 1000, MAX_VOLUME_SIZE + 4096, True, 1.5])
def test_validate_size_rejects(size: object) -> None:
    with pytest.raises(CatalogError):
        validate_size(size)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [512, 4096, 10 << 30, MAX_VOLUME_SIZE])
def test_validate_size_accepts(size: int) -> None:
    assert validate_size(size) == size


def test_catalog_records_and_conflicts(tmp_path: Path) -> None:
    cat = Catalog(str(tmp_path / "data"))
    try:
        assert [p.name for p in cat.pools()] == ["default"]
        cat.check_new_volume("v1", MiB, "default")
        with cat.transaction() as t:
            t.add_layer(LayerRecord("l1", "default", None, MiB, False, 0))
            t.add_volume(VolumeRow("v1", MiB, False, "default", "l1", 0))
        rec = cat.volume("v1")
        assert rec is not None and rec.head == "l1" and rec.size == MiB
        assert [r.id for r in cat.chain("l1")] == ["l1"]
        with pytest.raises(CatalogError) as e:
            cat.check_new_volume("v1", MiB, "default")
        assert e.value.kind == "conflict"
        with pytest.raises(CatalogError) as e:
            cat.check_new_volume("v2", MiB, "nopool")
        assert e.value.kind == "not-found"
        with pytest.raises(CatalogError) as e:
            cat.check_new_volume("v2", 1000, "default")
        assert e.value.kind == "invalid"
        with pytest.raises(CatalogError) as e:
            cat.add_pool("default", str(tmp_path / "elsewhere"))
        assert e.value.kind == "conflict"
        with pytest.raises(CatalogError):
            cat.add_pool("../p", str(tmp_path / "p"))
        assert cat.live_layers() == {"l1"}

        # A failed transaction changes nothing.
        def aborted_delete() -> None:
            with cat.transaction() as t:
                t.delete_volume("v1")
                raise RuntimeError("abort")

        with pytest.raises(RuntimeError):
            aborted_delete()
        assert cat.volume("v1") is not None
        with cat.transaction() as t:
            t.delete_volume("v1")
        assert cat.volume("v1") is None
        assert cat.live_layers() == set()
    finally:
        cat.close()
    again = Catalog(str(tmp_path / "data"))
    try:
        assert again.volumes() == []
        assert [p.name for p in again.pools()] == ["default"]
    finally:
        again.close()


def test_pools_without_a_directory_do_not_collide_and_file_pools_still_do(tmp_path: Path) -> None:
    # RBD pools have no path (''): a node may hold several; two file pools may not share one.
    cat = Catalog(str(tmp_path / "data"))
    try:
        layer = LayerRecord("l1", "default", None, MiB, False, 0)
        with cat.transaction() as t:
            t.add_layer(layer)
            t.add_volume(VolumeRow("v1", MiB, False, "default", "l1", 0))
        for name in ("r1", "r2"):
            cat.insert_pool(PoolRecord(name, "", 0.0, {}, "rbd", {"pool": name}))
        with pytest.raises(CatalogError) as e:
            cat.add_pool("twin", str(tmp_path / "data" / "pools" / "default"))
        assert e.value.kind == "conflict"
        with pytest.raises(CatalogError):
            cat.insert_pool(PoolRecord("r1", "", 0.0, {}, "rbd", {"pool": "r1"}))
        # Pools are still what layers refer to.
        with pytest.raises(sqlite3.IntegrityError), cat.transaction() as t:
            t.add_layer(LayerRecord("l2", "nowhere", None, MiB, False, 0))
    finally:
        cat.close()
    again = Catalog(str(tmp_path / "data"))
    try:
        assert [(p.name, p.backend) for p in again.pools()] == [
            ("default", "file"),
            ("r1", "rbd"),
            ("r2", "rbd"),
        ]
        assert again.volume("v1") is not None and again.layer("l1") == layer
    finally:
        again.close()


def test_write_guard_sends_writes_to_the_pool_after_a_stall_and_back_after_quick_ones() -> None:
    from blockvirt.storage.backends.cowfile.layer import WriteGuard

    g = WriteGuard()
    assert g.inline
    g.note(0.0001)
    assert g.inline and g.stalls == 0
    g.note(WriteGuard.STALL * 2)
    assert not g.inline and g.stalls == 1
    for _ in range(WriteGuard.FAST_STREAK - 1):
        g.note(WriteGuard.QUICK / 2)
    assert not g.inline
    g.note(WriteGuard.STALL * 2)  # a slow one restarts the streak
    for _ in range(WriteGuard.FAST_STREAK):
        g.note(WriteGuard.QUICK / 2)
    assert g.inline and g.stalls == 1


def test_write_guard_counts_an_inline_stall_once_a_second_one_confirms_it() -> None:
    from blockvirt.storage.backends.cowfile.layer import WriteGuard

    g = WriteGuard()
    g.note_inline(WriteGuard.STALL * 2)  # one slow write: a preemption, or the first of many
    assert g.inline and g.suspect == WriteGuard.CONFIRM_WITHIN
    for _ in range(WriteGuard.CONFIRM_WITHIN):
        g.note_inline(WriteGuard.QUICK / 2)
    assert g.inline and not g.suspect  # none followed: forgotten
    g.note_inline(WriteGuard.STALL * 2)
    g.note_inline(WriteGuard.QUICK / 2)
    g.note_inline(WriteGuard.STALL * 2)  # a second one soon after: the kernel is throttling
    assert not g.inline and g.stalls == 1 and not g.suspect


def test_buffer_pool_reuses_large_buffers_and_zero_fills_regions() -> None:
    from blockvirt.storage import buffers

    big = buffers.get(1 << 20)
    big[:4] = b"junk"
    buffers.put(big)
    again = buffers.get(1 << 20)
    assert again is big  # recycled, contents not cleared
    buffers.zero(memoryview(again)[:8])
    assert bytes(again[:8]) == bytes(8)
    small = buffers.get(100)
    assert small == bytearray(100)


# ---------------------------------------------------------------- the export's gate


async def test_export_gate_fast_paths_refuse_while_drained_and_follow_an_inserted_filter() -> None:
    from blockvirt.storage.backend import VolumeRecord
    from blockvirt.storage.export import Export

    class Inline(MemoryNode):
        def write_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
            self.data[offset : offset + len(data)] = data
            return True

    class Refusing(FilterNode):
        def write_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
            return False  # a filter that must see every change

    base = Inline(64 * 1024)
    ex = Export(VolumeRecord("v", base.size, False, "default", 0.0), base)
    assert ex.write_nowait(0, b"abc") and bytes(ex.read_nowait(0, 3) or b"") == b"abc"
    async with ex.drained():
        assert ex.read_nowait(0, 3) is None
        assert ex.read_sparse_nowait(0, 3) is None
        assert not ex.write_nowait(0, b"xyz")
        ex.insert(Refusing(base))
    assert bytes(ex.read_nowait(0, 3) or b"") == b"abc"  # open again, through the filter
    assert not ex.write_nowait(0, b"xyz")  # the filter refuses: its own method answers
    async with ex.drained():
        ex.remove(ex.filters()[0])
    assert ex.write_nowait(0, b"xyz")
    segs = ex.read_sparse_nowait(0, 3)
    assert segs is not None and [(o, n, bytes(d or b"")) for o, n, d in segs] == [(0, 3, b"xyz")]


def test_merged_index_sole_owner_of_a_range() -> None:
    from blockvirt.storage.backends.cowfile.layer_map import PAGE_BLOCKS, LayerMap
    from blockvirt.storage.backends.cowfile.merged import MergedIndex

    head, parent = LayerMap(3 * PAGE_BLOCKS), LayerMap(3 * PAGE_BLOCKS)
    parent.set_data(0, 8)
    head.set_data(4, 2)
    m = MergedIndex([(2, head), (1, parent)])
    assert m.sole_owner(0, 4) == 1
    assert m.sole_owner(4, 2) == 2 and m.sole_owner(5, 1) == 2
    assert m.sole_owner(3, 2) == -1  # two owners
    assert m.sole_owner(8, 100) == 0  # reads as zeros
    assert m.sole_owner(PAGE_BLOCKS - 1, 2) == -1  # crosses a page: ask runs()
    assert head.all_data_in(4, 1) and head.all_data_in(5, 1) and not head.all_data_in(6, 1)
    assert not head.all_data_in(PAGE_BLOCKS + 4, 1)


def test_merged_index_one_block_owner_change() -> None:
    """set_owner of one block (an allocating 4 KiB write) in a page the index holds, and in
    one it does not hold yet (built from the maps when first asked)."""
    from blockvirt.storage.backends.cowfile.layer_map import PAGE_BLOCKS, LayerMap
    from blockvirt.storage.backends.cowfile.merged import MergedIndex

    head, parent = LayerMap(3 * PAGE_BLOCKS), LayerMap(3 * PAGE_BLOCKS)
    parent.set_data(0, 8)
    m = MergedIndex([(2, head), (1, parent)])
    assert m.sole_owner(0, 8) == 1  # page 0 is held now
    head.set_data(3, 1)
    m.set_owner(3, 1, 2)
    assert [m.sole_owner(b, 1) for b in range(5)] == [1, 1, 1, 2, 1]
    head.set_data(PAGE_BLOCKS + 7, 1)
    m.set_owner(PAGE_BLOCKS + 7, 1, 2)  # page 1 not held: nothing to change
    assert m.sole_owner(PAGE_BLOCKS + 7, 1) == 2 and m.sole_owner(PAGE_BLOCKS + 6, 1) == 0
