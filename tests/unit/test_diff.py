"""diff.changed_extents (pure): from layer page tables to byte ranges, grown ranges included."""

from __future__ import annotations

import time

from blockvirt.storage.backends.cowfile import diff
from blockvirt.storage.backends.cowfile.layer_map import LayerMap

KiB = 1024
MiB = 1024 * KiB
TiB = 1 << 40


def layer(size: int, *held: tuple[int, int, str]) -> diff.PageTable:
    """A layer of `size` bytes holding (first block, count, "data" | "zero") runs."""
    m = LayerMap(-(-size // 4096))
    for first, count, kind in held:
        if kind == "data":
            m.set_data(first, count)
        else:
            m.set_zero(first, count)
    return diff.table(m)


def test_data_and_zero_blocks_of_every_layer_merged_in_order() -> None:
    a = layer(MiB, (0, 2, "data"), (100, 1, "zero"))
    b = layer(MiB, (2, 1, "zero"), (50, 3, "data"))
    want = [(0, 12 * KiB), (200 * KiB, 12 * KiB), (400 * KiB, 4 * KiB)]
    assert diff.changed_extents([a, b], MiB, MiB) == want


def test_a_grown_range_is_one_extent_joined_to_a_touching_one() -> None:
    top = layer(3 * MiB, (255, 1, "data"))  # the last block before the old end
    assert diff.changed_extents([top], 3 * MiB, MiB) == [(MiB - 4 * KiB, 2 * MiB + 4 * KiB)]
    assert diff.changed_extents([layer(3 * MiB)], 3 * MiB, MiB + 512) == [(MiB, 2 * MiB)]


def test_a_partial_last_block_is_cut_at_the_size() -> None:
    size = MiB + 512
    assert diff.changed_extents([layer(size, (256, 1, "data"))], size, size) == [(MiB, 512)]
    assert diff.changed_extents([layer(size)], size, MiB) == [(MiB, 512)]


def test_a_preallocated_layer_holds_everything() -> None:
    m = LayerMap(256, all_data=True)
    assert diff.changed_extents([diff.table(m)], MiB, MiB) == [(0, MiB)]


def test_growing_by_tebibytes_costs_nothing_per_page() -> None:
    t0 = time.perf_counter()
    assert diff.changed_extents([layer(16 * TiB)], 16 * TiB, MiB) == [(MiB, 16 * TiB - MiB)]
    assert time.perf_counter() - t0 < 1.0


def test_the_table_is_a_copy_new_pages_do_not_reach() -> None:
    m = LayerMap(1 << 20)
    m.set_data(0, 1)
    t = diff.table(m)
    m.set_data(1 << 19, 1)  # a new page after the copy: not in it
    assert diff.changed_extents([t], 4 << 30, 4 << 30) == [(0, 4 * KiB)]
