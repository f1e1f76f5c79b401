"""LayerMap.states (the journal's per-cluster states, cut a page at a time) against the
block-by-block states of the same map."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blockvirt.storage.backends.cowfile.layer_map import CLUSTER_BLOCKS, DATA, PAGE_BLOCKS, ZERO, LayerMap

NBLOCKS = 3 * PAGE_BLOCKS + 100  # three full pages and a partial one

ops = st.lists(
    st.tuples(
        st.sampled_from(["data", "zero", "unalloc"]),
        st.integers(0, NBLOCKS - 1),
        st.integers(1, 2 * PAGE_BLOCKS),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, whole_page=st.booleans())
def test_states_are_each_clusters_blocks(ops: list[tuple[str, int, int]], whole_page: bool) -> None:
    m = LayerMap(NBLOCKS)
    for op, first, count in ops:
        count = min(count, NBLOCKS - first)
        {"data": m.set_data, "zero": m.set_zero, "unalloc": m.set_unalloc}[op](first, count)
    if whole_page:
        m.dirty.update(dict.fromkeys(range(PAGE_BLOCKS // CLUSTER_BLOCKS, 2 * PAGE_BLOCKS // CLUSTER_BLOCKS)))
    dirty = sorted(m.dirty)
    entries = m.states(m.swap_dirty())
    assert not m.dirty
    assert [c for c, _, _ in entries] == dirty
    live = m.live_states(m.pages)  # the compacted journal: every cluster not all UNALLOC
    held = {b // CLUSTER_BLOCKS for b in range(NBLOCKS) if m.state(b) != 0}
    assert sorted(c for c, _, _ in live) == sorted(held)
    for c, data, zero in entries + live:
        for k in range(CLUSTER_BLOCKS):
            block = c * CLUSTER_BLOCKS + k
            state = m.state(block) if block < NBLOCKS else 0
            assert (data >> k & 1, zero >> k & 1) == (state == DATA, state == ZERO), (c, k)


small_ops = st.lists(
    st.tuples(
        st.sampled_from(["data", "zero", "unalloc"]),
        st.integers(0, NBLOCKS - 1),
        st.sampled_from([1, 1, 1, 2, 3, 17, PAGE_BLOCKS]),  # one-block changes mostly, whole pages
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(ops=small_ops)
def test_set_operations_match_a_block_by_block_model(ops: list[tuple[str, int, int]]) -> None:
    """The one-block fast paths (set_data of one block, all_data_in of one block, a full page
    among them) against a list of states."""
    m = LayerMap(NBLOCKS)
    model = [0] * NBLOCKS
    value = {"data": DATA, "zero": ZERO, "unalloc": 0}
    touched: set[int] = set()
    for op, first, count in ops:
        count = min(count, NBLOCKS - first)
        {"data": m.set_data, "zero": m.set_zero, "unalloc": m.set_unalloc}[op](first, count)
        model[first : first + count] = [value[op]] * count
        touched.update(range(first, first + count))
    for b in touched | {0, NBLOCKS - 1}:
        assert m.state(b) == model[b], b
        assert m.all_data_in(b, 1) == (model[b] == DATA), b
    assert set(m.dirty) == {b // CLUSTER_BLOCKS for b in touched}
    assert all(d or z for d, z in m.pages.values())  # no page left empty
