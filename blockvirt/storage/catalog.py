"""Volume and pool metadata in SQLite (WAL, synchronous=FULL): the durable source of truth.

Pure bookkeeping with blocking calls; the async `VolumeManager` runs it off the loop.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # used with fullmatch ($ allows "\n")
SECTOR = 512
#: ext4's largest file is 16 TiB; refuse early and clearly rather than fail in ftruncate.
MAX_VOLUME_SIZE = 16 * 2**40 - 4096
DEFAULT_POOL = "default"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    thick INTEGER NOT NULL,
    pool TEXT NOT NULL REFERENCES pools(name),
    file TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class CatalogError(Exception):
    """A management request cannot be done; `kind` picks the HTTP status at the API."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "invalid" | "not-found" | "conflict" | "no-space"
        self.message = message


def validate_name(name: str, what: str = "volume") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise CatalogError(
            "invalid",
            f"invalid {what} name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    return name


def validate_size(size: int) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise CatalogError("invalid", f"invalid size {size!r}: must be a positive number of bytes")
    if size % SECTOR:
        raise CatalogError("invalid", f"invalid size {size}: must be a multiple of {SECTOR} bytes")
    if size > MAX_VOLUME_SIZE:
        raise CatalogError("invalid", f"invalid size {size}: the largest volume is {MAX_VOLUME_SIZE} bytes")
    return size


@dataclass(frozen=True, slots=True)
class PoolRecord:
    name: str
    path: str
    created: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    name: str
    size: int
    thick: bool
    pool: str
    file: str  # file name inside the pool directory
    created: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Catalog:
    def __init__(self, data_dir: str) -> None:
        self.data_dir = os.path.abspath(data_dir)
        os.makedirs(self.data_dir, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(
            os.path.join(self.data_dir, "catalog.sqlite"), check_same_thread=False, isolation_level=None
        )
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)
        if self.pool(DEFAULT_POOL) is None:
            self.add_pool(DEFAULT_POOL, os.path.join(self.data_dir, "pools", DEFAULT_POOL))

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ pools
    def add_pool(self, name: str, path: str) -> PoolRecord:
        validate_name(name, "pool")
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        rec = PoolRecord(name, path, time.time())
        with self._lock:
            try:
                self.db.execute("INSERT INTO pools VALUES (?, ?, ?)", (rec.name, rec.path, rec.created))
            except sqlite3.IntegrityError:
                raise CatalogError("conflict", f"pool {name!r} or path {path!r} already exists") from None
        return rec

    def pool(self, name: str) -> PoolRecord | None:
        row = self.db.execute("SELECT name, path, created FROM pools WHERE name = ?", (name,)).fetchone()
        return PoolRecord(*row) if row else None

    def pools(self) -> list[PoolRecord]:
        return [
            PoolRecord(*r) for r in self.db.execute("SELECT name, path, created FROM pools ORDER BY name")
        ]

    # ------------------------------------------------------------ volumes
    def volume(self, name: str) -> VolumeRecord | None:
        row = self.db.execute(
            "SELECT name, size, thick, pool, file, created FROM volumes WHERE name = ?", (name,)
        ).fetchone()
        return _volume(row) if row else None

    def volumes(self) -> list[VolumeRecord]:
        rows = self.db.execute("SELECT name, size, thick, pool, file, created FROM volumes ORDER BY name")
        return [_volume(r) for r in rows]

    def new_volume(self, name: str, size: int, thick: bool, pool: str) -> VolumeRecord:
        """Validate and reserve a record (not yet stored): the caller creates the file first."""
        validate_name(name)
        validate_size(size)
        if self.pool(pool) is None:
            raise CatalogError("not-found", f"no pool named {pool!r}")
        if self.volume(name) is not None:
            raise CatalogError("conflict", f"volume {name!r} already exists")
        return VolumeRecord(name, size, thick, pool, f"{uuid.uuid4().hex}.raw", time.time())

    def insert_volume(self, rec: VolumeRecord) -> None:
        with self._lock:
            try:
                self.db.execute(
                    "INSERT INTO volumes VALUES (?, ?, ?, ?, ?, ?)",
                    (rec.name, rec.size, int(rec.thick), rec.pool, rec.file, rec.created),
                )
            except sqlite3.IntegrityError:
                raise CatalogError("conflict", f"volume {rec.name!r} already exists") from None

    def delete_volume(self, name: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM volumes WHERE name = ?", (name,))

    def volume_path(self, rec: VolumeRecord) -> str:
        pool = self.pool(rec.pool)
        assert pool is not None, "foreign key guarantees the pool"
        return os.path.join(pool.path, rec.file)


def _volume(row: tuple[Any, ...]) -> VolumeRecord:
    name, size, thick, pool, file, created = row
    return VolumeRecord(name, size, bool(thick), pool, file, created)


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE | re.ASCII)


def parse_size(text: str | int) -> int:
    """'512M', '10G', '1T', '1.5G', '4096' -> bytes (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise CatalogError("invalid", f"invalid size {text!r}: use a number with an optional unit K, M, G, T")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value != int(value):
        raise CatalogError("invalid", f"invalid size {text!r}: not a whole number of bytes")
    return int(value)
