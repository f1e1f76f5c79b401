"""Pacing a background copy to a byte rate. Time is read, not slept, in the policy: `delay`
says how long to wait before moving n bytes; only `__call__` sleeps."""

from __future__ import annotations

import asyncio
import time


class RateLimiter:
    """Paces a copy to `bps` bytes per second (0: unlimited)."""

    def __init__(self, bps: float) -> None:
        self.bps = bps
        self._next = 0.0  # when the next byte may move

    def delay(self, nbytes: int, now: float) -> float:
        if self.bps <= 0:
            return 0.0
        start = max(self._next, now - 0.05)  # a late start does not bank more than 50 ms
        self._next = start + nbytes / self.bps
        return max(0.0, start - now)

    async def __call__(self, nbytes: int) -> None:
        wait = self.delay(nbytes, time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)
