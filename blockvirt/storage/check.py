"""What the offline check (`blockvirt check`) found: one report for a data directory, which
each backend's checker adds to (file pools: storage/backends/cowfile/check.py; RBD pools:
storage/backends/rbd/check.py).

Damage (exit status 1) is what makes data or the catalog wrong; what could not be checked at
all (a Ceph cluster that cannot be reached) is listed apart, as unchecked, and exits 1 too:
nothing can be said of it, but it is no reason to repair. Leaks are space nothing uses; notes
are harmless. What `--repair` fixed is listed under repaired, and is no longer counted as
damage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Report:
    damage: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    layers: int = 0
    volumes: int = 0

    @property
    def damaged(self) -> bool:
        """Not known to be sound: damage found, or a part could not be checked (exit 1)."""
        return bool(self.damage or self.unchecked)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.damaged,
            "damage": self.damage,
            "unchecked": self.unchecked,
            "leaks": self.leaks,
            "notes": self.notes,
            "repaired": self.repaired,
            "layers": self.layers,
            "volumes": self.volumes,
        }

    def text(self) -> str:
        lines = [f"checked {self.volumes} volume(s), {self.layers} layer(s)"]
        lines += [f"DAMAGE: {d}" for d in self.damage]
        lines += [f"NOT CHECKED: {x}" for x in self.unchecked]
        lines += [f"leak: {x}" for x in self.leaks]
        lines += [f"note: {x}" for x in self.notes]
        lines += [f"repaired: {x}" for x in self.repaired]
        if self.damage:
            verdict = "damaged"
        elif self.unchecked:
            verdict = "not all checked"
        else:
            verdict = "clean" if not self.leaks else "clean (with leaks)"
        lines.append(verdict)
        return "\n".join(lines)
