"""Latency-aware admission (SIOC / PARDA), pure: time and measurements are arguments.

An operator who does not know a pool's capacity sets a latency target instead. The pool then
has a window: how many requests may be in its backend at once. Every period the controller
looks at the backend latency of the requests that completed in it (its 95th percentile: the
target is one that 95 % of requests meet, not an average that hides a tail) and applies
PARDA's window law,

    W <- (1 - g)·W + g·(target / latency · W + beta),

which settles where latency is about the target (W·target/(W - beta) ~ target). The queue
then builds in the scheduler, where shares, reservations and limits decide the order, and not
in the device, which serves first come first served. Throughput stays what the device can do
as long as the window keeps it busy: a window is a queue depth, not a rate. While latency is
well below the target and the window is not what holds anything back, it is lifted.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

PERIOD = 0.25
GAIN = 0.5
BETA = 1.0
MIN_WINDOW = 2.0
MAX_WINDOW = 4096.0
#: The percentile of a period's latencies that is held to the target.
PERCENTILE = 0.95
#: At most this many latencies are kept per period (a uniform sample beyond that).
SAMPLES = 2048


@dataclass(slots=True)
class LatencyControl:
    target: float  # seconds
    window: float = math.inf  # requests in flight allowed (inf: not limiting)
    _samples: list[float] = field(default_factory=list)
    _n: int = 0
    last_latency: float = 0.0  # the last period's 95th percentile
    _rng: random.Random = field(default_factory=lambda: random.Random(7))

    def observe(self, seconds: float) -> None:
        self._n += 1
        if len(self._samples) < SAMPLES:
            self._samples.append(seconds)
        else:  # reservoir sampling: every latency of the period equally likely to be kept
            i = self._rng.randrange(self._n)
            if i < SAMPLES:
                self._samples[i] = seconds

    def update(self, peak_inflight: int) -> float:
        """End of a period (`peak_inflight`: the most requests in flight during it): returns
        the new window."""
        samples = self._samples
        self._samples, self._n = [], 0
        if not samples:
            return self.window  # nothing completed: nothing learned
        samples.sort()
        latency = samples[min(len(samples) - 1, int(PERCENTILE * len(samples)))]
        self.last_latency = latency
        w = self.window if math.isfinite(self.window) else max(float(peak_inflight), MIN_WINDOW)
        new = (1 - GAIN) * w + GAIN * (self.target / latency * w + BETA)
        new = min(MAX_WINDOW, max(MIN_WINDOW, new))
        if latency < self.target / 2 and new > 2 * max(peak_inflight, MIN_WINDOW):
            new = math.inf  # far from the target and not binding: no window
        self.window = new
        return new
