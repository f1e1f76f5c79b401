"""What a request costs, in 4 KiB-equivalent I/Os (pure).

A request has a fixed cost (positioning, a round trip, a syscall) and one that grows with its
size. With S0 the size at which both are equal, cost(bytes) = (1 + bytes/S0), normalised so a
4 KiB request costs exactly 1: rates and capacities are then "4 KiB IOPS", and a 1 MiB read
costs (1 + 256·4096/S0) / (1 + 4096/S0), about 103 at the default S0 = 6 KiB (measured on
this kind of machine for the whole server path; `pool calibrate` measures a pool's device).
"""

from __future__ import annotations

from dataclasses import dataclass

UNIT = 4096


@dataclass(frozen=True, slots=True)
class CostModel:
    s0: int = 6144

    @property
    def _a(self) -> float:
        return 1.0 / (1.0 + UNIT / self.s0)

    def cost(self, nbytes: int) -> float:
        a = self._a
        return a + a * nbytes / self.s0

    def coefficients(self) -> tuple[float, float]:
        """(a, b) with cost = a + b·bytes: the hot path multiplies instead of dividing."""
        a = self._a
        return a, a / self.s0
