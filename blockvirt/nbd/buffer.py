"""Receive buffer with exact-N extraction (pure; no I/O)."""

from __future__ import annotations

_COMPACT_AT = 256 * 1024


class ReceiveBuffer:
    """Bytes received but not yet parsed. `pos` advances as messages are taken."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.pos and self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
        self.buf += data

    def __len__(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int) -> bytes:
        """Remove and return exactly n bytes; the caller checked len() first."""
        pos = self.pos
        out = bytes(self.buf[pos : pos + n])
        self.advance(n)
        return out

    def advance(self, n: int) -> None:
        self.pos += n
        if self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
        elif self.pos > _COMPACT_AT:
            del self.buf[: self.pos]
            self.pos = 0

    def skip(self, n: int) -> int:
        """Discard up to n buffered bytes; returns how many were discarded."""
        k = min(n, len(self))
        self.advance(k)
        return k
