"""The volume-backend seam: what a kind of storage must do to hold blockvirt volumes.

A backend serves one or more pools of its kind. It keeps the records of its volumes and their
snapshot trees (wherever that kind keeps them: the node's SQLite for file pools), opens a
volume or a snapshot as a block node for I/O, and carries out tree edits. Everything above it
(the volume manager, the API, QoS, metrics, jobs, migration) talks to this interface only,
never to layer files or images.

Division of labour for a tree edit: the volume manager resolves the name, takes the tree
lock, refuses what is never allowed whatever the backend (a job on the volume, connected
clients where that matters), then calls the backend. The backend does the edit and decides
which of its steps run with the export drained (`Export.drained()`), so slow work (creating
files or images) stays outside the pause initiators see.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from blockvirt.storage.node import BlockNode
from blockvirt.storage.work import JobHost, JobView, WorkContext

if TYPE_CHECKING:
    from blockvirt.storage.catalog import AclRecord, PoolRecord
    from blockvirt.storage.export import Export


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    """A volume as every layer above the backends sees it."""

    name: str
    size: int
    thick: bool
    pool: str
    created: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    volume: str
    name: str
    created: float


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot in a volume's tree, with its space use."""

    name: str
    #: The snapshot it was taken on top of (its tree parent), or None for a root.
    parent: str | None
    created: float
    size: int
    #: Bytes held by this snapshot alone, and bytes of its view held by older ones.
    unique_bytes: int
    shared_bytes: int
    #: Whether the volume's head sits right on it (its next snapshot would be a child).
    current: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class VolumeFigures:
    """Space and shape of a volume, cheap to ask at scrape time (never opens anything)."""

    #: Bytes the whole tree holds (head and snapshots), and the head alone.
    allocated: int
    head_allocated: int
    #: How many layers a read may have to look through (1: no ancestors).
    chain_depth: int
    #: Why the volume cannot be opened (its storage is damaged: layer records or files are
    #: gone), if the backend can tell without opening it; None if nothing is known wrong.
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Space:
    """A pool's space now (bytes); capacity figures are None if the pool cannot be reached."""

    capacity: int | None
    used: int | None
    free: int | None
    allocated: int  # what blockvirt's volumes occupy
    provisioned: int  # sum of the virtual sizes of the pool's volumes

    @property
    def used_percent(self) -> float | None:
        if not self.capacity or self.used is None:
            return None
        return 100.0 * self.used / self.capacity

    @property
    def overcommit(self) -> float | None:
        return self.provisioned / self.capacity if self.capacity else None


@dataclass(frozen=True, slots=True)
class SnapshotResult:
    #: Layers a read may look through after the snapshot (for the depth warning).
    chain_depth: int


@dataclass(frozen=True, slots=True)
class DeleteResult:
    #: The background job that merges the snapshot's data away, if one started.
    job: JobView | None = None
    #: Why the data stays for now (shared by branches or clones), if it does.
    note: str | None = None


@dataclass
class NodeIdentity:
    """This node as the other nodes of a cluster see it (the service fills in the addresses
    once it has bound them)."""

    name: str
    #: host:port where clients reach this node's NBD server.
    nbd: str = ""
    #: This node's management API URL.
    api: str = ""


@dataclass(frozen=True)
class MoveHooks:
    """What the job moving a volume between pools gives the backend doing it."""

    #: The volume's head export (opened if need be); called under the edit lock.
    open_head: Callable[[], Export]
    #: A pause before copying n bytes (the job's rate limit, the pools' QoS background class).
    throttle: Callable[[int], Awaitable[None]]
    #: Called inside the switch's drain, right after the commit (QoS moves the volume).
    switched: Callable[[], None]


class VolumeSettings(Protocol):
    """Settings that travel with a volume: its access rules and its QoS settings. A backend
    keeps them where another node serving its volumes would find them. Reads are cheap (no
    I/O: every handshake asks); writes may go to a remote store."""

    def acl_rules(self, volume: str) -> list[AclRecord]: ...

    async def add_acl_rule(self, volume: str, kind: str, value: str, read_only: bool) -> AclRecord:
        """Store a rule (validated and normalized by the caller)."""

    async def remove_acl_rule(self, volume: str, rule_id: int) -> bool: ...

    async def clear_acl(self, volume: str) -> int: ...

    def volume_qos(self) -> list[tuple[str, str | None, str]]:
        """(volume, group, settings as JSON) of every volume that has QoS settings."""

    async def save_volume_qos(self, volume: str, group: str | None, settings: str) -> None: ...


class BackendHost(Protocol):
    """What a backend may ask of the volume manager that owns it."""

    @property
    def jobs(self) -> JobHost: ...

    def scope_lock(self, scope: str) -> asyncio.Lock:
        """The edit lock of one edit scope (VolumeBackend.edit_scope): held by tree edits of
        its pools; a backend takes it for the commit steps of its background work."""

    def exports(self) -> Iterable[Export]:
        """Every open export (of every backend: a backend picks its own by `base`)."""

    def pool_records(self) -> list[PoolRecord]:
        """Every pool the node knows (a backend attaches those of its kind at start)."""

    @property
    def node(self) -> NodeIdentity:
        """Who this node is (for the backends that share their pools with other nodes)."""

    def head(self, name: str) -> Export:
        """The volume's head export, opened if need be."""

    async def evict(self, volume: str, reason: str) -> None:
        """Stop serving the volume's head now: its sessions are cut (requests in flight are
        not answered) and its export is closed. For a volume this node lost or handed off."""

    def settings_changed(self, volume: str) -> None:
        """Another node changed the volume's settings (QoS) where the backend keeps them."""

    def remember_names(self, pool: str, names: list[str]) -> None:
        """The volume names of a pool whose catalog is kept in its own storage, as just read:
        the node keeps them, so that they stay taken while that storage cannot be reached."""


class VolumeBackend(Protocol):
    """One kind of storage. Methods named like tree edits run under the edit lock of the
    volume's pool's scope (edit_scope)."""

    #: The pool kind this backend serves ("file", "rbd").
    kind: str

    def edit_scope(self, pool: str) -> str:
        """The pools whose tree edits one lock serialises, by name: every pool whose edits
        share state with `pool`'s (a layer, a catalog, a background job) gives the same."""

    @property
    def settings(self) -> VolumeSettings:
        """Where its volumes' access rules and QoS settings live."""

    # ------------------------------------------------------------ life
    async def start(self) -> None:
        """Collect what a crash left behind; nothing else runs yet."""

    async def close(self) -> None:
        """Make every open node durable and release everything (exports are closed)."""

    # ------------------------------------------------------------ pools
    def space(self, pool: PoolRecord) -> Space:
        """The pool's space figures now (cheap: metrics ask at every scrape)."""

    def pool_in_use(self, pool: str) -> str | None:
        """What still lives in the pool (a sentence), or None if it may be deleted."""

    def pool_error(self, pool: str) -> str | None:
        """Why the pool cannot be used now (its storage is unreachable), or None."""

    async def attach(self, pool: PoolRecord) -> None:
        """A pool of this kind is being added: check it can be used (CatalogError if not)."""

    async def detach(self, pool: str) -> None:
        """A pool of this kind was deleted: let go of it."""

    # ------------------------------------------------------------ records (cheap, no I/O)
    def volume(self, name: str) -> VolumeRecord | None: ...

    def volumes(self) -> list[VolumeRecord]: ...

    def listed(self, pool: str) -> bool:
        """Whether the pool's volumes are known now (False for a pool whose storage has not
        been reached since the node started)."""

    def snapshot(self, volume: str, name: str) -> SnapshotRecord | None: ...

    def snapshots(self, volume: str) -> list[SnapshotRecord]:
        """In creation order."""

    async def snapshot_tree(self, volume: str) -> list[SnapshotInfo]:
        """The snapshots with their tree parents and space (may ask the storage: not cheap)."""

    def figures(self, volume: str, node: BlockNode | None) -> VolumeFigures:
        """Space and depth; `node` is the volume's open head, if it is open. Damaged storage
        is reported in `error`, never raised: one broken volume must not fail a listing."""

    def failed(self, node: BlockNode) -> str | None:
        """Why an open node refuses writes (a failed commit), or None."""

    def served_elsewhere(self, volume: str) -> str | None:
        """Another node of the pool's cluster serves the volume: the message saying which and
        where (clients are sent there); None if this node may serve it."""

    def owner_api(self, volume: str) -> str | None:
        """The management API URL of the live peer serving the volume, if another node does
        (tree edits must happen there: it holds the image's lock)."""

    # ------------------------------------------------------------ several nodes
    def cluster_view(self) -> list[dict[str, Any]]:
        """Per shared pool: its nodes, their liveness, the volumes each serves (none for
        storage that belongs to this node alone)."""

    async def want(self, volume: str, node: str) -> None:
        """A planned move of the volume to another node of its pool's cluster."""

    def live_nodes(self, pool: str) -> list[str]:
        """The live nodes of the pool's cluster (this one included)."""

    def snapshot_ancestors(self, volume: str, snapshot: str | None) -> list[str]:
        """The volume's snapshots that are older points of the branch of `snapshot` (None:
        the head), oldest first: the `since` that `changed_extents(volume, since, snapshot)`
        accepts. Cheap (the NBD handshake lists them as metadata contexts)."""

    async def changed_extents(
        self, volume: VolumeRecord, since: str, until: str | None = None
    ) -> list[tuple[int, int]]:
        """(offset, length) byte ranges whose contents may differ between snapshot `since` and
        snapshot `until` (None: the head now), in order. Every changed byte is covered (more
        is allowed, never less); ranges a resize grew count as changed. `since` must be an
        older point of the same branch (CatalogError otherwise)."""

    # ------------------------------------------------------------ I/O
    def open(self, volume: VolumeRecord, snapshot: str | None) -> BlockNode:
        """A node for the volume's head (writable) or one snapshot (read-only)."""

    def release(self, node: BlockNode) -> None:
        """The export of `node` is closed: give back what `open` took."""

    # ------------------------------------------------------------ tree edits
    async def create(
        self, name: str, size: int, *, thick: bool, pool: str, incoming: str | None = None
    ) -> VolumeRecord:
        """A new, empty volume. With `incoming` (the id of the job moving it in from another
        kind of storage) it stays invisible to `volume`/`volumes` until `promote`."""

    async def promote(self, name: str) -> VolumeRecord:
        """An incoming volume becomes visible: the move that brought it in switched over."""

    async def incoming(self, name: str) -> VolumeRecord | None:
        """The incoming (not yet promoted) volume of that name, if there is one."""

    async def delete(self, volume: VolumeRecord) -> None:
        """Forget the volume, its snapshots and its settings; its exports are closed."""

    async def snapshot_create(self, volume: VolumeRecord, snap: str, head: Export) -> SnapshotResult: ...

    async def revert(self, volume: VolumeRecord, snap: str, head: Export) -> VolumeRecord:
        """Put the head back on `snap` (newer snapshots stay: a branch); returns the record
        (the size may change)."""

    async def snapshot_delete(self, volume: VolumeRecord, snap: str) -> DeleteResult: ...

    async def clone(self, source: VolumeRecord, snap: str, new: str) -> None:
        """A new volume whose head sits on `source@snap` (linked, instant)."""

    async def flatten(self, volume: VolumeRecord) -> JobView:
        """Start copying what the volume reads from ancestors into it (a job)."""

    async def resize(self, volume: VolumeRecord, size: int, head: Export, *, force: bool) -> VolumeRecord: ...

    async def reset(self, volume: VolumeRecord) -> None:
        """The volume's exports are closed; forget any failure so it reopens from storage."""

    # ------------------------------------------------------------ background work
    async def run_work(self, ctx: WorkContext) -> None:
        """Carry out a job this backend started (merge, commit, flatten)."""

    def busy_with(self, jobs: Sequence[JobView], volume: VolumeRecord) -> JobView | None:
        """A running job that uses any of the volume's data (shared layers included)."""

    # ------------------------------------------------------------ moving between pools
    def plan_move(self, volume: VolumeRecord, target: PoolRecord, provisioning: str | None) -> dict[str, Any]:
        """Check a move of the volume and its tree to `target` (a pool of this backend) and
        return the job's parameters; CatalogError if it cannot be done."""

    async def move(self, ctx: WorkContext, hooks: MoveHooks) -> None:
        """Carry out a planned move, live; a crash or cancel at any point leaves one copy."""
