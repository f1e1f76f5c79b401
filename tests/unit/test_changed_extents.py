"""Changed extents between snapshots of file volumes (the seam's `changed_extents`), against
what the test itself wrote."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from blockvirt.jobs.runners import register_all
from blockvirt.service import build_storage
from blockvirt.storage.catalog import CatalogError
from blockvirt.storage.volumes import VolumeManager

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
async def vm(tmp_path: Path) -> AsyncIterator[VolumeManager]:
    vm, jobs = build_storage(str(tmp_path / "data"))
    register_all(jobs, vm, None)
    await vm.start()
    try:
        yield vm
    finally:
        await vm.close()


async def changed(
    vm: VolumeManager, name: str, since: str, until: str | None = None
) -> list[tuple[int, int]]:
    backend, rec = vm.locate(name)
    return await backend.changed_extents(rec, since, until)


async def test_the_libnbd_recipe_writes_and_zeroes(vm: VolumeManager) -> None:
    await vm.create("v", 1 * MiB)
    head = vm.head("v")
    await head.write(0, b"a" * 64 * KiB)
    await vm.snapshot_create("v", "s1")
    await head.write(64 * KiB, b"b" * 64 * KiB)
    await head.zero(512 * KiB, 64 * KiB, may_trim=True)
    await vm.snapshot_create("v", "s2")
    assert await changed(vm, "v", "s1", "s2") == [(64 * KiB, 64 * KiB), (512 * KiB, 64 * KiB)]
    assert await changed(vm, "v", "s1") == [(64 * KiB, 64 * KiB), (512 * KiB, 64 * KiB)]
    assert await changed(vm, "v", "s2") == []
    await head.write(900 * KiB, b"c" * 100)  # a partial block counts as its whole block
    assert await changed(vm, "v", "s2") == [(900 * KiB, 4 * KiB)]
    assert await changed(vm, "v", "s2", "s2") == []


async def test_a_grown_range_counts_as_changed(vm: VolumeManager) -> None:
    await vm.create("g", 1 * MiB)
    await vm.snapshot_create("g", "s1")
    await vm.resize("g", 2 * MiB)
    assert await changed(vm, "g", "s1") == [(1 * MiB, 1 * MiB)]


async def test_only_older_points_of_the_same_branch(vm: VolumeManager) -> None:
    await vm.create("b", 1 * MiB)
    head = vm.head("b")
    await vm.snapshot_create("b", "s1")
    await head.write(0, b"x" * 4096)
    await vm.snapshot_create("b", "s2")
    await vm.snapshot_revert("b", "s1")
    await vm.snapshot_create("b", "s3")  # a branch beside s2
    with pytest.raises(CatalogError):
        await changed(vm, "b", "s2", "s3")
    with pytest.raises(CatalogError):
        await changed(vm, "b", "s2")
    assert await changed(vm, "b", "s1", "s3") == []
