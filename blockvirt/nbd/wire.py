"""Fixed-size wire headers as precompiled structs (all big-endian), and pure pack helpers."""

from __future__ import annotations

import struct

from blockvirt.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ReplyFlag,
    ReplyType,
)

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
#: A chunk header and the u64 offset of an OFFSET_DATA chunk, packed at once (every READ reply).
DATA_CHUNK = struct.Struct(">IHHQIQ")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
OFFSET_HOLE = struct.Struct(">QI")
ERROR_HEAD = struct.Struct(">IH")
EXTENT = struct.Struct(">II")

_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_OFFSET_HOLE = int(ReplyType.OFFSET_HOLE)


def greeting(hflags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, hflags)


def option(opt: int, data: bytes = b"") -> bytes:
    return OPTION.pack(IHAVEOPT, opt, len(data)) + data


def option_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, rep, len(data)) + data


def request(cmd: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, rtype: int, length: int, done: bool) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, _DONE if done else 0, rtype, cookie, length)


def data_chunk_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """Header plus the u64 offset of an OFFSET_DATA chunk; the caller appends `length` bytes."""
    flags = _DONE if done else 0
    return DATA_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie, length + 8, offset)


def hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, _DONE if done else 0, _OFFSET_HOLE, cookie, 12
    ) + OFFSET_HOLE.pack(offset, length)


def error_chunk(cookie: int, errno: int, message: str, done: bool = True) -> bytes:
    msg = utf8_prefix(message, 1000)  # qemu drops non-data payloads above ~1000 bytes
    payload = ERROR_HEAD.pack(errno, len(msg)) + msg
    return chunk_header(cookie, ReplyType.ERROR, len(payload), done) + payload


def lp_string(s: str) -> bytes:
    """u32 length-prefixed UTF-8 string."""
    b = s.encode()
    return U32.pack(len(b)) + b


def utf8_prefix(text: str, limit: int) -> bytes:
    """At most `limit` bytes of UTF-8, never cutting a character in half."""
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()
