"""A thin volume's base layer grows by allocation units: a small write into a hole first has
the file system allocate the aligned unit around it (one fallocate per unit), so that later
first writes in that unit cost what writes into a thick file do. Real files on the test's
file system: the space figures are the file's own (st_blocks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockvirt.storage.backends.cowfile.chain import ChainNode
from blockvirt.storage.backends.cowfile.layer import Layer
from blockvirt.storage.catalog import CatalogError
from blockvirt.storage.fileio import FileIO
from blockvirt.storage.pools import PoolSettings

KiB, MiB = 1 << 10, 1 << 20
BASE, DELTA = "a" * 32, "b" * 32


class Counting(FileIO):
    """Real files; records each reservation, and can refuse them (a full file system)."""

    def __init__(self, refuse: bool = False) -> None:
        self.reserves: list[tuple[int, int]] = []
        self.refuse = refuse

    def reserve(self, fd: int, offset: int, length: int) -> bool:
        self.reserves.append((offset, length))
        return False if self.refuse else super().reserve(fd, offset, length)


def _layer(io: FileIO, d: Path, lid: str, size: int, *, thick: bool = False) -> Layer:
    Layer.create(io, str(d), lid, size, thick=thick)
    return Layer.open(io, str(d), lid, size, writable=True)


def _on_disk(lay: Layer) -> int:
    return os.fstat(lay.fd).st_blocks * 512


def _close(*layers: Layer) -> None:
    for lay in layers:
        lay.close()


async def test_a_small_first_write_reserves_its_unit(tmp_path: Path) -> None:
    io = Counting()
    lay = _layer(io, tmp_path, BASE, 16 * MiB)
    node = ChainNode([lay], 16 * MiB, writable=True, alloc_unit=MiB)
    data = os.urandom(4 * KiB)
    await node.write(5 * MiB + 8 * KiB, data)
    await node.write(5 * MiB + 64 * KiB, data)  # same unit: no second fallocate
    assert io.reserves == [(5 * MiB, MiB)]
    assert _on_disk(lay) >= MiB
    assert os.fstat(lay.fd).st_size == 16 * MiB
    # Only what was written is the volume's: the rest of the unit reads as zeros and is
    # not data in block status.
    assert bytes(await node.read(5 * MiB + 8 * KiB, 4 * KiB)) == data
    assert bytes(await node.read(5 * MiB, 8 * KiB)) == bytes(8 * KiB)
    extents = await node.block_status(5 * MiB, MiB)
    data_bytes = sum(n for n, flags in extents if flags == 0)
    assert data_bytes == 8 * KiB, extents
    _close(lay)


async def test_without_a_unit_a_write_takes_only_its_blocks(tmp_path: Path) -> None:
    io = Counting()
    lay = _layer(io, tmp_path, BASE, 16 * MiB)
    node = ChainNode([lay], 16 * MiB, writable=True, alloc_unit=0)
    await node.write(5 * MiB, os.urandom(4 * KiB))
    assert io.reserves == []
    assert _on_disk(lay) < 64 * KiB
    _close(lay)


async def test_a_delta_layer_takes_blocks_not_units(tmp_path: Path) -> None:
    """Over a snapshot, a layer holds only the changes: padding each to a unit would
    multiply what the snapshot costs."""
    io = Counting()
    base = _layer(io, tmp_path, BASE, 16 * MiB)
    delta = _layer(io, tmp_path, DELTA, 16 * MiB)
    node = ChainNode([delta, base], 16 * MiB, writable=True, alloc_unit=MiB)
    await node.write(3 * MiB, os.urandom(4 * KiB))
    assert io.reserves == [] and _on_disk(delta) < 64 * KiB
    # Merged down to one layer (a snapshot deleted), the head is a base again.
    node.set_layers([base], keep_index=False)
    await node.write(7 * MiB, os.urandom(4 * KiB))
    assert io.reserves == [(7 * MiB, MiB)]
    _close(base, delta)


async def test_large_writes_and_thick_layers_do_not_reserve(tmp_path: Path) -> None:
    io = Counting()
    thin = _layer(io, tmp_path, BASE, 16 * MiB)
    node = ChainNode([thin], 16 * MiB, writable=True, alloc_unit=256 * KiB)
    await node.write(MiB, os.urandom(256 * KiB))  # a whole unit: nothing to gain
    thick = _layer(io, tmp_path, DELTA, 16 * MiB, thick=True)
    tnode = ChainNode([thick], 16 * MiB, writable=True, alloc_unit=MiB)
    await tnode.write(4 * MiB, os.urandom(4 * KiB))
    assert io.reserves == []
    _close(thin, thick)


async def test_the_last_unit_stops_at_the_end_of_the_volume(tmp_path: Path) -> None:
    io = Counting()
    size = MiB + 512 * KiB
    lay = _layer(io, tmp_path, BASE, size)
    node = ChainNode([lay], size, writable=True, alloc_unit=MiB)
    await node.write(MiB + 256 * KiB, os.urandom(4 * KiB))
    assert io.reserves == [(MiB, 512 * KiB)]
    assert os.fstat(lay.fd).st_size == size
    _close(lay)


async def test_a_write_across_two_units_reserves_both(tmp_path: Path) -> None:
    io = Counting()
    lay = _layer(io, tmp_path, BASE, 4 * MiB)
    node = ChainNode([lay], 4 * MiB, writable=True, alloc_unit=64 * KiB)
    await node.write(64 * KiB - 4 * KiB, os.urandom(8 * KiB))
    assert io.reserves == [(0, 64 * KiB), (64 * KiB, 64 * KiB)]
    _close(lay)


async def test_a_refused_reservation_still_writes_and_is_not_retried(tmp_path: Path) -> None:
    """A full file system refuses the fallocate: the write goes ahead (it needs one block,
    not a unit) and the unit is not asked for again at every write."""
    io = Counting(refuse=True)
    lay = _layer(io, tmp_path, BASE, 16 * MiB)
    node = ChainNode([lay], 16 * MiB, writable=True, alloc_unit=MiB)
    data = os.urandom(4 * KiB)
    await node.write(0, data)
    await node.write(8 * KiB, data)
    assert io.reserves == [(0, MiB)]
    assert bytes(await node.read(0, 4 * KiB)) == data
    _close(lay)


async def test_a_resize_forgets_the_reserved_units(tmp_path: Path) -> None:
    """A shrink frees the units past the new end and a grow punches the new range: units
    there must be reserved again."""
    io = Counting()
    lay = _layer(io, tmp_path, BASE, 4 * MiB)
    node = ChainNode([lay], 4 * MiB, writable=True, alloc_unit=MiB)
    await node.write(3 * MiB, os.urandom(4 * KiB))
    await node.resize(2 * MiB)
    await node.resize(4 * MiB)
    await node.write(3 * MiB + 8 * KiB, os.urandom(4 * KiB))
    assert io.reserves == [(3 * MiB, MiB), (3 * MiB, MiB)]
    _close(lay)


async def test_a_general_path_write_reserves_too(tmp_path: Path) -> None:
    """A partial-block first write (read-modify-write) and a FUA first write take the
    general path; both reserve."""
    io = Counting()
    lay = _layer(io, tmp_path, BASE, 8 * MiB)
    node = ChainNode([lay], 8 * MiB, writable=True, alloc_unit=MiB)
    await node.write(MiB + 100, b"x" * 100)
    await node.write(5 * MiB, os.urandom(4 * KiB), fua=True)
    assert io.reserves == [(MiB, MiB), (5 * MiB, MiB)]
    assert bytes(await node.read(MiB, 512)) == bytes(100) + b"x" * 100 + bytes(312)
    _close(lay)


@pytest.mark.parametrize("value", [0, 64 * KiB, 256 * KiB, MiB, 64 * MiB])
def test_allocation_units_a_pool_accepts(value: int) -> None:
    assert PoolSettings().updated({"alloc_unit": value}).alloc_unit == value


@pytest.mark.parametrize("value", [4096, 32 * KiB, 3 * MiB, 128 * MiB, -MiB, 1.5, True, "1M"])
def test_allocation_units_a_pool_refuses(value: object) -> None:
    with pytest.raises(CatalogError) as e:
        PoolSettings().updated({"alloc_unit": value})
    assert e.value.kind == "invalid"


def test_the_default_unit_is_a_mebibyte() -> None:
    assert PoolSettings().alloc_unit == MiB
    assert PoolSettings.from_dict({}).alloc_unit == MiB
