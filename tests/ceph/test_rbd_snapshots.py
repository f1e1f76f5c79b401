"""Snapshots, clones, flatten and diffs through AsyncImage / RbdPool."""

from __future__ import annotations

import errno
import os

import pytest

from blockvirt.storage.backends.rbd.cluster import CephConnection
from blockvirt.storage.backends.rbd.errors import RbdError
from blockvirt.storage.backends.rbd.image import AsyncImage, DiffExtent
from blockvirt.storage.backends.rbd.pool import RbdPool
from blockvirt.storage.node import HOLE, ZERO
from tests.ceph.conftest import unique

pytestmark = pytest.mark.ceph

KiB, MiB = 1 << 10, 1 << 20
OBJ = 4 * MiB


async def test_snapshot_keeps_old_data_and_rolls_back(image: AsyncImage, conn: CephConnection) -> None:
    await image.write(b"1" * 4096, 0)
    await image.snapshot_create("s1")
    await image.write(b"2" * 4096, 0)
    assert [s.name for s in await image.snapshots()] == ["s1"]

    at_s1 = await AsyncImage.open(conn, image.name, snapshot="s1")
    assert at_s1.read_only
    assert await at_s1.read(0, 4096) == b"1" * 4096
    await at_s1.close()

    await image.snapshot_rollback("s1")
    assert await image.read(0, 4096) == b"1" * 4096

    await image.snapshot_rename("s1", "first")
    assert [s.name for s in await image.snapshots()] == ["first"]
    await image.snapshot_remove("first")
    assert await image.snapshots() == []
    with pytest.raises(RbdError) as e:
        await image.snapshot_remove("first")
    assert e.value.errno == errno.ENOENT


async def test_protect_unprotect(image: AsyncImage) -> None:
    await image.snapshot_create("p")
    assert not await image.snapshot_is_protected("p")
    await image.snapshot_protect("p")
    assert await image.snapshot_is_protected("p")
    with pytest.raises(RbdError) as e:
        await image.snapshot_remove("p")
    assert e.value.errno == errno.EBUSY
    await image.snapshot_unprotect("p")
    await image.snapshot_remove("p")


async def test_clone_reads_through_then_flattens_with_progress(pool: RbdPool, image: AsyncImage) -> None:
    base = os.urandom(3 * OBJ)
    await image.write(base, 0)
    await image.snapshot_create("gold")
    child_name = unique("clone")
    await pool.clone(image.name, "gold", child_name)  # clone v2: no protect needed
    child = await pool.open(child_name)
    try:
        assert await child.parent() == (pool.name, image.name, "gold")
        assert await child.read(OBJ, 4096) == base[OBJ : OBJ + 4096]
        # The parent's data counts as allocated in the clone.
        assert (await child.allocation(0, 3 * OBJ)) == [(3 * OBJ, 0)]
        await child.write(b"c" * 4096, 0)  # copy-up into the clone only
        assert await image.read(0, 4096) == base[:4096]

        seen: list[tuple[int, int]] = []
        await child.flatten(lambda done, total: seen.append((done, total)))
        assert seen and seen[-1][0] == seen[-1][1] == 16  # 64 MiB in 4 MiB objects
        assert await child.parent() is None
        assert await child.read(2 * OBJ, 4096) == base[2 * OBJ : 2 * OBJ + 4096]
        assert await child.read(0, 4096) == b"c" * 4096
        await image.snapshot_remove("gold")  # nothing depends on it any more
    finally:
        await child.close()
        await pool.remove(child_name)


async def test_removing_a_cloned_snapshot_moves_it_to_the_trash(pool: RbdPool, image: AsyncImage) -> None:
    await image.write(b"p" * 4096, 0)
    await image.snapshot_create("base")
    child_name = unique("clone")
    await pool.clone(image.name, "base", child_name)
    try:
        await image.snapshot_remove("base")
        assert await image.snapshots() == []  # out of sight ...
        child = await pool.open(child_name)
        assert await child.read(0, 4096) == b"p" * 4096  # ... but the clone still reads it
        await child.close()
    finally:
        await pool.remove(child_name)  # the trashed snapshot goes with its last clone


async def test_diff_since_a_snapshot(image: AsyncImage) -> None:
    await image.write(b"a" * (64 * KiB), 8 * MiB)
    await image.snapshot_create("base")
    await image.write(b"b" * (64 * KiB), 0)
    await image.write(b"c" * (64 * KiB), 20 * MiB)
    await image.write_zeroes(8 * MiB, OBJ)  # was data at the snapshot: now gone
    changed = await image.diff("base")
    assert DiffExtent(0, 64 * KiB, True) in changed
    assert DiffExtent(20 * MiB, 64 * KiB, True) in changed
    assert any(e.offset == 8 * MiB and not e.exists for e in changed)
    assert len(changed) == 3
    # whole_object: the fast-diff map, in object units.
    coarse = await image.diff("base", whole_object=True)
    assert {(e.offset, e.length) for e in coarse} == {(0, OBJ), (8 * MiB, OBJ), (20 * MiB, OBJ)}
    # Everything since creation.
    assert {e.offset for e in await image.diff(None)} == {0, 20 * MiB}
    await image.snapshot_remove("base")


async def test_allocation_of_an_unwritten_clone_area(pool: RbdPool, image: AsyncImage) -> None:
    await image.write(b"x" * 4096, 0)
    await image.snapshot_create("s")
    child_name = unique("clone")
    await pool.clone(image.name, "s", child_name)
    child = await pool.open(child_name)
    try:
        extents = await child.allocation(0, 2 * OBJ)
        assert extents == [(4096, 0), (2 * OBJ - 4096, HOLE | ZERO)]
    finally:
        await child.close()
        await pool.remove(child_name)
        await image.snapshot_remove("s")


async def test_rename_image(pool: RbdPool) -> None:
    old, new = unique(), unique()
    await pool.create(old, 4 * MiB)
    await pool.rename(old, new)
    assert await pool.exists(new) and not await pool.exists(old)
    img = await pool.open(new)
    assert img.name == new
    await img.close()
    await pool.remove(new)
    with pytest.raises(RbdError) as e:
        await pool.open(new)
    assert e.value.errno == errno.ENOENT
