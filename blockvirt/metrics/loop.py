"""Event-loop health: how late a timer fires tells how long the loop was busy elsewhere.

A chain of `loop.call_later` timers, one every `interval` seconds; each measures the time
between when it was due and when it ran. A loop blocked by a slow callback (a blocking read,
a long computation) shows up here before clients notice. Started and stopped by the Service.
"""

from __future__ import annotations

import asyncio

from blockvirt.storage.stats import Latency

DEFAULT_INTERVAL = 0.25


class LoopLagMonitor:
    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        self.interval = interval
        #: Lag histogram (same buckets as request latency: 50 us to 5 s).
        self.lag = Latency()
        #: The most recent lag, in seconds.
        self.last = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        if self._handle is None:
            self._loop = asyncio.get_running_loop()
            self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        loop = self._loop
        assert loop is not None
        self._due = loop.time() + self.interval
        self._handle = loop.call_at(self._due, self._fire)

    def _fire(self) -> None:
        assert self._loop is not None
        # asyncio may run a timer up to its clock resolution early: never a negative lag.
        lag = max(0.0, self._loop.time() - self._due)
        self.last = lag
        self.lag.observe(lag)
        self._schedule()
