"""QoS settings of volumes and groups, and the rules that keep them consistent (pure).

Rules (refused with a clear message when broken):
  - a group's parent must exist, and groups form a tree (no cycles);
  - limits narrow down the tree: a node's effective limit is the smallest limit on its way
    to the root, and its reservation may not exceed it;
  - the reservations of a group's members (volumes and child groups) may not add up to more
    than the group's own reservation, when it has one;
  - in a pool with a capacity, the reservations at the top of its tree (a group with a
    reservation counts once, for all its members) may not add up to more than the capacity.
A group applies in every pool its volumes are in: each pool's scheduler has its own instance
(so a group's limit holds per pool). When a pool's effective capacity later drops below its
reservations (the operator lowers it, or latency control shrinks it), nothing is refused:
`qos show` flags the pool, and the scheduler serves reservations in proportion to their size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from blockvirt.qos.scheduler import DEFAULT_SHARES, Params
from blockvirt.storage.catalog import CatalogError

MAX_SHARES = 100_000
MAX_RATE = 1e9


@dataclass(frozen=True, slots=True)
class QosSettings:
    """One node's settings; 0 means none (shares 0: the default, 1000)."""

    shares: int = 0
    reservation: float = 0.0  # 4 KiB-equivalent IOPS
    limit: float = 0.0  # 4 KiB-equivalent IOPS
    bps_limit: float = 0.0  # bytes/s (volumes only)

    @property
    def effective_shares(self) -> int:
        return self.shares or int(DEFAULT_SHARES)

    def params(self) -> Params:
        return Params(float(self.effective_shares), self.reservation, self.limit, self.bps_limit)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QosSettings:
        return cls(**{k: raw[k] for k in ("shares", "reservation", "limit", "bps_limit") if k in raw})

    def updated(self, changes: dict[str, Any], *, group: bool) -> QosSettings:
        """Apply API changes ({"shares": 2000, "limit": 0, ...}); raises CatalogError."""
        out = self
        for key, value in changes.items():
            if key not in ("shares", "reservation", "limit", "bps_limit"):
                continue
            if key == "bps_limit" and group:
                raise CatalogError(
                    "invalid", "groups take shares, reservation and limit; bps_limit is per volume"
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise CatalogError("invalid", f"{key} must be a number, not {value!r}")
            if value < 0:
                raise CatalogError("invalid", f"{key} must be 0 (none) or positive, not {value}")
            if key == "shares":
                if value != int(value) or value > MAX_SHARES:
                    raise CatalogError(
                        "invalid", f"shares must be a whole number up to {MAX_SHARES}, not {value}"
                    )
                out = replace(out, shares=int(value))
            else:
                if value > MAX_RATE * (4096 if key == "bps_limit" else 1):
                    raise CatalogError("invalid", f"{key} {value} is out of range")
                fields: dict[str, Any] = {key: float(value)}
                out = replace(out, **fields)
        if out.limit and out.reservation > out.limit:
            raise CatalogError(
                "conflict", f"reservation ({out.reservation:g}) may not exceed the limit ({out.limit:g})"
            )
        return out


@dataclass(frozen=True, slots=True)
class GroupDef:
    name: str
    parent: str | None
    settings: QosSettings


@dataclass(frozen=True, slots=True)
class VolumeDef:
    name: str
    pool: str
    group: str | None
    settings: QosSettings


def effective_limit(groups: dict[str, GroupDef], group: str | None, own: float) -> float:
    """The smallest limit on the way from a node (own limit, in `group`) to the root; 0: none."""
    limits = [own] if own else []
    seen: set[str] = set()
    while group is not None and group not in seen:
        seen.add(group)
        g = groups[group]
        if g.settings.limit:
            limits.append(g.settings.limit)
        group = g.parent
    return min(limits) if limits else 0.0


def validate(
    groups: dict[str, GroupDef], volumes: dict[str, VolumeDef], capacities: dict[str, float]
) -> None:
    """Raise CatalogError('conflict'/'invalid') if the configuration breaks a rule."""
    for g in groups.values():
        seen = {g.name}
        cur = g.parent
        while cur is not None:
            if cur not in groups:
                raise CatalogError("not-found", f"group {g.name!r}: no parent group named {cur!r}")
            if cur in seen:
                raise CatalogError("invalid", f"group {g.name!r}: its parents form a cycle")
            seen.add(cur)
            cur = groups[cur].parent
    for v in volumes.values():
        if v.group is not None and v.group not in groups:
            raise CatalogError("not-found", f"volume {v.name!r}: no group named {v.group!r}")
    nodes: list[tuple[str, str | None, QosSettings]] = [
        *((f"group {g.name!r}", g.parent, g.settings) for g in groups.values()),
        *((f"volume {v.name!r}", v.group, v.settings) for v in volumes.values()),
    ]
    for what, parent, s in nodes:
        lim = effective_limit(groups, parent, s.limit)
        if s.reservation and lim and s.reservation > lim:
            raise CatalogError(
                "conflict",
                f"{what}: reservation {s.reservation:g} IOPS exceeds the limit it is under ({lim:g} IOPS)",
            )

    def needed(group: str) -> float:
        """What a group's members reserve (a member group with no reservation of its own
        passes on what its members need)."""
        total = sum(v.settings.reservation for v in volumes.values() if v.group == group)
        for x in groups.values():
            if x.parent == group:
                total += x.settings.reservation or needed(x.name)
        return total

    for g in groups.values():
        if g.settings.reservation and (need := needed(g.name)) > g.settings.reservation:
            raise CatalogError(
                "conflict",
                f"group {g.name!r}: its members reserve {need:g} IOPS, more than the group's "
                f"reservation ({g.settings.reservation:g} IOPS)",
            )
    for pool, cap in capacities.items():
        total = top_reservations(groups, volumes, pool)
        if cap and total > cap:
            raise CatalogError(
                "conflict",
                f"reservations in pool {pool!r} would add up to {total:g} IOPS, above its capacity "
                f"({cap:g} IOPS): lower them or raise the capacity",
            )


def top_reservations(groups: dict[str, GroupDef], volumes: dict[str, VolumeDef], pool: str) -> float:
    """What a pool must guarantee: reservations at the top of its tree."""
    members: dict[str | None, list[tuple[QosSettings, str | None]]] = {}
    for g in groups.values():
        members.setdefault(g.parent, []).append((g.settings, g.name))
    in_pool: dict[str | None, list[QosSettings]] = {}
    for v in volumes.values():
        if v.pool == pool:
            in_pool.setdefault(v.group, []).append(v.settings)

    def total(group: str | None) -> tuple[float, bool]:
        """(reservation needed below `group`, whether the pool has a volume below it)."""
        need = sum(s.reservation for s in in_pool.get(group, []))
        present = bool(in_pool.get(group))
        for s, name in members.get(group, []):
            sub, here = total(name)
            if here:
                present = True
                need += s.reservation or sub
        return need, present

    return total(None)[0]
