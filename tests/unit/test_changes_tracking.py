"""ChangeTracking on real file volumes: the change filter's life in the head's graph, and the
answers across the tree edits an incremental backup must survive (revert, clone, flatten,
migration between pools), each checked against what the test itself wrote."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from blockvirt.jobs import migrate
from blockvirt.jobs.manager import JobManager
from blockvirt.jobs.runners import register_all
from blockvirt.server.bitmaps import SessionBitmaps
from blockvirt.service import build_storage
from blockvirt.storage.changes import EVERYTHING, ChangedSince
from blockvirt.storage.filters.changes import ChangeFilter
from blockvirt.storage.volumes import VolumeManager

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[tuple[VolumeManager, JobManager]]:
    vm, jobs = build_storage(str(tmp_path / "data"))
    register_all(jobs, vm, None)
    await vm.start()
    try:
        yield vm, jobs
    finally:
        await vm.close()


async def answer(view: ChangedSince, size: int) -> list[tuple[int, int]]:
    return (await view.current()).clipped(size)


async def test_the_filter_is_in_the_graph_only_while_a_head_answer_is_held(
    storage: tuple[VolumeManager, JobManager],
) -> None:
    vm, _ = storage
    await vm.create("v", 1 * MiB)
    head = vm.head("v")
    assert SessionBitmaps.select(vm.changes, head, {1: "base:allocation", 2: "qemu:allocation-depth"}) is None
    await vm.snapshot_create("v", "s1")
    await vm.snapshot_create("v", "s2")
    snap = vm.volume("v@s2")
    assert snap is not None
    a = await vm.changes.acquire(head, "s1")
    b = await vm.changes.acquire(head, "s2")
    c = await vm.changes.acquire(snap, "s1")
    again = await vm.changes.acquire(head, "s1")
    assert again is a
    filters = head.filters()
    assert len(filters) == 1 and isinstance(filters[0], ChangeFilter)
    assert snap.filters() == []
    await head.write(8 * KiB, b"x")  # through the filter: both head answers see it
    assert await answer(a, MiB) == [(8 * KiB, 4 * KiB)]
    assert await answer(b, MiB) == [(8 * KiB, 4 * KiB)]
    assert await answer(c, MiB) == []
    for view in (a, b, c):
        await vm.changes.release(view)
    assert head.filters() != []  # `again` still holds s1
    await vm.changes.release(again)
    assert head.filters() == []


async def test_revert_rebuilds_answers_and_a_lost_snapshot_makes_everything_changed(
    storage: tuple[VolumeManager, JobManager],
) -> None:
    vm, _ = storage
    await vm.create("v", 1 * MiB)
    head = vm.head("v")
    await vm.snapshot_create("v", "s1")
    await head.write(0, b"a" * 4096)
    await vm.snapshot_create("v", "s2")
    await head.write(64 * KiB, b"b" * 4096)
    since1 = await vm.changes.acquire(head, "s1")
    since2 = await vm.changes.acquire(head, "s2")
    assert await answer(since1, MiB) == [(0, 4 * KiB), (64 * KiB, 4 * KiB)]
    assert await answer(since2, MiB) == [(64 * KiB, 4 * KiB)]
    await vm.snapshot_revert("v", "s1")
    assert vm.snapshot_ancestors("v") == ["s1"]  # s2 is on another branch now
    assert await answer(since1, MiB) == []  # the head reads as s1 again
    assert await answer(since2, MiB) == [(0, MiB)]  # unknowable: all of it
    assert (await since2.current()).ranges() == [(0, EVERYTHING)]
    await head.write(128 * KiB, b"c")
    assert await answer(since1, MiB) == [(128 * KiB, 4 * KiB)]
    await vm.changes.release(since1)
    await vm.changes.release(since2)


async def test_a_clone_counts_from_its_own_snapshots(storage: tuple[VolumeManager, JobManager]) -> None:
    vm, _ = storage
    await vm.create("v", 1 * MiB)
    await vm.head("v").write(0, b"a" * 8192)
    await vm.snapshot_create("v", "s1")
    await vm.clone("v@s1", "c")
    assert vm.snapshot_ancestors("c") == []  # v's snapshots are not c's
    await vm.snapshot_create("c", "c1")
    await vm.head("c").write(4096, b"b" * 100)
    assert vm.snapshot_ancestors("c") == ["c1"]
    assert (await vm.snapshot_diff("c", "c1"))["extents"] == [{"offset": 4096, "length": 4096}]
    assert (await vm.snapshot_diff("v", "s1"))["extents"] == []


async def test_flatten_cuts_the_head_from_its_snapshots(storage: tuple[VolumeManager, JobManager]) -> None:
    vm, jobs = storage
    await vm.create("v", 1 * MiB)
    head = vm.head("v")
    await head.write(0, b"a" * 4096)
    await vm.snapshot_create("v", "s1")
    await head.write(8192, b"b" * 4096)
    view = await vm.changes.acquire(head, "s1")
    job = await vm.flatten("v")
    await jobs.wait(job)  # type: ignore[arg-type]
    assert vm.snapshot_ancestors("v") == []  # no longer offered to new sessions
    assert await answer(view, MiB) == [(8192, 4096)]  # still true for those who hold it
    await head.write(0, b"c")
    assert await answer(view, MiB) == [(0, 4096), (8192, 4096)]
    await vm.changes.release(view)


async def test_a_migration_between_pools_keeps_answers(
    storage: tuple[VolumeManager, JobManager], tmp_path: Path
) -> None:
    vm, jobs = storage
    vm.pools.create("fast", str(tmp_path / "fast"))
    await vm.create("v", 4 * MiB)
    head = vm.head("v")
    await head.write(0, b"a" * 64 * KiB)
    await vm.snapshot_create("v", "s1")
    await head.write(1 * MiB, b"b" * 4096)
    await vm.snapshot_create("v", "s2")
    await head.zero(2 * MiB, 64 * KiB, may_trim=True)
    live = await vm.changes.acquire(head, "s1")
    job = await migrate.start(vm, jobs, "v", "fast")
    await head.write(3 * MiB, b"c" * 4096)  # while it copies: mirrored, and tracked
    await jobs.wait(job)
    assert job.state == "done", job.error
    assert vm.require("v").pool == "fast"
    await head.write(3 * MiB + 8192, b"d")  # after the switch, through the new layers
    assert vm.snapshot_ancestors("v") == ["s1", "s2"]

    def diff(extents: list[tuple[int, int]]) -> list[dict[str, int]]:
        return [{"offset": off, "length": ln} for off, ln in extents]

    s1_s2 = [(1 * MiB, 4096)]
    s2_head = [(2 * MiB, 64 * KiB), (3 * MiB, 4096), (3 * MiB + 8192, 4096)]
    assert (await vm.snapshot_diff("v", "s1", "s2"))["extents"] == diff(s1_s2)
    assert (await vm.snapshot_diff("v", "s2"))["extents"] == diff(s2_head)
    assert (await vm.snapshot_diff("v", "s1"))["extents"] == diff(s1_s2 + s2_head)
    assert await answer(live, 4 * MiB) == s1_s2 + s2_head
    await vm.changes.release(live)
    assert head.filters() == []
