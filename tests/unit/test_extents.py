"""ExtentSet (pure): ranges merged as they are added, and runs over any span, against a plain
set of byte offsets."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from blockvirt.storage.extents import ExtentSet

SPACE = 200

ranges = st.lists(st.tuples(st.integers(0, SPACE), st.integers(0, 40)), max_size=25)


def model_of(pairs: list[tuple[int, int]]) -> set[int]:
    return {b for off, ln in pairs for b in range(off, off + ln)}


def runs_of(members: set[int], offset: int, length: int) -> list[tuple[int, bool]]:
    """Alternating (length, member) runs over [offset, offset + length), from the model."""
    out: list[tuple[int, bool]] = []
    for b in range(offset, offset + length):
        inside = b in members
        if out and out[-1][1] == inside:
            out[-1] = (out[-1][0] + 1, inside)
        else:
            out.append((1, inside))
    return out


@given(ranges)
def test_ranges_are_the_union_sorted_disjoint_and_never_touching(pairs: list[tuple[int, int]]) -> None:
    s = ExtentSet(pairs)
    got = s.ranges()
    assert model_of(got) == model_of(pairs)
    assert s.total == len(model_of(pairs))
    for (a, alen), (b, _) in itertools.pairwise(got):
        assert alen > 0 and a + alen < b  # a gap between neighbours, else they were merged


@given(ranges, st.integers(0, SPACE + 50), st.integers(1, SPACE), st.integers(1, 8))
def test_runs_match_the_model_up_to_the_limit(
    pairs: list[tuple[int, int]], offset: int, length: int, limit: int
) -> None:
    s = ExtentSet(pairs)
    want = runs_of(model_of(pairs), offset, length)
    got = s.runs(offset, length, limit)
    assert got == want[:limit]


def test_the_libnbd_recipe() -> None:
    s = ExtentSet([(512 * 1024, 65536), (65536, 65536)])
    assert s.runs(0, 1 << 20, 100) == [
        (65536, False),
        (65536, True),
        (393216, False),
        (65536, True),
        (458752, False),
    ]
    assert s.runs(70000, 10, 1) == [(10, True)]
    assert s.runs(0, 1 << 20, 1) == [(65536, False)]


def test_touching_ranges_merge_and_clipping() -> None:
    s = ExtentSet()
    s.add(4096, 4096)
    s.add(0, 4096)
    s.add(8192, 100)
    s.add(5000, 0)
    assert s.ranges() == [(0, 8292)]
    assert len(s) == 1
    assert s.clipped(6000) == [(0, 6000)]
    assert s.clipped(0) == []
