"""On-disk layout of a layer's map journal (pure encode/decode; docs/cow-format.md describes it).

    header   4096 bytes: magic "BVLAYER1", version, flags, block size, layer id, CRC32
    batch    magic "BVJT", entry count, sequence number, CRC32 over all of it, then
             entries of (u64 cluster, u16 data mask, u16 zero mask): a cluster's full state

A batch is one commit (one FLUSH). Replay applies batches in order and stops at the first
one that is torn or fails its CRC: everything after it was never acknowledged as durable.

The header is declared with construct (read and written once per layer open or create).
Batches stay precompiled `struct`s: one is encoded per commit, on the FLUSH path, and replay
unpacks up to 65536 entries per batch with `iter_unpack`, where a declarative parser per
entry costs ~100x more.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from construct import (
    Bytes,
    Checksum,
    ChecksumError,
    Const,
    ConstError,
    ConstructError,
    Int32ub,
    Int64ub,
    Padding,
    RawCopy,
    Struct,
    this,
)

MAGIC = b"BVLAYER1"
VERSION = 1
FLAG_ALL_DATA = 1  # thick layer: every block is DATA, no entries ever
HEADER_SIZE = 4096

#: The header block: the fields, their CRC32, zeros to HEADER_SIZE.
_HEADER_FIELDS = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "flags" / Int32ub,
    "block_size" / Int32ub,
    "reserved" / Int64ub,
    "layer_id" / Bytes(16),
)
_HEADER = Struct(
    "body" / RawCopy(_HEADER_FIELDS),
    "crc" / Checksum(Int32ub, zlib.crc32, this.body.data),
    Padding(HEADER_SIZE - _HEADER_FIELDS.sizeof() - 4),
)
BATCH_MAGIC = 0x42564A54  # "BVJT"
_BATCH = struct.Struct(">IIQI")  # magic, count, sequence, crc
_ENTRY = struct.Struct(">QHH")
BATCH_HEAD = _BATCH.size
ENTRY_SIZE = _ENTRY.size
#: Entries per batch: keeps one batch's size bounded (~768 KiB).
MAX_BATCH_ENTRIES = 65536


class LayoutError(Exception):
    """The file is not a layer map, or its header is damaged."""


@dataclass(frozen=True, slots=True)
class Header:
    flags: int
    block_size: int
    layer_id: bytes  # 16 bytes

    @property
    def all_data(self) -> bool:
        return bool(self.flags & FLAG_ALL_DATA)


def encode_header(h: Header) -> bytes:
    fields = {
        "version": VERSION,
        "flags": h.flags,
        "block_size": h.block_size,
        "reserved": 0,
        "layer_id": h.layer_id,
    }
    return bytes(_HEADER.build({"body": {"value": fields}}))


def decode_header(raw: bytes) -> Header:
    if len(raw) < _HEADER_FIELDS.sizeof() + 4:
        raise LayoutError("file too short for a layer header")
    try:
        # Only the fields and the CRC: the padding of a header read short is not checked.
        parsed = _HEADER.parse(bytes(raw[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0"))
    except ConstError:
        raise LayoutError("not a blockvirt layer map (bad magic)") from None
    except ChecksumError:
        raise LayoutError("layer header checksum mismatch") from None
    except ConstructError as e:
        raise LayoutError(f"unreadable layer header: {e}") from None
    fields = parsed.body.value
    if fields.version != VERSION:
        raise LayoutError(f"unsupported layer map version {fields.version}")
    return Header(fields.flags, fields.block_size, fields.layer_id)


def encode_batches(seq: int, entries: Iterable[tuple[int, int, int]]) -> tuple[bytes, int]:
    """Journal bytes for these entries (split into batches); returns (bytes, next seq)."""
    return frame_batches(seq, encode_entries(entries))


def encode_entries(entries: Iterable[tuple[int, int, int]]) -> bytes:
    """The entries' bytes, without batch framing (see frame_batches)."""
    return b"".join([_ENTRY.pack(c, d, z) for c, d, z in entries])


def frame_batches(seq: int, body: bytes) -> tuple[bytes, int]:
    """Entries' bytes (encode_entries) framed as batches of at most MAX_BATCH_ENTRIES, at
    least one; returns (bytes, next seq). No per-entry work, so a thread can do it without
    holding the interpreter long (the checksum releases it)."""
    out: list[bytes | memoryview] = []
    view = memoryview(body)
    step = MAX_BATCH_ENTRIES * ENTRY_SIZE
    for start in range(0, max(len(body), 1), step):
        part = view[start : start + step]
        count = len(part) // ENTRY_SIZE
        crc = zlib.crc32(part, zlib.crc32(_BATCH.pack(BATCH_MAGIC, count, seq, 0)))
        out += (_BATCH.pack(BATCH_MAGIC, count, seq, crc), part)
        seq += 1
    return b"".join(out), seq


@dataclass(slots=True)
class Replay:
    entries: list[tuple[int, int, int]]
    next_seq: int
    valid_end: int  # offset just after the last good batch
    torn: bool  # bytes after valid_end that are not a good batch


def decode_journal(raw: bytes, start: int = HEADER_SIZE) -> Replay:
    """Every entry of every good batch, in order, up to the first bad batch."""
    entries: list[tuple[int, int, int]] = []
    pos = start
    seq = 0
    expect: int | None = None
    while pos + BATCH_HEAD <= len(raw):
        magic, count, bseq, crc = _BATCH.unpack_from(raw, pos)
        end = pos + BATCH_HEAD + count * ENTRY_SIZE
        if magic != BATCH_MAGIC or count > MAX_BATCH_ENTRIES or end > len(raw):
            break
        if expect is not None and bseq != expect:
            break
        body = raw[pos + BATCH_HEAD : end]
        if zlib.crc32(body, zlib.crc32(_BATCH.pack(BATCH_MAGIC, count, bseq, 0))) != crc:
            break
        entries.extend(_ENTRY.iter_unpack(body))
        seq = bseq + 1
        expect = seq
        pos = end
    return Replay(entries, seq, pos, pos < len(raw))
