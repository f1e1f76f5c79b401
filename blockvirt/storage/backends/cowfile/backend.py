"""The file backend: volumes as chains of copy-on-write layer files in pool directories, with
their records in the node's SQLite catalog.

A volume is a head layer over its ancestors. A snapshot names an immutable layer; taking one
puts an empty head on top (O(1), drained). Revert puts a new empty head over the snapshot's
layer (newer snapshots stay: a branch). A clone is a new volume whose head sits on a
snapshot's layer. Deleting a snapshot hides its layer, which is merged into its only child by
a job (gc.py, merge.py). Files are made before the catalog rows that point at them and removed
after, so a crash leaves at worst orphan files, which start-up removes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from blockvirt.storage import executor
from blockvirt.storage.backend import (
    BackendHost,
    DeleteResult,
    MoveHooks,
    SnapshotInfo,
    SnapshotRecord,
    SnapshotResult,
    Space,
    VolumeFigures,
    VolumeRecord,
)
from blockvirt.storage.backends.cowfile import diff, gc, health, merge, relocate
from blockvirt.storage.backends.cowfile.chain import ChainNode
from blockvirt.storage.backends.cowfile.layer import Layer, remove_layer_files
from blockvirt.storage.backends.cowfile.layer_map import BLOCK, FULL_PAGE
from blockvirt.storage.backends.cowfile.registry import LayerRegistry
from blockvirt.storage.backends.cowfile.state import FileState
from blockvirt.storage.catalog import (
    FILE_BACKEND,
    AclRecord,
    Catalog,
    CatalogError,
    LayerRecord,
    PoolRecord,
    SnapshotRow,
    VolumeRow,
    new_layer_id,
)
from blockvirt.storage.export import Export
from blockvirt.storage.fileio import REAL, FileIO
from blockvirt.storage.node import BlockNode, StorageError
from blockvirt.storage.pools import PoolSettings, fs_space
from blockvirt.storage.work import JobKind, JobView, WorkContext

log = logging.getLogger("blockvirt.volumes")

#: Refuse to grow a chain past this many layers (the merged index holds 16-bit owners, and
#: deep chains are a smell: flatten or delete snapshots).
MAX_CHAIN_DEPTH = 250


def _record(row: VolumeRow) -> VolumeRecord:
    return VolumeRecord(row.name, row.size, row.thick, row.pool, row.created)


class FileSettings:
    """VolumeSettings over the node's catalog (SQLite: writes are quick and local)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def acl_rules(self, volume: str) -> list[AclRecord]:
        return self.catalog.acl_rules(volume)

    async def add_acl_rule(self, volume: str, kind: str, value: str, read_only: bool) -> AclRecord:
        return self.catalog.add_acl_rule(volume, kind, value, read_only)

    async def remove_acl_rule(self, volume: str, rule_id: int) -> bool:
        return self.catalog.remove_acl_rule(volume, rule_id)

    async def clear_acl(self, volume: str) -> int:
        return self.catalog.clear_acl(volume)

    def volume_qos(self) -> list[tuple[str, str | None, str]]:
        return self.catalog.volume_qos()

    async def save_volume_qos(self, volume: str, group: str | None, settings: str) -> None:
        self.catalog.save_volume_qos(volume, group, settings)


class FileBackend:
    """Every file pool of the node (they share one catalog: chains may span pools)."""

    kind = FILE_BACKEND

    def __init__(self, catalog: Catalog, host: BackendHost, *, io: FileIO = REAL) -> None:
        self.catalog = catalog
        #: Access rules and QoS settings of file volumes: tables of the node's catalog.
        self.settings = FileSettings(catalog)
        self.io = io
        self.st = FileState(catalog, io, LayerRegistry(catalog, io), host, host.scope_lock(self.kind))
        self._tasks: set[asyncio.Task[None]] = set()
        #: Volumes whose layers were last seen damaged, and why (to log a change once).
        self._damaged: dict[str, str] = {}

    # ------------------------------------------------------------ life
    async def start(self) -> None:
        await executor.run(gc.remove_orphan_files, self.st)
        async with self.st.lock:
            await gc.collect(self.st, start_merges=True)

    async def close(self) -> None:
        await self.st.wait_unlinks()  # started by jobs just stopped
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        # A commit whose caller was stopped (a job) still runs: let it end before its files
        # close, and journal what stopped jobs left in layers no open node heads.
        for lay in self.st.layers.open_layers():
            if lay.writable:
                try:
                    await lay.commit()
                except Exception as e:
                    log.error("commit of layer %s at shutdown failed: %s", lay.id, e)
        self.st.layers.close_all()

    # ------------------------------------------------------------ pools
    def space(self, pool: PoolRecord) -> Space:
        provisioned = sum(v.size for v in self.catalog.volumes() if v.pool == pool.name)
        allocated = sum(
            self.st.layer_allocated(lr.id) for lr in self.catalog.layers() if lr.pool == pool.name
        )
        fs = fs_space(pool.path)
        if fs is None:
            return Space(None, None, None, allocated, provisioned)
        return Space(fs[0], fs[1], fs[2], allocated, provisioned)

    def pool_error(self, pool: str) -> str | None:
        return None  # an unreachable directory shows in its space figures

    async def attach(self, pool: PoolRecord) -> None:
        """Nothing: the catalog made the directory."""

    async def detach(self, pool: str) -> None:
        """Nothing: the directory is the operator's."""

    def pool_in_use(self, pool: str) -> str | None:
        used = [lr for lr in self.catalog.layers() if lr.pool == pool]
        if not used:
            return None
        vols = sorted({v.name for v in self.catalog.volumes() if v.pool == pool})
        return f"volumes {', '.join(vols)}" if vols else f"{len(used)} snapshot layer(s)"

    # ------------------------------------------------------------ records
    def volume(self, name: str) -> VolumeRecord | None:
        row = self.catalog.volume(name)
        return _record(row) if row is not None and row.incoming is None else None

    def volumes(self) -> list[VolumeRecord]:
        return [_record(r) for r in self.catalog.volumes() if r.incoming is None]

    def listed(self, pool: str) -> bool:
        return True  # the node's own catalog holds them

    def snapshot(self, volume: str, name: str) -> SnapshotRecord | None:
        row = self.catalog.snapshot(volume, name)
        return SnapshotRecord(row.volume, row.name, row.created) if row is not None else None

    def snapshots(self, volume: str) -> list[SnapshotRecord]:
        return [SnapshotRecord(r.volume, r.name, r.created) for r in self.catalog.snapshots(volume)]

    def _row(self, name: str) -> VolumeRow:
        row = self.catalog.volume(name)
        if row is None:
            raise CatalogError("not-found", f"no volume named {name!r}")
        return row

    def _snap(self, name: str, snap: str) -> SnapshotRow:
        row = self.catalog.snapshot(name, snap)
        if row is None:
            raise CatalogError("not-found", f"volume {name!r} has no snapshot named {snap!r}")
        return row

    async def snapshot_tree(self, volume: str) -> list[SnapshotInfo]:
        rec = self._row(volume)
        snaps = self.catalog.snapshots(volume)
        by_layer = {s.layer: s for s in snaps}
        head_chain = [r.id for r in self.catalog.chain(rec.head)]
        out = []
        for s in snaps:
            chain = self.catalog.chain(s.layer)
            parent = next((by_layer[r.id].name for r in chain[1:] if r.id in by_layer), None)
            unique, shared = self._space(chain)
            current = s.layer in head_chain[1:2]  # the head sits right on it
            out.append(SnapshotInfo(s.name, parent, s.created, chain[0].size, unique, shared, current))
        return out

    def _space(self, chain: list[LayerRecord]) -> tuple[int, int]:
        """(bytes stored in the top layer, bytes of its view held by ancestors)."""
        layers = self.st.layers.acquire_chain(chain[0].id, writable_head=False)
        try:
            top = layers[0].map
            unique = top.data_blocks() * BLOCK
            pages: set[int] = set()
            npages = -(-top.nblocks // 4096)
            if any(lay.map.all_data for lay in layers):
                pages = set(range(npages))
            else:
                for lay in layers:
                    pages.update(lay.map.pages)
            visible = 0
            for page in pages:
                remaining = FULL_PAGE
                for lay in layers:
                    data, zero = lay.map.page_bits(page)
                    visible += (data & remaining).bit_count()
                    remaining &= ~(data | zero)
                    if not remaining:
                        break
            return unique, visible * BLOCK - unique
        finally:
            self.st.layers.release_all(layers)

    def figures(self, volume: str, node: BlockNode | None) -> VolumeFigures:
        row = self._row(volume)
        snaps = self.catalog.snapshots(volume)
        depth, error = health.inspect(self.st, row.head, [s.layer for s in snaps])
        self._note_damage(volume, error)
        if isinstance(node, ChainNode):
            head, depth = node.head.allocated_bytes(), len(node.layers)
        else:
            head = self.st.layer_allocated(row.head)
        allocated = head + sum(self.st.layer_allocated(s.layer) for s in snaps)
        return VolumeFigures(allocated, head, depth, error)

    def _note_damage(self, volume: str, error: str | None) -> None:
        """Log when a volume is first seen damaged (and when it is whole again), not at every
        look: figures are asked at every scrape."""
        before = self._damaged.get(volume)
        if error == before:
            return
        if error is None:
            del self._damaged[volume]
            log.info("volume %s: its layers are whole again", volume, extra={"volume": volume})
        else:
            self._damaged[volume] = error
            log.warning("volume %s cannot be opened: %s", volume, error, extra={"volume": volume})

    def failed(self, node: BlockNode) -> str | None:
        return node.failed if isinstance(node, ChainNode) else None

    def edit_scope(self, pool: str) -> str:
        # One scope for every file pool: they share the layer registry and the node's
        # catalog, and a move or merge spans pools.
        return self.kind

    def served_elsewhere(self, volume: str) -> str | None:
        return None  # a file pool belongs to this node alone

    def owner_api(self, volume: str) -> str | None:
        return None

    def cluster_view(self) -> list[dict[str, Any]]:
        return []

    async def want(self, volume: str, node: str) -> None:
        raise CatalogError("conflict", f"volume {volume!r} is in a file pool: only this node can serve it")

    def live_nodes(self, pool: str) -> list[str]:
        return []

    def snapshot_ancestors(self, volume: str, snapshot: str | None) -> list[str]:
        top = self._snap(volume, snapshot).layer if snapshot is not None else self._row(volume).head
        names: dict[str, list[str]] = {}
        for s in self.catalog.snapshots(volume):
            names.setdefault(s.layer, []).append(s.name)
        # The top layer is the point itself: only the layers below it are older.
        older = [n for r in self.catalog.chain(top)[1:] for n in names.get(r.id, ())]
        return older[::-1]

    async def changed_extents(
        self, volume: VolumeRecord, since: str, until: str | None = None
    ) -> list[tuple[int, int]]:
        row = self._row(volume.name)
        top = self._snap(volume.name, until).layer if until is not None else row.head
        base = self._snap(volume.name, since).layer
        chain = self.catalog.chain(top)
        ids = [r.id for r in chain]
        if base not in ids or base == top:
            if base == top:
                return []
            point = volume.name if until is None else f"{volume.name}@{until}"
            raise CatalogError("invalid", f"snapshot {since!r} is not an older point of {point}'s branch")
        above = chain[: ids.index(base)]
        top_size, base_size = chain[0].size, chain[ids.index(base)].size
        layers = [self.st.layers.acquire(r) for r in above]
        try:
            tables = [diff.table(lay.map) for lay in layers]
        finally:
            self.st.layers.release_all(layers)
        # Off the loop: a volume of many TiB with many extents takes a while to walk.
        return await executor.run(diff.changed_extents, tables, top_size, base_size)

    # ------------------------------------------------------------ I/O
    def open(self, volume: VolumeRecord, snapshot: str | None) -> BlockNode:
        if snapshot is None:
            row = self._row(volume.name)
            layers = self.st.layers.acquire_chain(row.head, writable_head=True)
            return ChainNode(layers, row.size, writable=True, alloc_unit=self._alloc_unit(row.head))
        srow = self._snap(volume.name, snapshot)
        lrec = self.catalog.layer(srow.layer)
        assert lrec is not None
        layers = self.st.layers.acquire_chain(srow.layer, writable_head=False)
        return ChainNode(layers, lrec.size, writable=False)

    def _alloc_unit(self, layer_id: str) -> int:
        """The allocation unit of the pool a layer is in (read when its volume is opened)."""
        lrec = self.catalog.layer(layer_id)
        prec = self.catalog.pool(lrec.pool) if lrec is not None else None
        return PoolSettings.from_dict(prec.settings).alloc_unit if prec is not None else 0

    def release(self, node: BlockNode) -> None:
        assert isinstance(node, ChainNode)
        self.st.layers.release_all(node.layers)

    # ------------------------------------------------------------ tree edits
    async def _create_layer(self, pool: PoolRecord, layer_id: str, size: int, *, thick: bool) -> None:
        """A layer's files; on failure nothing is left, and no space is a clear error."""
        try:
            await executor.run(Layer.create, self.io, pool.path, layer_id, size, thick=thick)
        except OSError as e:
            await executor.run(remove_layer_files, self.io, pool.path, layer_id)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CatalogError("no-space", f"pool {pool.name!r} has no room for {size} bytes") from e
            if e.errno == errno.EFBIG:
                raise CatalogError("invalid", f"size {size} is too large for pool {pool.name!r}") from e
            raise

    def _pool(self, name: str) -> PoolRecord:
        prec = self.catalog.pool(name)
        assert prec is not None and prec.backend == FILE_BACKEND
        return prec

    async def create(
        self, name: str, size: int, *, thick: bool, pool: str, incoming: str | None = None
    ) -> VolumeRecord:
        layer_id = new_layer_id()
        # Files first, then the catalog rows: a crash in between leaves only orphan files
        # (which `check --repair` and start-up collection remove).
        await self._create_layer(self._pool(pool), layer_id, size, thick=thick)
        now = time.time()
        row = VolumeRow(name, size, thick, pool, layer_id, now, incoming)
        with self.catalog.transaction() as t:
            t.add_layer(LayerRecord(layer_id, pool, None, size, thick, now))
            t.add_volume(row)
        return _record(row)

    async def incoming(self, name: str) -> VolumeRecord | None:
        row = self.catalog.volume(name)
        return _record(row) if row is not None and row.incoming is not None else None

    async def promote(self, name: str) -> VolumeRecord:
        with self.catalog.transaction() as t:
            t.promote_volume(name)
        return _record(self._row(name))

    async def delete(self, volume: VolumeRecord) -> None:
        with self.catalog.transaction() as t:
            t.delete_volume(volume.name)
        self._damaged.pop(volume.name, None)
        await gc.collect(self.st, start_merges=True)

    async def snapshot_create(self, volume: VolumeRecord, snap: str, head: Export) -> SnapshotResult:
        """O(1): put an empty head on top while drained; clients stay connected.

        The snapshot is crash-consistent: it holds every write completed before it, and
        those are durable once the frozen head's commit (started right away) is done, or
        the next FLUSH returns, like any other write."""
        node = head.base
        assert isinstance(node, ChainNode)
        depth = len(node.layers) + 1
        if depth > MAX_CHAIN_DEPTH:
            raise CatalogError(
                "conflict",
                f"chain of {volume.name!r} is {depth - 1} layers deep (limit {MAX_CHAIN_DEPTH}): "
                "delete snapshots or flatten first",
            )
        # Everything slow happens outside the drain, and off the loop: the new layer's files
        # are made (and synced), and the catalog commits the new tree (an fsync that waits
        # for the file system's journal under write load) while I/O goes on. Writes that land
        # in the old head meanwhile belong to the snapshot too: they were concurrent with it.
        # The drain then only puts the new head on top (memory only, microseconds), so no
        # request waits for storage. The frozen head's final commit runs after I/O has resumed;
        # FLUSH waits for it.
        new_id = new_layer_id()
        await executor.run(
            Layer.create, self.io, self._pool(volume.pool).path, new_id, volume.size, thick=False
        )
        old = node.head
        now = time.time()
        lrec = LayerRecord(new_id, volume.pool, old.id, volume.size, False, now)
        new_head = self.st.layers.acquire(lrec, writable=True)
        try:
            await executor.run(self._commit_snapshot, volume.name, snap, lrec)
        except BaseException:
            self.st.layers.release(new_head)
            raise
        async with head.drained():
            assert node.head is old, "the head changed under the edit lock"
            node.freeze_head(new_head)
        self._background(node.commit_frozen())
        return SnapshotResult(depth)

    def _commit_snapshot(self, volume: str, snap: str, lrec: LayerRecord) -> None:
        """The snapshot in the catalog: the new head over the old one, which the snapshot
        keeps (in an executor thread: see snapshot_create)."""
        assert lrec.parent is not None
        with self.catalog.transaction_off_loop() as t:
            t.add_layer(lrec)
            t.add_snapshot(SnapshotRow(volume, snap, lrec.parent, lrec.created))
            t.set_head(volume, lrec.id)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    async def revert(self, volume: VolumeRecord, snap: str, head: Export) -> VolumeRecord:
        srow = self._snap(volume.name, snap)
        lrec = self.catalog.layer(srow.layer)
        assert lrec is not None
        node = head.base
        assert isinstance(node, ChainNode)
        await node.commit_frozen()
        async with head.drained():
            new_id = new_layer_id()
            await executor.run(
                Layer.create, self.io, self._pool(volume.pool).path, new_id, lrec.size, thick=False
            )
            with self.catalog.transaction() as t:
                t.add_layer(LayerRecord(new_id, volume.pool, srow.layer, lrec.size, False, time.time()))
                t.set_head(volume.name, new_id, size=lrec.size)
            old_layers = node.layers
            node.set_layers(self.st.layers.acquire_chain(new_id, writable_head=True), keep_index=False)
            node.set_size(lrec.size)
            self.st.layers.release_all(old_layers)
            new = _record(self._row(volume.name))  # incoming ones too (a move replays into them)
            head.record = new
        await gc.collect(self.st, start_merges=True)
        return new

    async def snapshot_delete(self, volume: VolumeRecord, snap: str) -> DeleteResult:
        """Forget the snapshot; its layer is merged into its one child (a job), or kept hidden
        while several children share it, or removed if nothing reads it."""
        srow = self._snap(volume.name, snap)
        with self.catalog.transaction() as t:
            t.delete_snapshot(volume.name, snap)
        children = self.catalog.children(srow.layer)
        jobs = await gc.collect(self.st, start_merges=True)
        if jobs:
            return DeleteResult(job=jobs[0])
        if len(children) > 1 and not self.catalog.snapshots_of_layer(srow.layer):
            return DeleteResult(
                note=(
                    f"its data is still shared by {len(children)} branches or clones; "
                    "it is kept hidden and merged once only one remains"
                )
            )
        return DeleteResult()

    async def clone(self, source: VolumeRecord, snap: str, new: str) -> None:
        srow = self._snap(source.name, snap)
        lrec = self.catalog.layer(srow.layer)
        assert lrec is not None
        new_id = new_layer_id()
        await executor.run(
            Layer.create, self.io, self._pool(source.pool).path, new_id, lrec.size, thick=False
        )
        now = time.time()
        with self.catalog.transaction() as t:
            t.add_layer(LayerRecord(new_id, source.pool, srow.layer, lrec.size, False, now))
            t.add_volume(VolumeRow(new, lrec.size, False, source.pool, new_id, now))

    def clone_size(self, source: VolumeRecord, snap: str) -> int:
        lrec = self.catalog.layer(self._snap(source.name, snap).layer)
        assert lrec is not None
        return lrec.size

    async def flatten(self, volume: VolumeRecord) -> JobView:
        row = self._row(volume.name)
        if self.catalog.layer(row.head) is None or self.catalog.chain(row.head)[0].parent is None:
            raise CatalogError("conflict", f"volume {volume.name!r} has no ancestors: nothing to flatten")
        params = {"backend": FILE_BACKEND, "target": row.head, "cursor": 0}
        return self.st.host.jobs.start(JobKind.FLATTEN, volume.name, params)

    async def resize(self, volume: VolumeRecord, size: int, head: Export, *, force: bool) -> VolumeRecord:
        node = head.base
        assert isinstance(node, ChainNode)
        old = node.size
        if size < old:
            cut = node.data_blocks_beyond(size) * BLOCK
            if not force:
                detail = (
                    f"it would discard {cut} bytes of data past the new end"
                    if cut
                    else "no data lies past the new end"
                )
                raise CatalogError(
                    "conflict",
                    f"shrinking {volume.name!r} from {old} to {size} bytes needs --force ({detail})",
                )
        await node.commit_frozen()
        async with head.drained():
            if size > old:
                # Journal the new blocks' states before the catalog grows the volume: a crash
                # in between leaves entries past the old size, which open ignores.
                try:
                    await node.resize(size)
                    await node.head.commit()
                except (OSError, StorageError) as e:
                    await _undo_grow(node, old)
                    if getattr(e, "errno", 0) in (errno.ENOSPC, errno.EDQUOT):
                        raise CatalogError(
                            "no-space", f"pool {volume.pool!r} has no room to grow {volume.name!r}"
                        ) from e
                    raise
                self._record_size(node, volume.name, size)
            else:
                # The catalog shrinks first: a crash before the cut leaves data past the
                # end, which open ignores and a later grow overwrites.
                self._record_size(node, volume.name, size)
                await node.resize(size)
                await node.head.commit()
            new = _record(self._row(volume.name))  # incoming ones too (a move replays into them)
            head.record = new
        return new

    def _record_size(self, node: ChainNode, name: str, size: int) -> None:
        with self.catalog.transaction() as t:
            t.set_layer_size(node.head.id, size)
            t.set_volume_size(name, size)

    async def reset(self, volume: VolumeRecord) -> None:
        """Nothing to forget: a failure lives in the open node, which is closed already, and
        the next open replays the layers' journals."""

    # ------------------------------------------------------------ background work
    async def run_work(self, ctx: WorkContext) -> None:
        await merge.run(self.st, ctx)

    def busy_with(self, jobs: Sequence[JobView], volume: VolumeRecord) -> JobView | None:
        mine = {r.id for r in self.tree_layers(volume.name)}
        for job in jobs:
            if gc.job_layers(self.st, job) & mine:
                return job
        return None

    # ------------------------------------------------------------ moving between file pools
    def plan_move(self, volume: VolumeRecord, target: PoolRecord, provisioning: str | None) -> dict[str, Any]:
        row = self._row(volume.name)
        move = [lr for lr in self.tree_layers(volume.name) if lr.pool != target.name]
        if not move and (provisioning is None or (provisioning == "thick") == volume.thick):
            raise CatalogError("conflict", f"volume {volume.name!r} is already in pool {target.name!r}")
        if not move:
            raise CatalogError(
                "conflict",
                f"volume {volume.name!r} is already in pool {target.name!r}: "
                "converting in place is not supported",
            )
        ids = {lr.id for lr in move}
        for job in self.st.host.jobs.running():
            if gc.job_layers(self.st, job) & ids:
                raise CatalogError(
                    "conflict",
                    f"job {job.id} ({job.kind} on {job.volume}) is using layers of {volume.name!r}",
                )
        relocate.check(self.st, volume.name, target, move, provisioning)
        return {
            "backend": FILE_BACKEND,
            "pool": target.name,
            "source_pool": volume.pool,
            "layers": [lr.id for lr in move],
            "head": row.head,
            "provisioning": provisioning,
        }

    async def move(self, ctx: WorkContext, hooks: MoveHooks) -> None:
        await relocate.run(self.st, ctx, hooks)

    def tree_layers(self, name: str) -> list[LayerRecord]:
        """Every layer the volume's head and snapshots read, each once, head first."""
        row = self._row(name)
        seen: dict[str, LayerRecord] = {}
        for root in [row.head, *(s.layer for s in self.catalog.snapshots(name))]:
            for lr in self.catalog.chain(root):
                seen.setdefault(lr.id, lr)
        return list(seen.values())


async def _undo_grow(node: ChainNode, old: int) -> None:
    """A grow failed half-way (no space for a thick volume, say): go back to the old size."""
    try:
        await node.resize(old)
    except (OSError, StorageError) as e:
        log.error("undoing a failed grow: %s", e)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background commit failed: %s", task.exception())
