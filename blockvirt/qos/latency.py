"""Latency-aware capacity (SIOC / PARDA), pure: time and measurements are arguments.

An operator who does not know a pool's capacity sets a latency target instead. Every period
the controller looks at the mean backend latency of the requests that completed in it:
  - above the target, the pool's effective capacity shrinks toward what keeps latency at the
    target (PARDA's window law: C <- (1 - g)·C + g·(target/latency·C)), starting from what
    was actually served, so the queue builds in the scheduler, where shares decide, not in
    the device, where it is first come first served;
  - at or below it, the capacity grows again (multiplicatively, from what is served), and
    once it is well above what the pool is asked for, the cap is lifted altogether.
A configured capacity is an upper bound the controller never exceeds.
"""

from __future__ import annotations

from dataclasses import dataclass

PERIOD = 0.25
GAIN = 0.5
GROWTH = 1.1
MIN_CAPACITY = 50.0
#: Lifted once the cap is this many times what was served (and latency is fine).
UNCAP_AT = 4.0


@dataclass(slots=True)
class LatencyControl:
    target: float  # seconds
    ceiling: float = 0.0  # the configured capacity (0: none)
    capacity: float = 0.0  # current effective capacity (0: not capped)
    _sum: float = 0.0
    _n: int = 0
    _served: float = 0.0  # cost units dispatched in the period
    last_latency: float = 0.0

    def observe(self, seconds: float) -> None:
        self._sum += seconds
        self._n += 1

    def served(self, cost: float) -> None:
        self._served += cost

    def update(self, period: float) -> float:
        """End of a period: returns the new effective capacity (0: no cap)."""
        n, mean = self._n, (self._sum / self._n if self._n else 0.0)
        rate = self._served / period if period > 0 else 0.0
        self._sum, self._n, self._served = 0.0, 0, 0.0
        if not n:
            return self.capacity  # nothing measured: keep what we have
        self.last_latency = mean
        cap = self.capacity or self.ceiling or 0.0
        if mean > self.target:
            base = min(cap, rate) if cap else rate
            base = max(base, MIN_CAPACITY)
            new = (1 - GAIN) * base + GAIN * base * self.target / mean
            self.capacity = max(MIN_CAPACITY, new)
        elif self.capacity:
            grown = max(self.capacity, rate) * GROWTH
            if self.ceiling and grown >= self.ceiling:
                self.capacity = self.ceiling
            elif not self.ceiling and grown > UNCAP_AT * max(rate, MIN_CAPACITY):
                self.capacity = 0.0
            else:
                self.capacity = grown
        if self.ceiling and (not self.capacity or self.capacity > self.ceiling):
            self.capacity = self.ceiling
        return self.capacity
