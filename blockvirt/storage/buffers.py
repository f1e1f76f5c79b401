"""Reusable large buffers for reads.

A fresh 1 MiB bytearray costs more than the read that fills it (zero-filling and page
faults: ~0.4 ms here). Read paths take buffers from here and the session hands them back
once the reply has left (when the transport copies what it cannot send at once). Buffers
may hold old data: whoever takes one must fill every byte.
"""

from __future__ import annotations

#: Buffers smaller than this are cheap to allocate and are not pooled.
MIN_POOLED = 64 * 1024
#: At most this many bytes are kept in the pool.
MAX_POOLED_BYTES = 64 * 1024 * 1024

_pool: dict[int, list[bytearray]] = {}
_pooled_bytes = 0


def get(n: int) -> bytearray:
    """A bytearray of exactly n bytes, not necessarily zeroed when n >= MIN_POOLED."""
    global _pooled_bytes
    if n >= MIN_POOLED:
        bufs = _pool.get(n)
        if bufs:
            _pooled_bytes -= n
            return bufs.pop()
    return bytearray(n)


def put(buf: bytearray) -> None:
    global _pooled_bytes
    n = len(buf)
    if n >= MIN_POOLED and _pooled_bytes + n <= MAX_POOLED_BYTES:
        _pool.setdefault(n, []).append(buf)
        _pooled_bytes += n


def trim() -> None:
    """Give the pooled buffers back (the data path is idle: the next burst reallocates)."""
    global _pooled_bytes
    _pool.clear()
    _pooled_bytes = 0


def zero(view: memoryview) -> None:
    """Fill a (possibly recycled) buffer region with zeros."""
    n = len(view)
    step = len(_ZEROS)
    for i in range(0, n, step):
        k = min(step, n - i)
        view[i : i + k] = _ZEROS[:k]


_ZEROS = bytes(1024 * 1024)
