"""A layer's commit reads changed states a slice per loop turn: changes made meanwhile are
journaled by it or by the next commit, never lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockvirt.storage.backends.cowfile.layer import STATES_PER_TURN, Layer
from blockvirt.storage.backends.cowfile.layer_map import CLUSTER_BLOCKS, DATA, ZERO
from blockvirt.storage.fileio import REAL

MiB = 1 << 20


def _layer(pool: Path, lid: str, size: int, *, writable: bool) -> Layer:
    if not (pool / f"{lid}.data").exists():
        Layer.create(REAL, str(pool), lid, size)
    return Layer.open(REAL, str(pool), lid, size, writable=writable)


async def test_a_commit_read_in_slices_journals_changes_made_meanwhile(tmp_path: Path) -> None:
    lid, size = "3" * 32, 128 * MiB
    n = 3 * STATES_PER_TURN  # three slices
    layer = _layer(tmp_path, lid, size, writable=True)
    for c in range(n):
        layer.map.set_data(c * CLUSTER_BLOCKS, 1)
    commit = asyncio.create_task(layer.commit())
    while layer.map.dirty:  # until it took the changed clusters and read its first slice
        await asyncio.sleep(0)
    assert not commit.done() and not layer.states_durable(0, 1)
    early, late = 0, (n - 1) * CLUSTER_BLOCKS
    layer.map.set_zero(early, 1)  # its cluster was read already: the next commit's
    layer.map.set_zero(late, 1)  # not read yet: this commit's
    await commit
    again = _layer(tmp_path, lid, size, writable=False)
    assert again.map.state(late) == ZERO and again.map.state(early) == DATA
    assert again.map.state(CLUSTER_BLOCKS) == DATA
    again.close()
    await layer.commit()
    layer.close()
    again = _layer(tmp_path, lid, size, writable=False)
    assert again.map.state(early) == ZERO and again.map.state(late) == ZERO
    again.close()


async def test_a_compacting_commit_read_in_slices_keeps_every_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blockvirt.storage.backends.cowfile import layer as layer_module
    from blockvirt.storage.backends.cowfile.layer import PAGES_PER_TURN
    from blockvirt.storage.backends.cowfile.layer_map import PAGE_BLOCKS

    monkeypatch.setattr(layer_module, "COMPACT_AT", 4096)
    npages = 2 * PAGES_PER_TURN + 5
    lid, size = "4" * 32, npages * PAGE_BLOCKS * 4096
    layer = _layer(tmp_path, lid, size, writable=True)
    for round_ in range(6):  # a journal of superseded entries: compaction pays
        for page in range(npages):
            (layer.map.set_data if round_ % 2 else layer.map.set_zero)(page * PAGE_BLOCKS, 2)
        await layer.commit()
    for page in range(0, npages, 2):
        layer.map.set_unalloc(page * PAGE_BLOCKS, 2)
    layer.map.set_data(5, 3)
    before = layer.map_end
    await layer.commit()
    assert layer.map_end < before  # it compacted
    want = {
        b: layer.map.state(b)
        for page in range(npages)
        for b in range(page * PAGE_BLOCKS, page * PAGE_BLOCKS + 9)
    }
    layer.close()
    again = _layer(tmp_path, lid, size, writable=False)
    assert {b: again.map.state(b) for b in want} == want
    again.close()
