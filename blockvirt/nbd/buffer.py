"""Receive buffer with exact-N extraction and a recv_into interface (pure; no I/O).

The bytes live in a bytearray of some capacity between `pos` (next unparsed byte) and `end`
(last received byte). `get_buffer()` hands out the free tail for the transport to fill
directly (asyncio's BufferedProtocol), so nothing is copied on the way in. The bytearray is
only resized or compacted inside `get_buffer()`/`feed()`, never while a caller could hold a
view of it.
"""

from __future__ import annotations

INITIAL_CAPACITY = 256 * 1024
#: get_buffer() always offers at least this much free space.
MIN_FREE = 64 * 1024


class ReceiveBuffer:
    __slots__ = ("buf", "end", "pos")

    def __init__(self, capacity: int = INITIAL_CAPACITY) -> None:
        self.buf = bytearray(capacity)
        self.pos = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.pos

    def _make_room(self, need: int) -> None:
        """Ensure `need` free bytes after `end`: compact first, grow if still short."""
        buf = self.buf
        if len(buf) - self.end >= need:
            return
        n = self.end - self.pos
        if self.pos:
            buf[:n] = buf[self.pos : self.end]
            self.pos, self.end = 0, n
        if len(buf) - n < need:
            buf.extend(bytes(need - (len(buf) - n)))

    def get_buffer(self, hint: int = -1) -> memoryview:
        """Free space for the transport to receive into; follow with buffer_updated(n)."""
        if len(self.buf) - self.end < (hint if hint > MIN_FREE else MIN_FREE):  # once per wake-up
            self._make_room(max(hint, MIN_FREE))
        return memoryview(self.buf)[self.end :]

    def buffer_updated(self, n: int) -> None:
        self.end += n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self._make_room(n)
        self.buf[self.end : self.end + n] = data
        self.end += n

    def take(self, n: int) -> bytes:
        """Remove and return exactly n bytes; the caller checked len() first."""
        pos = self.pos
        out = bytes(self.buf[pos : pos + n])
        self.advance(n)
        return out

    def take_into(self, dest: bytearray, n: int) -> None:
        """Move n buffered bytes to the start of `dest`."""
        pos = self.pos
        dest[:n] = memoryview(self.buf)[pos : pos + n]
        self.advance(n)

    def advance(self, n: int) -> None:
        self.pos += n
        if self.pos >= self.end:  # empty: rewind (no resize, so views stay valid)
            self.pos = self.end = 0

    def skip(self, n: int) -> int:
        """Discard up to n buffered bytes; returns how many were discarded."""
        k = min(n, len(self))
        self.advance(k)
        return k

    def shrink(self) -> None:
        """Give back memory after a large message, when nothing is buffered."""
        if self.end == 0 and len(self.buf) > INITIAL_CAPACITY:
            self.buf = bytearray(INITIAL_CAPACITY)
