"""Storage pools: where a backend keeps volumes (a directory of layer files, or a pool of a
distributed store), their operator settings, and their space.

Settings live in the catalog as one JSON object per pool (validated here, pure); space figures
come from the pool's backend (a file pool: statvfs and the layers blockvirt keeps there).
Watermarks turn "used" into a state operators and dashboards can alarm on: ok, warning,
critical. A thin pool can promise more than it holds (overcommit); that is allowed, and shown.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockvirt.storage import pooldirs
from blockvirt.storage.catalog import (
    DEFAULT_POOL,
    FILE_BACKEND,
    Catalog,
    CatalogError,
    PoolRecord,
    validate_name,
)
from blockvirt.storage.events import StorageEvents
from blockvirt.storage.work import JobHost

if TYPE_CHECKING:
    from blockvirt.storage.backend import Space, VolumeBackend

log = logging.getLogger("blockvirt.pools")

OK, WARNING, CRITICAL = "ok", "warning", "critical"
MIN_ALLOC_UNIT, MAX_ALLOC_UNIT = 64 << 10, 64 << 20
STATE_LEVEL = {OK: 0, WARNING: 1, CRITICAL: 2}


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """What an operator can set on a pool (`blockvirt pool set`)."""

    #: Used space (percent of the filesystem) at which the pool turns to warning / critical.
    warn_percent: float = 80.0
    critical_percent: float = 90.0
    #: QoS: what the pool can serve, in 4 KiB-equivalent I/Os per second (0: not limited).
    iops_capacity: float = 0.0
    #: QoS: cost model, cost of a request = (1 + bytes/S0) / (1 + 4096/S0) 4 KiB-equivalent I/Os.
    cost_s0: int = 6144
    #: QoS: latency (ms) above which the effective capacity shrinks (0: off).
    latency_target_ms: float = 0.0
    #: QoS: shares of background work (migration copies) against volumes (default 1000 each).
    background_shares: int = 100
    #: File pools: a thin volume's base layer grows by whole aligned units of this many bytes
    #: (0: by the file system's blocks). See docs/performance.md, "Allocating writes".
    alloc_unit: int = 1 << 20

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PoolSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def updated(self, changes: dict[str, Any]) -> PoolSettings:
        """A copy with `changes` applied, each checked; raises CatalogError('invalid')."""
        known = {f.name: f for f in dataclasses.fields(self)}
        values = self.to_dict()
        for key, value in changes.items():
            if key not in known:
                raise CatalogError("invalid", f"unknown pool setting {key!r}: use one of {', '.join(known)}")
            values[key] = _check_setting(key, value)
        new = PoolSettings(**values)
        if new.warn_percent > new.critical_percent:
            raise CatalogError(
                "invalid",
                f"warn_percent ({new.warn_percent:g}) must not exceed critical_percent "
                f"({new.critical_percent:g})",
            )
        return new


def _file_settings_only(backend: str, changes: dict[str, Any]) -> None:
    if backend != FILE_BACKEND and "alloc_unit" in changes:
        raise CatalogError(
            "invalid", "alloc_unit is a file pool's setting: an RBD pool's images take space by RADOS objects"
        )


def _check_setting(key: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CatalogError("invalid", f"pool setting {key!r} must be a number, not {value!r}")
    if key in ("warn_percent", "critical_percent"):
        if not 0 < value <= 100:
            raise CatalogError("invalid", f"{key} must be in (0, 100], not {value!r}")
        return float(value)
    if key == "iops_capacity":
        if not 0 <= value <= 1e9:
            raise CatalogError(
                "invalid", f"iops_capacity must be 0 (unlimited) or a positive rate, not {value}"
            )
        return float(value)
    if key == "latency_target_ms":
        if not 0 <= value <= 60_000:
            raise CatalogError("invalid", f"latency_target_ms must be 0 (off) or up to 60000, not {value}")
        return float(value)
    if key == "cost_s0":
        if not 512 <= value <= 64 * 2**20 or value != int(value):
            raise CatalogError(
                "invalid", f"cost_s0 must be a whole number of bytes in [512, 64M], not {value}"
            )
        return int(value)
    if key == "background_shares":
        if not 1 <= value <= 10_000 or value != int(value):
            raise CatalogError(
                "invalid", f"background_shares must be a whole number in [1, 10000], not {value}"
            )
        return int(value)
    if key == "alloc_unit":
        if value != 0 and (
            value != int(value)
            or not MIN_ALLOC_UNIT <= value <= MAX_ALLOC_UNIT
            or int(value) & (int(value) - 1)
        ):
            raise CatalogError(
                "invalid",
                f"alloc_unit must be 0 (the file system's blocks) or a power of two from 64K to 64M"
                f" bytes, not {value}",
            )
        return int(value)
    raise AssertionError(key)


def watermark_state(used_percent: float, settings: PoolSettings) -> str:
    if used_percent >= settings.critical_percent:
        return CRITICAL
    if used_percent >= settings.warn_percent:
        return WARNING
    return OK


def fs_space(path: str) -> tuple[int, int, int] | None:
    """(capacity, used, free-for-us) of the filesystem holding `path`, or None."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return (st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize)


class Pools:
    """Pool operations over the catalog. Deleting needs the pool empty and unused by jobs.
    Every change is announced (`StorageEvents.pool_changed`)."""

    def __init__(
        self,
        catalog: Catalog,
        backend_of: Callable[[PoolRecord], VolumeBackend],
        jobs: JobHost,
        events: StorageEvents,
        hidden: Callable[[str], list[tuple[str, str]]] = lambda pool: [],
    ) -> None:
        self.catalog = catalog
        self.backend_of = backend_of
        self.jobs = jobs
        self.events = events
        #: (volume, pool served instead) for the pool's volumes that another pool's hide.
        self.hidden = hidden
        self._states: dict[str, str] = {}  # last watermark state seen, to log transitions

    def require(self, name: str) -> PoolRecord:
        rec = self.catalog.pool(name)
        if rec is None:
            raise CatalogError("not-found", f"no pool named {name!r}")
        return rec

    def settings(self, name: str) -> PoolSettings:
        return PoolSettings.from_dict(self.require(name).settings)

    def create(self, name: str, path: str, settings: dict[str, Any] | None = None) -> PoolRecord:
        """A file pool in a new or empty directory that no other pool reaches (symlinks and
        bind mounts included: see pooldirs)."""
        validate_name(name, "pool")
        if not isinstance(path, str) or not path or "\0" in path:
            raise CatalogError("invalid", "pool path must be a non-empty directory path")
        full = os.path.abspath(path)
        checked = PoolSettings().updated(settings or {})
        if _holds(full, self.catalog.data_dir):
            raise CatalogError("conflict", f"path {path!r} is or holds the data directory")
        for other in self.catalog.pools():
            if other.path and pooldirs.overlap(full, other.path):
                raise CatalogError(
                    "conflict", f"path {path!r} overlaps pool {other.name!r}: pools may not nest"
                )
        if os.path.exists(full):
            if not os.path.isdir(full):
                raise CatalogError("invalid", f"pool path {path!r} exists and is not a directory")
            if os.listdir(full):
                raise CatalogError(
                    "conflict", f"pool path {path!r} is not empty: use a new or empty directory"
                )
        self.events.check_pool_settings(name, checked)
        made = _missing_dirs(full)
        try:
            rec = self.catalog.add_pool(name, full)
        except BaseException:
            _remove_empty(made)  # the directories this call made, and only if still empty
            raise
        if checked != PoolSettings():
            self.catalog.set_pool_settings(name, checked.to_dict())
        self.events.pool_changed(name)
        return self.require(rec.name)

    async def attach(
        self,
        name: str,
        backend: str,
        config: dict[str, Any],
        settings: dict[str, Any] | None = None,
    ) -> PoolRecord:
        """A pool whose storage is elsewhere (an RBD pool: `config` says which Ceph pool and
        how to reach it). The backend checks it can be used before the catalog records it."""
        validate_name(name, "pool")
        if self.catalog.pool(name) is not None:
            raise CatalogError("conflict", f"pool {name!r} already exists")
        _file_settings_only(backend, settings or {})
        checked = PoolSettings().updated(settings or {})
        rec = PoolRecord(name, "", time.time(), checked.to_dict(), backend, config)
        store = self.backend_of(rec)
        self.events.check_pool_settings(name, checked)
        await store.attach(rec)
        try:
            self.catalog.insert_pool(rec)
        except BaseException:
            await store.detach(name)
            raise
        self.events.pool_changed(name)
        return rec

    def update(self, name: str, changes: dict[str, Any]) -> PoolRecord:
        rec = self.require(name)
        _file_settings_only(rec.backend, changes)
        new = PoolSettings.from_dict(rec.settings).updated(changes)
        self.events.check_pool_settings(name, new)
        self.catalog.set_pool_settings(name, new.to_dict())
        self.events.pool_changed(name)
        return self.require(name)

    async def delete(self, name: str, *, force: bool = False) -> None:
        """Forget an empty pool. One not reached since the start cannot be seen to be empty:
        if it held volumes when last reached, only `force` detaches it (its storage keeps
        them, and attaching it again brings them back)."""
        rec = self.require(name)
        if name == DEFAULT_POOL:
            raise CatalogError("conflict", "the default pool cannot be deleted")
        used = self.backend_of(rec).pool_in_use(name)
        if used is not None:
            raise CatalogError("conflict", f"pool {name!r} still holds {used}: move or delete them first")
        last_seen = self.last_seen(rec)
        if last_seen and not force:
            raise CatalogError(
                "conflict",
                f"pool {name!r} cannot be reached now; when last reached it held volumes "
                f"{', '.join(sorted(last_seen))}: delete them once it is back, or detach it anyway "
                "with --force (its storage keeps them)",
            )
        for job in self.jobs.running():
            if job.params.get("pool") == name:
                raise CatalogError("conflict", f"job {job.id} ({job.kind}) is moving data into pool {name!r}")
        self.catalog.delete_pool(name)
        await self.backend_of(rec).detach(name)
        self.events.pool_changed(name)
        # The directory is the operator's: remove it only if we left it empty.
        if rec.path:
            try:
                os.rmdir(rec.path)
            except OSError:
                pass

    def last_seen(self, rec: PoolRecord) -> set[str] | None:
        """The volume names of a pool not reached since the start, as last read; None if
        its volumes are listed now."""
        if self.backend_of(rec).listed(rec.name):
            return None
        return self.catalog.remembered_names(rec.name)

    def space(self, rec: PoolRecord) -> Space:
        return self.backend_of(rec).space(rec)

    def info(self, rec: PoolRecord) -> dict[str, Any]:
        settings = PoolSettings.from_dict(rec.settings)
        sp = self.space(rec)
        used_pct = sp.used_percent
        state = watermark_state(used_pct, settings) if used_pct is not None else CRITICAL
        warnings = []
        error = self.backend_of(rec).pool_error(rec.name)
        if error is not None:
            warnings.append(f"pool storage is unreachable: {error}")
        elif used_pct is None:
            warnings.append(
                # Reachable, but its space not reported yet (a Ceph pool before its mgr has).
                "pool space is not known yet" if not rec.path else "pool directory is unreachable"
            )
        elif state != OK:
            limit = settings.critical_percent if state == CRITICAL else settings.warn_percent
            warnings.append(f"{used_pct:.1f}% used, above the {state} watermark ({limit:g}%)")
        if sp.overcommit is not None and sp.overcommit > 1.0:
            warnings.append(f"thin volumes promise {sp.overcommit:.2f}x the pool's capacity")
        for volume, visible in self.hidden(rec.name):
            warnings.append(f"volume {volume} is hidden by the volume of the same name in pool {visible}")
        last_seen = self.last_seen(rec)
        if last_seen is None:
            volumes = sum(1 for v in self.backend_of(rec).volumes() if v.pool == rec.name)
        else:  # not reached since the start: its volumes as last seen
            volumes = len(last_seen)
            if last_seen:
                warnings.append(f"{volumes} volume(s) as last seen, unavailable until it is reached")
        self._note_state(rec.name, state, warnings)
        return {
            "name": rec.name,
            "backend": rec.backend,
            "path": rec.path,
            "created": rec.created,
            "capacity": sp.capacity,
            "used": sp.used,
            "free": sp.free,
            "used_percent": round(used_pct, 2) if used_pct is not None else None,
            "allocated": sp.allocated,
            "provisioned": sp.provisioned,
            "overcommit": round(sp.overcommit, 4) if sp.overcommit is not None else None,
            "volumes": volumes,
            "state": state,
            "warnings": warnings,
            "settings": settings.to_dict(),
            **({"rbd": rec.config} if rec.backend != "file" else {}),
            **({"error": error} if error is not None else {}),
        }

    def _note_state(self, name: str, state: str, warnings: list[str]) -> None:
        """Log a watermark crossing once, when it happens (not at every look)."""
        before = self._states.get(name, OK)
        self._states[name] = state
        if state != before:
            level = logging.WARNING if STATE_LEVEL[state] > STATE_LEVEL[before] else logging.INFO
            log.log(level, "pool %s: %s -> %s (%s)", name, before, state, "; ".join(warnings) or "ok",
                    extra={"pool": name})  # fmt: skip


def _holds(outer: str, inner: str) -> bool:
    """Whether directory `outer` is `inner` or one of its parents, by name or for real."""
    pairs = ((os.path.abspath(outer), os.path.abspath(inner)), (pooldirs.real(outer), pooldirs.real(inner)))
    return any((i.rstrip(os.sep) + os.sep).startswith(o.rstrip(os.sep) + os.sep) for o, i in pairs)


def _missing_dirs(path: str) -> list[str]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    out = []
    while not os.path.lexists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def _remove_empty(dirs: list[str]) -> None:
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            return  # not empty (or not ours any more): neither are its parents
