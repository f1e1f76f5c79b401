"""The layer map's header and journal batches, byte for byte (docs/cow-format.md)."""

from __future__ import annotations

import struct
import zlib

import pytest

from blockvirt.storage.backends.cowfile import layout

LAYER_ID = bytes(range(16))


def handmade_header(flags: int, block_size: int, version: int = 1) -> bytes:
    """The header as docs/cow-format.md spells it, written out with struct."""
    body = b"BVLAYER1" + struct.pack(">IIIQ", version, flags, block_size, 0) + LAYER_ID
    raw = body + struct.pack(">I", zlib.crc32(body))
    return raw + bytes(4096 - len(raw))


@pytest.mark.parametrize("flags", [0, layout.FLAG_ALL_DATA])
def test_header_bytes_as_documented(flags: int) -> None:
    raw = layout.encode_header(layout.Header(flags, 65536, LAYER_ID))
    assert raw == handmade_header(flags, 65536)
    h = layout.decode_header(handmade_header(flags, 4096))
    assert (h.flags, h.block_size, h.layer_id, h.all_data) == (flags, 4096, LAYER_ID, bool(flags))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: b"BVLAYER2" + raw[8:], "bad magic"),
        (lambda raw: raw[:20] + bytes([raw[20] ^ 1]) + raw[21:], "checksum mismatch"),
        (lambda raw: raw[:30], "too short"),
        (lambda raw: handmade_header(0, 65536, version=2), "unsupported layer map version 2"),
    ],
)
def test_damaged_header_is_named(damage, message: str) -> None:  # type: ignore[no-untyped-def]
    raw = handmade_header(0, 65536)
    with pytest.raises(layout.LayoutError, match=message):
        layout.decode_header(damage(raw))


def test_batches_replay_and_stop_at_a_torn_one() -> None:
    entries = [(1, 0xFFFF, 0), (7, 0x00F0, 0x000F)]
    raw, seq = layout.encode_batches(0, entries)
    more, seq2 = layout.encode_batches(seq, [(9, 1, 0)])
    journal = layout.encode_header(layout.Header(0, 65536, LAYER_ID)) + raw + more
    replay = layout.decode_journal(journal)
    assert (replay.entries, replay.next_seq, replay.torn) == ([*entries, (9, 1, 0)], seq2, False)
    torn = layout.decode_journal(journal[:-1])
    assert (torn.entries, torn.next_seq, torn.torn, torn.valid_end) == (entries, seq, True, 4096 + len(raw))
