"""Per-export counters and latency histograms, bumped on the data path with plain integer
arithmetic (no locks: one event loop owns them) and read by the metrics collector and the
stats API at scrape time."""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

#: Histogram bucket upper bounds in seconds: 50 us to 5 s.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125,
    0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
_FIRST_BOUND = LATENCY_BOUNDS[0]


@dataclass(slots=True)
class Latency:
    """Non-cumulative bucket counts (the last one is +Inf) and the sum of observations."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        if seconds <= _FIRST_BOUND:  # most requests (page-cache hits): no search
            self.counts[0] += 1
        else:
            self.counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        out, acc = [], 0
        for c in self.counts:
            acc += c
            out.append(acc)
        return out


@dataclass(slots=True)
class VolumeStats:
    """Counters of one export. Requests count when answered; bytes count for successful
    reads and writes. With `enabled` false (`serve --no-metrics`) the dispatcher counts only
    errors (rare): no per-request counters, not even a clock read."""

    read_bytes: int = 0
    write_bytes: int = 0
    errors: int = 0
    #: Completed requests by command: their service times (a request's count is its
    #: histogram's count) ...
    latency: dict[str, Latency] = field(default_factory=dict)
    #: ... and requests that passed validation but failed in storage.
    failed: dict[str, int] = field(default_factory=dict)
    enabled: bool = True
    #: When counting started (the export was opened): the counters are absolute since then.
    since: float = field(default_factory=time.time)

    @property
    def ops(self) -> dict[str, int]:
        """Requests by command, counted when answered (successes and storage failures; a
        request refused by validation counts as an error only). Derived when read: the data
        path bumps each histogram once and keeps no separate counter."""
        out = {op: n for op, lat in self.latency.items() if (n := lat.count)}
        for op, n in self.failed.items():
            out[op] = out.get(op, 0) + n
        return out

    def fail(self, op: str) -> None:
        """A request that passed validation failed in storage (rare)."""
        self.errors += 1
        self.failed[op] = self.failed.get(op, 0) + 1

    def latency_of(self, op: str) -> Latency:
        """The histogram of `op`, created empty on first use (the dispatcher keeps the hot
        ones at hand so the fast path skips this lookup)."""
        lat = self.latency.get(op)
        if lat is None:
            lat = self.latency[op] = Latency()
        return lat

    def observe(self, op: str, seconds: float) -> None:
        self.latency_of(op).observe(seconds)

    @property
    def busy_seconds(self) -> float:
        """Seconds spent serving requests (sum of latencies: can exceed wall time under load).
        Derived when read, so the data path adds each latency once, not twice."""
        return sum(lat.total for lat in self.latency.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "ops": self.ops,
            "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes,
            "errors": self.errors,
            "busy_seconds": round(self.busy_seconds, 6),
            "latency": {
                op: {"count": lat.count, "sum_seconds": round(lat.total, 6)}
                for op, lat in sorted(self.latency.items())
            },
        }
