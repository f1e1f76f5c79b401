"""qemu:dirty-bitmap:NAME contexts in the handshake: listing with qemu's queries, selection,
ids and reply order (what qemu-nbd 7.2 answers, as tests/interop/test_dirty_bitmap.py checks
against a real qemu-nbd)."""

from __future__ import annotations

import pytest

from blockvirt.nbd.constants import BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH, Opt, Rep
from blockvirt.nbd.contexts import dirty_bitmap_context, dirty_bitmap_name
from blockvirt.nbd.events import ExportInfo, Negotiated
from blockvirt.nbd.handshake import CONTEXT_IDS, FIRST_DYNAMIC_CONTEXT_ID
from tests.helpers import FakeCatalog, NbdPair

S1, S2 = "qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"
ALL = (BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH, S1, S2)


def pair() -> NbdPair:
    p = NbdPair(FakeCatalog(ExportInfo("v", 1 << 20, contexts=ALL), ExportInfo("v@s1", 1 << 20)))
    _, res = p.option(Opt.STRUCTURED_REPLY)
    assert res.reply == Rep.ACK
    return p


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        ([], list(ALL)),
        (["qemu:"], [QEMU_ALLOCATION_DEPTH, S1, S2]),
        (["qemu:dirty-bitmap:"], [S1, S2]),
        ([S2], [S2]),
        ([S2, BASE_ALLOCATION], [BASE_ALLOCATION, S2]),  # the export's order, as qemu-nbd
        (["qemu:dirty"], []),
        (["qemu:dirty-bitmap:nope"], []),
        (["qemu:dirty-bitmap:", S1], [S1, S2]),
    ],
)
def test_list_meta_context(queries: list[str], listed: list[str]) -> None:
    _, res = pair().meta("v", queries, list_only=True)
    assert res.reply == Rep.ACK
    assert res.contexts == tuple((0, name) for name in listed)


def test_set_meta_context_gives_bitmaps_ids_after_the_fixed_ones() -> None:
    p = pair()
    _, res = p.meta("v", [S2, "qemu:dirty-bitmap:", BASE_ALLOCATION, S1, "qemu:"])
    assert res.reply == Rep.ACK
    want = ((1, BASE_ALLOCATION), (3, S1), (4, S2))
    assert res.contexts == want
    assert CONTEXT_IDS[BASE_ALLOCATION] == 1 and FIRST_DYNAMIC_CONTEXT_ID == 3
    events, _ = p.go("v")
    neg = events[0]
    assert isinstance(neg, Negotiated)
    assert neg.contexts == dict(want)


def test_a_bitmap_alone_gets_the_first_dynamic_id() -> None:
    p = pair()
    _, res = p.meta("v", [S2])
    assert res.contexts == ((3, S2),)


def test_a_snapshot_export_without_older_snapshots_selects_nothing() -> None:
    p = pair()
    _, res = p.meta("v@s1", [S1, "qemu:dirty-bitmap:"])
    assert res.reply == Rep.ACK and res.contexts == ()


def test_context_names() -> None:
    assert dirty_bitmap_context("s1") == S1
    assert dirty_bitmap_name(S1) == "s1"
    assert dirty_bitmap_name("qemu:dirty-bitmap:") is None
    assert dirty_bitmap_name(QEMU_ALLOCATION_DEPTH) is None
    assert dirty_bitmap_name("qemu:dirty-bitmap:a:b") == "a:b"
