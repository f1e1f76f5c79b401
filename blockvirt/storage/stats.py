"""Per-export counters and latency histograms, bumped on the data path with plain integer
arithmetic (no locks: one event loop owns them) and read by the metrics collector and the
stats API at scrape time."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

#: Histogram bucket upper bounds in seconds: 50 us to 5 s.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


@dataclass(slots=True)
class Latency:
    """Non-cumulative bucket counts (the last one is +Inf) and the sum of observations."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[int]:
        out, acc = [], 0
        for c in self.counts:
            acc += c
            out.append(acc)
        return out


@dataclass(slots=True)
class VolumeStats:
    ops: dict[str, int] = field(default_factory=dict)
    read_bytes: int = 0
    write_bytes: int = 0
    errors: int = 0
    #: Seconds spent serving requests (sum of latencies: can exceed wall time under load).
    busy_seconds: float = 0.0
    latency: dict[str, Latency] = field(default_factory=dict)

    def count(self, op: str) -> None:
        self.ops[op] = self.ops.get(op, 0) + 1

    def observe(self, op: str, seconds: float) -> None:
        lat = self.latency.get(op)
        if lat is None:
            lat = self.latency[op] = Latency()
        lat.observe(seconds)
        self.busy_seconds += seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": dict(self.ops),
            "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes,
            "errors": self.errors,
            "busy_seconds": round(self.busy_seconds, 6),
            "latency": {
                op: {"count": sum(lat.counts), "sum_seconds": round(lat.total, 6)}
                for op, lat in sorted(self.latency.items())
            },
        }
