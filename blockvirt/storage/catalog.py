"""The node's metadata in SQLite (WAL, synchronous=FULL): the durable source of truth for its
pools and jobs, and for the volumes, layers, snapshots, access rules and QoS settings of its
file pools (the file backend's catalog).

Every SQL statement of the project is here, behind a named method. Changes that must be
atomic together go through `transaction()`, which yields a `Txn` with the named writes.
"""

from __future__ import annotations

import contextlib
import fractions
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
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
-- A copy-on-write layer: files <id>.data and <id>.map in its pool; parent is the next layer
-- down its chain (NULL for a base).
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,
    pool TEXT NOT NULL REFERENCES pools(name),
    parent TEXT REFERENCES layers(id),
    size INTEGER NOT NULL,
    thick INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    thick INTEGER NOT NULL,
    pool TEXT NOT NULL REFERENCES pools(name),
    head TEXT NOT NULL REFERENCES layers(id),
    created REAL NOT NULL
);
-- A snapshot names an immutable layer of a volume's tree.
CREATE TABLE IF NOT EXISTS snapshots (
    volume TEXT NOT NULL REFERENCES volumes(name),
    name TEXT NOT NULL,
    layer TEXT NOT NULL REFERENCES layers(id),
    created REAL NOT NULL,
    PRIMARY KEY (volume, name)
);
-- Long operations, persisted so they resume after a crash.
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    volume TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
"""

#: Changes to the schema above, in order: (user_version after it, SQL). A catalog made before
#: a change is brought up to date when opened, in one transaction per step. Append only.
_MIGRATIONS: list[tuple[int, str]] = [
    # Pool settings (QoS capacity, cost model, space watermarks) as one JSON object.
    (1, "ALTER TABLE pools ADD COLUMN settings TEXT NOT NULL DEFAULT '{}'"),
    # Per-volume access rules (blockvirt.server.acl). No foreign key: a later rebuild of the
    # volumes table must not cascade into them; deleting a volume deletes its rules.
    (
        2,
        """CREATE TABLE acl_rules (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            volume TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('cn', 'san', 'address')),
            value TEXT NOT NULL,
            read_only INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL,
            UNIQUE (volume, kind, value)
        )""",
    ),
    # QoS: groups (a tree) and each volume's settings, as JSON objects (blockvirt.qos.config).
    (
        3,
        """CREATE TABLE qos_groups (
            name TEXT PRIMARY KEY,
            parent TEXT,
            settings TEXT NOT NULL,
            created REAL NOT NULL
        )""",
    ),
    (
        4,
        """CREATE TABLE volume_qos (
            volume TEXT PRIMARY KEY,
            grp TEXT,
            settings TEXT NOT NULL
        )""",
    ),
    # The kind of storage behind each pool (the backend seam) and its connection settings;
    # every pool made before this step is a directory of copy-on-write files.
    (5, "ALTER TABLE pools ADD COLUMN backend TEXT NOT NULL DEFAULT 'file'"),
    (6, "ALTER TABLE pools ADD COLUMN config TEXT NOT NULL DEFAULT '{}'"),
    # A volume being moved in from another kind of storage (the id of the job moving it):
    # invisible until the move switches over.
    (7, "ALTER TABLE volumes ADD COLUMN incoming TEXT"),
    # Pools without a directory (RBD pools: path '') must not collide on the path's UNIQUE:
    # the table is rebuilt with a unique index on the paths of file pools only. Steps of
    # more than one statement run with foreign keys off (SQLite's table rebuild procedure:
    # layers and volumes refer to pools by name, and keep doing so).
    (
        8,
        """CREATE TABLE pools_new (
            name TEXT PRIMARY KEY,
            path TEXT NOT NULL,
            created REAL NOT NULL,
            settings TEXT NOT NULL DEFAULT '{}',
            backend TEXT NOT NULL DEFAULT 'file',
            config TEXT NOT NULL DEFAULT '{}'
        );
        INSERT INTO pools_new (name, path, created, settings, backend, config)
            SELECT name, path, created, settings, backend, config FROM pools;
        DROP TABLE pools;
        ALTER TABLE pools_new RENAME TO pools;
        CREATE UNIQUE INDEX pools_path ON pools (path) WHERE path != ''""",
    ),
    # The volume names last seen in each pool whose catalog lives in its own storage (RBD):
    # while such a pool cannot be reached, its names stay taken (VolumeManager).
    (
        9,
        """CREATE TABLE remote_names (
            pool TEXT NOT NULL,
            name TEXT NOT NULL,
            PRIMARY KEY (pool, name)
        )""",
    ),
]
SCHEMA_VERSION = _MIGRATIONS[-1][0]


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


#: The backend of a pool made with `--path`: a directory of copy-on-write layer files.
FILE_BACKEND = "file"


@dataclass(frozen=True, slots=True)
class PoolRecord:
    name: str
    #: The directory of a file pool ("" for pools whose storage is elsewhere).
    path: str
    created: float
    #: Operator settings (QoS capacity, cost model, watermarks); see blockvirt.storage.pools.
    settings: dict[str, Any] = field(default_factory=dict)
    #: The kind of storage (a backend's `kind`), and how to reach it (backend-specific).
    backend: str = FILE_BACKEND
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class VolumeRow:
    """A file pool's volume as its catalog holds it."""

    name: str
    size: int
    thick: bool
    pool: str
    head: str  # layer id of the writable head
    created: float
    #: The migration job moving it in (invisible until it switches over), or None.
    incoming: str | None = None


@dataclass(frozen=True, slots=True)
class LayerRecord:
    id: str
    pool: str
    parent: str | None
    size: int
    thick: bool
    created: float


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    """A file pool's snapshot: a name for an immutable layer of its volume's tree."""

    volume: str
    name: str
    layer: str
    created: float


@dataclass(frozen=True, slots=True)
class AclRecord:
    """One access rule of a volume (see blockvirt.server.acl for what it means)."""

    id: int
    volume: str
    kind: str  # cn | san | address
    value: str
    read_only: bool
    created: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    kind: str
    volume: str
    state: str
    params: str
    done: int
    total: int
    error: str
    created: float
    updated: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_layer_id() -> str:
    return uuid.uuid4().hex


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
        self._side: sqlite3.Connection | None = None  # see transaction_off_loop
        self.db.executescript(_SCHEMA)
        self._migrate()
        if self.pool(DEFAULT_POOL) is None:
            self.add_pool(DEFAULT_POOL, os.path.join(self.data_dir, "pools", DEFAULT_POOL))

    def close(self) -> None:
        if self._side is not None:
            self._side.close()
            self._side = None
        self.db.close()

    def _migrate(self) -> None:
        (version,) = self.db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise CatalogError(
                "internal",
                f"catalog schema version {version} is newer than this blockvirt knows ({SCHEMA_VERSION})",
            )
        for target, sql in _MIGRATIONS:
            if target <= version:
                continue
            statements = [x.strip() for x in sql.split(";") if x.strip()]
            if len(statements) == 1:
                with self.transaction() as t:
                    t.db.execute(sql)
                    t.db.execute(f"PRAGMA user_version = {int(target)}")
                continue
            self.db.execute("PRAGMA foreign_keys=OFF")  # not inside a transaction: it would be ignored
            try:
                with self.transaction() as t:
                    for statement in statements:
                        t.db.execute(statement)
                    broken = t.db.execute("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise CatalogError("internal", f"catalog migration {target} broke links: {broken}")
                    t.db.execute(f"PRAGMA user_version = {int(target)}")
            finally:
                self.db.execute("PRAGMA foreign_keys=ON")

    # ------------------------------------------------------------ pools
    def add_pool(self, name: str, path: str) -> PoolRecord:
        """A file pool in directory `path` (made if missing)."""
        validate_name(name, "pool")
        if not isinstance(path, str) or not path or "\0" in path:
            raise CatalogError("invalid", "a pool path must be a non-empty string")
        given, path = path, os.path.abspath(path)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:  # strerror only, and the path as given: nothing of the server's layout
            raise CatalogError("invalid", f"cannot create pool directory {given!r}: {e.strerror}") from None
        return self.insert_pool(PoolRecord(name, path, time.time()))

    def insert_pool(self, rec: PoolRecord) -> PoolRecord:
        """Record a pool (its storage exists already)."""
        validate_name(rec.name, "pool")
        with self._lock:
            try:
                self.db.execute(
                    "INSERT INTO pools (name, path, created, settings, backend, config) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (rec.name, rec.path, rec.created, json.dumps(rec.settings), rec.backend,
                     json.dumps(rec.config)),
                )  # fmt: skip
            except sqlite3.IntegrityError:
                where = f" or path {rec.path!r}" if rec.path else ""
                raise CatalogError("conflict", f"pool {rec.name!r}{where} already exists") from None
        return rec

    def pool(self, name: str) -> PoolRecord | None:
        row = self.db.execute(f"SELECT {_POOL_COLS} FROM pools WHERE name = ?", (name,)).fetchone()
        return _pool(row) if row else None

    def pools(self) -> list[PoolRecord]:
        rows = self.db.execute(f"SELECT {_POOL_COLS} FROM pools ORDER BY name")
        return [_pool(r) for r in rows]

    def set_pool_settings(self, name: str, settings: dict[str, Any]) -> None:
        with self.transaction() as t:
            t.db.execute("UPDATE pools SET settings = ? WHERE name = ?", (json.dumps(settings), name))

    def delete_pool(self, name: str) -> None:
        with self.transaction() as t:
            t.db.execute("DELETE FROM pools WHERE name = ?", (name,))
            t.db.execute("DELETE FROM remote_names WHERE pool = ?", (name,))

    # ------------------------------------------------------------ names kept elsewhere
    def remember_names(self, pool: str, names: Iterable[str]) -> None:
        """The volume names pool `pool` holds now, as its own storage says (replaces the
        last ones)."""
        with self.transaction() as t:
            t.db.execute("DELETE FROM remote_names WHERE pool = ?", (pool,))
            t.db.executemany(
                "INSERT INTO remote_names (pool, name) VALUES (?, ?)", [(pool, n) for n in sorted(set(names))]
            )

    def remembered_names(self, pool: str) -> set[str]:
        rows = self.db.execute("SELECT name FROM remote_names WHERE pool = ?", (pool,))
        return {r[0] for r in rows}

    def pools_remembering(self, name: str) -> list[str]:
        """The pools whose last seen names include volume `name`."""
        rows = self.db.execute("SELECT pool FROM remote_names WHERE name = ? ORDER BY pool", (name,))
        return [r[0] for r in rows]

    # ------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def transaction(self) -> Iterator[Txn]:
        """One atomic, durable change (BEGIN IMMEDIATE ... COMMIT) of named writes."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield Txn(self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    @contextlib.contextmanager
    def transaction_off_loop(self) -> Iterator[Txn]:
        """transaction(), for a thread of the executor: its COMMIT (an fsync of the WAL, which
        under write load waits for the file system's journal: tens of ms) then holds no event
        loop. It runs on a second connection, so the loop's readers see the change only once
        it is committed (WAL), never half done."""
        with self._lock:
            db = self._side
            if db is None:
                path = os.path.join(self.data_dir, "catalog.sqlite")
                db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=ON")
                self._side = db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield Txn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------ layers
    def layer(self, layer_id: str) -> LayerRecord | None:
        row = self.db.execute(
            "SELECT id, pool, parent, size, thick, created FROM layers WHERE id = ?", (layer_id,)
        ).fetchone()
        return _layer(row) if row else None

    def layers(self) -> list[LayerRecord]:
        rows = self.db.execute("SELECT id, pool, parent, size, thick, created FROM layers")
        return [_layer(r) for r in rows]

    def chain(self, layer_id: str) -> list[LayerRecord]:
        """The layer and its ancestors, head first."""
        out: list[LayerRecord] = []
        cur: str | None = layer_id
        while cur is not None:
            rec = self.layer(cur)
            if rec is None:
                raise CatalogError("internal", f"layer {cur} is missing from the catalog")
            out.append(rec)
            cur = rec.parent
            if len(out) > 100_000:
                raise CatalogError("internal", "layer chain has a cycle")
        return out

    def children(self, layer_id: str) -> list[LayerRecord]:
        rows = self.db.execute(
            "SELECT id, pool, parent, size, thick, created FROM layers WHERE parent = ?", (layer_id,)
        )
        return [_layer(r) for r in rows]

    def layer_dir(self, rec: LayerRecord) -> str:
        pool = self.pool(rec.pool)
        assert pool is not None, "foreign key guarantees the pool"
        return pool.path

    def live_layers(self) -> set[str]:
        """Layers something still needs: heads, snapshots, and all their ancestors."""
        parents = {r.id: r.parent for r in self.layers()}
        roots = [v.head for v in self.volumes()] + [s.layer for s in self.all_snapshots()]
        live: set[str] = set()
        for root in roots:
            cur: str | None = root
            while cur is not None and cur not in live:
                live.add(cur)
                cur = parents.get(cur)
        return live

    # ------------------------------------------------------------ volumes
    def volume(self, name: str) -> VolumeRow | None:
        """The volume's row, incoming ones included."""
        row = self.db.execute(f"SELECT {_VOLUME_COLS} FROM volumes WHERE name = ?", (name,)).fetchone()
        return _volume(row) if row else None

    def volumes(self) -> list[VolumeRow]:
        """Every volume row, incoming ones included."""
        rows = self.db.execute(f"SELECT {_VOLUME_COLS} FROM volumes ORDER BY name")
        return [_volume(r) for r in rows]

    def check_new_volume(self, name: str, size: int, pool: str) -> None:
        validate_name(name)
        validate_size(size)
        if self.pool(pool) is None:
            raise CatalogError("not-found", f"no pool named {pool!r}")
        if self.volume(name) is not None:
            raise CatalogError("conflict", f"volume {name!r} already exists")

    # ------------------------------------------------------------ snapshots
    def snapshot(self, volume: str, name: str) -> SnapshotRow | None:
        row = self.db.execute(
            "SELECT volume, name, layer, created FROM snapshots WHERE volume = ? AND name = ?", (volume, name)
        ).fetchone()
        return SnapshotRow(*row) if row else None

    def snapshots(self, volume: str) -> list[SnapshotRow]:
        rows = self.db.execute(
            "SELECT volume, name, layer, created FROM snapshots WHERE volume = ? ORDER BY created, name",
            (volume,),
        )
        return [SnapshotRow(*r) for r in rows]

    def all_snapshots(self) -> list[SnapshotRow]:
        rows = self.db.execute("SELECT volume, name, layer, created FROM snapshots")
        return [SnapshotRow(*r) for r in rows]

    def snapshots_of_layer(self, layer_id: str) -> list[SnapshotRow]:
        rows = self.db.execute(
            "SELECT volume, name, layer, created FROM snapshots WHERE layer = ?", (layer_id,)
        )
        return [SnapshotRow(*r) for r in rows]

    # ------------------------------------------------------------ access rules
    def acl_rules(self, volume: str) -> list[AclRecord]:
        rows = self.db.execute(
            "SELECT id, volume, kind, value, read_only, created FROM acl_rules WHERE volume = ? ORDER BY id",
            (volume,),
        )
        return [_acl(r) for r in rows]

    def all_acl_rules(self) -> list[AclRecord]:
        rows = self.db.execute(
            "SELECT id, volume, kind, value, read_only, created FROM acl_rules ORDER BY id"
        )
        return [_acl(r) for r in rows]

    def add_acl_rule(self, volume: str, kind: str, value: str, read_only: bool) -> AclRecord:
        """Store a rule (already validated and normalized by the caller)."""
        with self.transaction() as t:
            db = t.db
            try:
                cur = db.execute(
                    "INSERT INTO acl_rules (volume, kind, value, read_only, created) VALUES (?, ?, ?, ?, ?)",
                    (volume, kind, value, int(read_only), time.time()),
                )
            except sqlite3.IntegrityError:
                raise CatalogError(
                    "conflict", f"volume {volume!r} already has a {kind} rule for {value!r}"
                ) from None
            row = db.execute(
                "SELECT id, volume, kind, value, read_only, created FROM acl_rules WHERE id = ?",
                (cur.lastrowid,),
            ).fetchone()
        return _acl(row)

    def remove_acl_rule(self, volume: str, rule_id: int) -> bool:
        with self.transaction() as t:
            cur = t.db.execute("DELETE FROM acl_rules WHERE volume = ? AND id = ?", (volume, rule_id))
        return cur.rowcount > 0

    def clear_acl(self, volume: str) -> int:
        with self.transaction() as t:
            cur = t.db.execute("DELETE FROM acl_rules WHERE volume = ?", (volume,))
        return cur.rowcount

    # ------------------------------------------------------------ qos
    def qos_groups(self) -> list[tuple[str, str | None, str]]:
        return list(self.db.execute("SELECT name, parent, settings FROM qos_groups ORDER BY name"))

    def save_qos_group(self, name: str, parent: str | None, settings: str) -> None:
        with self.transaction() as t:
            t.db.execute(
                "INSERT INTO qos_groups VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET parent = excluded.parent, settings = excluded.settings",
                (name, parent, settings, time.time()),
            )

    def delete_qos_group(self, name: str) -> None:
        with self.transaction() as t:
            t.db.execute("DELETE FROM qos_groups WHERE name = ?", (name,))

    def volume_qos(self) -> list[tuple[str, str | None, str]]:
        return list(self.db.execute("SELECT volume, grp, settings FROM volume_qos"))

    def save_volume_qos(self, volume: str, group: str | None, settings: str) -> None:
        with self.transaction() as t:
            t.db.execute("INSERT OR REPLACE INTO volume_qos VALUES (?, ?, ?)", (volume, group, settings))

    # ------------------------------------------------------------ jobs
    def jobs(self) -> list[JobRecord]:
        rows = self.db.execute(
            "SELECT id, kind, volume, state, params, done, total, error, created, updated FROM jobs "
            "ORDER BY created"
        )
        return [JobRecord(*r) for r in rows]

    def job(self, job_id: str) -> JobRecord | None:
        row = self.db.execute(
            "SELECT id, kind, volume, state, params, done, total, error, created, updated FROM jobs "
            "WHERE id = ?",
            (job_id,),
        ).fetchone()
        return JobRecord(*row) if row else None

    def save_job(self, rec: JobRecord) -> None:
        with self._lock:
            self.db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.id,
                    rec.kind,
                    rec.volume,
                    rec.state,
                    rec.params,
                    rec.done,
                    rec.total,
                    rec.error,
                    rec.created,
                    rec.updated,
                ),
            )


class Txn:
    """The writes of one transaction (`Catalog.transaction()`), each a named statement."""

    def __init__(self, db: sqlite3.Connection) -> None:
        #: For the few writes that are one-offs of one method (kept in this module).
        self.db = db

    # layers
    def add_layer(self, rec: LayerRecord) -> None:
        self.db.execute(
            "INSERT INTO layers VALUES (?, ?, ?, ?, ?, ?)",
            (rec.id, rec.pool, rec.parent, rec.size, int(rec.thick), rec.created),
        )

    def delete_layer(self, layer_id: str) -> None:
        self.db.execute("DELETE FROM layers WHERE id = ?", (layer_id,))

    def set_layer_parent(self, layer_id: str, parent: str | None) -> None:
        self.db.execute("UPDATE layers SET parent = ? WHERE id = ?", (parent, layer_id))

    def reparent_children(self, old_parent: str, new_parent: str) -> None:
        self.db.execute("UPDATE layers SET parent = ? WHERE parent = ?", (new_parent, old_parent))

    def set_layer_size(self, layer_id: str, size: int) -> None:
        self.db.execute("UPDATE layers SET size = ? WHERE id = ?", (size, layer_id))

    def move_layer(self, layer_id: str, pool: str, thick: bool) -> None:
        self.db.execute("UPDATE layers SET pool = ?, thick = ? WHERE id = ?", (pool, int(thick), layer_id))

    # volumes
    def add_volume(self, rec: VolumeRow) -> None:
        self.db.execute(
            f"INSERT INTO volumes ({_VOLUME_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rec.name, rec.size, int(rec.thick), rec.pool, rec.head, rec.created, rec.incoming),
        )

    def promote_volume(self, volume: str) -> None:
        """An incoming volume becomes visible (its move switched over)."""
        self.db.execute("UPDATE volumes SET incoming = NULL WHERE name = ?", (volume,))

    def set_head(self, volume: str, head: str, size: int | None = None) -> None:
        if size is None:
            self.db.execute("UPDATE volumes SET head = ? WHERE name = ?", (head, volume))
        else:
            self.db.execute("UPDATE volumes SET head = ?, size = ? WHERE name = ?", (head, size, volume))

    def set_volume_size(self, volume: str, size: int) -> None:
        self.db.execute("UPDATE volumes SET size = ? WHERE name = ?", (size, volume))

    def move_volume(self, volume: str, pool: str, thick: bool) -> None:
        self.db.execute("UPDATE volumes SET pool = ?, thick = ? WHERE name = ?", (pool, int(thick), volume))

    def delete_volume(self, volume: str) -> None:
        """The volume's row and everything that hangs off it (snapshots, rules, QoS)."""
        self.db.execute("DELETE FROM snapshots WHERE volume = ?", (volume,))
        self.db.execute("DELETE FROM acl_rules WHERE volume = ?", (volume,))
        self.db.execute("DELETE FROM volume_qos WHERE volume = ?", (volume,))
        self.db.execute("DELETE FROM volumes WHERE name = ?", (volume,))

    # snapshots
    def add_snapshot(self, rec: SnapshotRow) -> None:
        self.db.execute(
            "INSERT INTO snapshots VALUES (?, ?, ?, ?)", (rec.volume, rec.name, rec.layer, rec.created)
        )

    def delete_snapshot(self, volume: str, name: str) -> None:
        self.db.execute("DELETE FROM snapshots WHERE volume = ? AND name = ?", (volume, name))

    def rename_snapshot_layer(self, old: str, new: str) -> None:
        """Snapshots naming layer `old` name `new` now (a commit put the parent in its place)."""
        self.db.execute("UPDATE snapshots SET layer = ? WHERE layer = ?", (new, old))

    # jobs
    def finish_job(self, job_id: str) -> None:
        """The job's work is done: in the same transaction as the change that completed it."""
        self.db.execute(
            "UPDATE jobs SET state = 'done', done = total, updated = ? WHERE id = ?", (time.time(), job_id)
        )


_POOL_COLS = "name, path, created, settings, backend, config"


def _pool(row: tuple[Any, ...]) -> PoolRecord:
    name, path, created, settings, backend, config = row
    return PoolRecord(name, path, created, json.loads(settings), backend, json.loads(config))


def _acl(row: tuple[Any, ...]) -> AclRecord:
    rid, volume, kind, value, read_only, created = row
    return AclRecord(rid, volume, kind, value, bool(read_only), created)


def _layer(row: tuple[Any, ...]) -> LayerRecord:
    lid, pool, parent, size, thick, created = row
    return LayerRecord(lid, pool, parent, size, bool(thick), created)


_VOLUME_COLS = "name, size, thick, pool, head, created, incoming"


def _volume(row: tuple[Any, ...]) -> VolumeRow:
    name, size, thick, pool, head, created, incoming = row
    return VolumeRow(name, size, bool(thick), pool, head, created, incoming)


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE | re.ASCII)


def parse_size(text: str | int) -> int:
    """'512M', '10G', '1T', '1.5G', '4096' -> bytes (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    raw = str(text)
    m = _SIZE_RE.match(raw) if len(raw) <= 64 else None
    if not m:
        shown = raw if len(raw) <= 64 else raw[:64] + "..."
        raise CatalogError(
            "invalid", f"invalid size {shown!r}: use a number with an optional unit K, M, G, T"
        )
    # Exact arithmetic: no float rounding, no OverflowError on a 400-digit number.
    value = fractions.Fraction(m.group(1)) * _UNITS[m.group(2).upper()]
    if value.denominator != 1:
        raise CatalogError("invalid", f"invalid size {raw!r}: not a whole number of bytes")
    return int(value)
