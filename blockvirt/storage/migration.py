"""Live migration of a volume, with its whole snapshot tree, to another pool (storage vMotion).

    prepare   every layer of the volume's tree gets an empty copy (same id) in the target pool;
              the head's node starts mirroring (drained edit, so no request straddles it)
    copy      immutable layers are copied once; the head by one pass over a dirty set while
              every guest change to an already copied chunk is mirrored before it completes
    switch    once the pass is done: drain every node that reads a moved layer, check nothing
              is dirty, commit the catalog (each layer's pool, the volume's pool, the job's end)
              in one transaction, swap the layers in every node, resume. Clients see a pause,
              never an error or a reconnect.
    clean up  the source files go; a crash before the commit leaves the source authoritative
              (the copies are orphans the next start removes, and the job starts over), after
              it the target (the source files are the orphans).

The target is as durable as the source throughout: guest FLUSH and FUA also commit the target,
and the pass's copies are synced before the switch. So the switch itself syncs nothing but the
catalog, and its pause is a drain plus one SQLite commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from blockvirt.jobs import mirror as mv
from blockvirt.jobs.manager import CANCELLED, RUNNING, Job
from blockvirt.storage import executor
from blockvirt.storage.backends.cowfile.layer import Layer, remove_layer_files
from blockvirt.storage.backends.cowfile.layer_map import BLOCK
from blockvirt.storage.catalog import CatalogError, LayerRecord, PoolRecord
from blockvirt.storage.node import StorageError
from blockvirt.storage.pools import fs_space

if TYPE_CHECKING:
    from blockvirt.storage.volumes import Volume, VolumeManager

log = logging.getLogger("blockvirt.migration")

PROVISIONING = (None, "thick", "thin")
#: The head's copy is synced after every this many bytes.
SYNC_EVERY = 32 * 1024 * 1024
#: The pass checkpoints progress (for rate and ETA) at most this often.
_PROGRESS_EVERY = 0.1


def tree_layers(vm: VolumeManager, name: str) -> list[LayerRecord]:
    """Every layer the volume's head and snapshots read, each once, head first."""
    rec = vm.catalog.volume(name)
    assert rec is not None
    seen: dict[str, LayerRecord] = {}
    for root in [rec.head, *(s.layer for s in vm.catalog.snapshots(name))]:
        for lr in vm.catalog.chain(root):
            seen.setdefault(lr.id, lr)
    return list(seen.values())


def _job_layers(job: Job, vm: VolumeManager) -> set[str]:
    """Layers a running job reads or writes."""
    out = {job.params.get(k) for k in ("source", "target")}
    out.update(job.params.get("layers", []))
    if job.kind == "flatten" and job.params.get("target") and vm.catalog.layer(job.params["target"]):
        out.update(r.id for r in vm.catalog.chain(job.params["target"]))
    out.discard(None)
    return {x for x in out if isinstance(x, str)}


def start(vm: VolumeManager, name: str, pool: str, *, provisioning: str | None, bps_limit: float) -> Job:
    """Check and start a migration job (the caller holds the manager's lock)."""
    rec = vm.catalog.volume(name)
    if rec is None:
        raise CatalogError("not-found", f"no volume named {name!r}")
    target = vm.catalog.pool(pool)
    if target is None:
        raise CatalogError("not-found", f"no pool named {pool!r}")
    if provisioning not in PROVISIONING:
        raise CatalogError("invalid", "provisioning must be 'thick', 'thin' or absent")
    if isinstance(bps_limit, bool) or not isinstance(bps_limit, int | float) or bps_limit < 0:
        raise CatalogError("invalid", "bps_limit must be a number of bytes per second (0: unlimited)")
    busy = vm.jobs.busy(name)
    if busy is not None:
        raise CatalogError("conflict", f"job {busy.id} ({busy.kind}) is running on {name!r}")
    layers = tree_layers(vm, name)
    move = [lr for lr in layers if lr.pool != pool]
    if not move and (provisioning is None or (provisioning == "thick") == rec.thick):
        raise CatalogError("conflict", f"volume {name!r} is already in pool {pool!r}")
    if not move:
        raise CatalogError(
            "conflict", f"volume {name!r} is already in pool {pool!r}: converting in place is not supported"
        )
    ids = {lr.id for lr in move}
    for job in vm.jobs.list():
        if job.state == RUNNING and _job_layers(job, vm) & ids:
            raise CatalogError(
                "conflict", f"job {job.id} ({job.kind} on {job.volume}) is using layers of {name!r}"
            )
    need = sum(vm.layer_allocated(lr.id) for lr in move)
    if provisioning == "thick":
        need += sum(lr.size for lr in move if lr.parent is None)
    fs = fs_space(target.path)
    if fs is not None and fs[2] < need and not _same_fs(vm, move, target):
        raise CatalogError(
            "no-space", f"pool {pool!r} has {fs[2]} bytes free; moving {name!r} needs about {need}"
        )
    params = {
        "pool": pool,
        "source_pool": rec.pool,
        "layers": [lr.id for lr in move],
        "head": rec.head,
        "provisioning": provisioning,
        "bps_limit": bps_limit,
    }
    return vm.jobs.start("migrate", name, params, lambda job: run(vm, job), unit="bytes")


def _same_fs(vm: VolumeManager, move: list[LayerRecord], target: PoolRecord) -> bool:
    """Whether every layer already lives on the target's filesystem (no new space needed)."""
    try:
        dev = os.stat(target.path).st_dev
        return all(os.stat(vm.catalog.layer_dir(lr)).st_dev == dev for lr in move)
    except OSError:
        return False


def _dst_thick(src: Layer, rec: LayerRecord, provisioning: str | None) -> bool:
    if provisioning == "thick":
        return rec.parent is None
    if provisioning == "thin":
        return False
    return src.map.all_data


def _remove_copies(io: Any, pool_dir: str, ids: list[str]) -> None:
    for lid in ids:
        remove_layer_files(io, pool_dir, lid)


async def run(vm: VolumeManager, job: Job) -> None:
    """The job: prepare, copy, switch over, clean up. Restarts from scratch when resumed."""
    params = job.params
    target = vm.catalog.pool(params["pool"])
    vol_rec = vm.catalog.volume(job.volume)
    recs = [vm.catalog.layer(i) for i in params["layers"]]
    if target is None or vol_rec is None or any(r is None for r in recs):
        raise CatalogError("conflict", "the volume, its layers or the target pool are gone")
    layer_recs = [r for r in recs if r is not None]
    if vol_rec.head != params["head"]:
        raise CatalogError("conflict", "the volume's head changed since the migration started")
    if any(r.pool == target.name for r in layer_recs):
        raise CatalogError("conflict", "some layers are already in the target pool")
    ids = [r.id for r in layer_recs]
    provisioning = params.get("provisioning")
    limiter = mv.RateLimiter(float(params.get("bps_limit") or 0))
    throttle = vm.background_throttle(params["source_pool"], target.name, limiter)
    # Stale copies from an interrupted attempt: the catalog says they are not live.
    await executor.run(_remove_copies, vm.io, target.path, ids)

    sources: dict[str, Layer] = {}
    dsts: dict[str, Layer] = {}
    vol: Volume | None = None
    mirror: mv.Mirror | None = None
    committed = False
    started = time.monotonic()
    try:
        for r in layer_recs:
            sources[r.id] = vm.layers.acquire(r)
        total = sum(mv.data_bytes(s) for s in sources.values())
        job.total, job.done = total, 0
        for r in layer_recs:
            src = sources[r.id]
            thick = _dst_thick(src, r, provisioning)
            await executor.run(Layer.create, vm.io, target.path, r.id, r.size, thick=thick)
            dsts[r.id] = await executor.run(Layer.open, vm.io, target.path, r.id, r.size, writable=True)
        head_id = params["head"]
        async with vm.tree_lock():
            vol = vm.volume(job.volume)
            assert vol is not None
            node = vol.node
            await node.commit_frozen()
            async with node.drained():
                assert node.head.id == head_id
                src_head = node.head
                mirror = mv.Mirror(
                    src_head,
                    dsts[head_id],
                    zero_detect=src_head.map.all_data and not dsts[head_id].map.all_data,
                )
                node.mirror = mirror
        log.info(
            "migration of %s to pool %s: copying %d layer(s), %d bytes",
            job.volume, target.name, len(ids), total, extra=job.log_extra(),
        )  # fmt: skip
        copied = 0
        last_note = 0.0

        def progress(n: int) -> None:
            nonlocal copied, last_note
            copied += n
            now = time.monotonic()
            if now - last_note >= _PROGRESS_EVERY:
                job.note_progress(min(copied, job.total), now)
                last_note = now

        # Immutable layers first (nothing writes them while the job runs).
        for lid, src in sources.items():
            if lid == head_id:
                continue
            await _copy_layer(src, dsts[lid], throttle, progress)
        # The head: one pass; failed mirror writes re-dirty chunks, so look until clean.
        while True:
            unsynced = 0
            for chunk in sorted(mirror.dirty):
                if mirror.error is not None:
                    raise mv.MirrorFailed(mv.target_error(mirror.error))
                await throttle(mv.CHUNK_BYTES)
                try:
                    n = await mirror.copy_chunk(chunk)
                    progress(n)
                    unsynced += n
                    if unsynced >= SYNC_EVERY:
                        # Sync as we go: the sync before the switch, which stalls writers
                        # on the filesystem while it runs, then has little left to flush.
                        await mirror.target.commit()
                        unsynced = 0
                except (OSError, StorageError) as e:
                    if mirror.error is not None:
                        raise mv.MirrorFailed(mv.target_error(mirror.error)) from e
                    await asyncio.sleep(0.05)  # retried in the next round
            # Make the copies durable before the switch; mirrored writes since are made
            # durable by the guests' own FLUSH/FUA (which also commit the target).
            for dst in dsts.values():
                await dst.commit()
            if mirror.error is not None:
                raise mv.MirrorFailed(mv.target_error(mirror.error))
            if mirror.dirty:  # a failed mirror write gave a chunk back to the pass
                continue
            job.note_progress(job.total)
            held = await vm.switch_over(job, target, sources, dsts, mirror, provisioning)
            if held is not None:
                committed = True
                break
        pause = held[1] - held[0]
        seconds = time.monotonic() - started
        params["result"] = {
            "pause_seconds": round(pause, 6),
            "seconds": round(seconds, 3),
            "copied_bytes": copied,
            "mirrored_writes": mirror.mirrored_writes,
            # When requests were held, on this host's monotonic clock (for benchmarks that
            # line it up with what an initiator saw).
            "switch_monotonic": [round(held[0], 6), round(held[1], 6)],
        }  # saved with the job's end (the catalog says done already)
        log.info(
            "migration of %s to pool %s done in %.2fs: %d bytes copied, %d writes mirrored, pause %.2f ms",
            job.volume, target.name, seconds, copied, mirror.mirrored_writes, pause * 1000,
            extra=job.log_extra(),
        )  # fmt: skip
    finally:
        if not committed:
            await _abandon(vm, job, vol, mirror, dsts, target, ids)
        for lid, src in sources.items():
            # After the swap the registry holds the copy, which took over our references.
            vm.layers.release(vm.layers.get(lid) or src if committed else src)
        if committed:
            await vm.delete_moved_files(params["source_pool"], ids)


async def _copy_layer(src: Layer, dst: Layer, throttle: mv.Throttle, progress: Any) -> None:
    """Copy an immutable layer page by page (1 MiB at a time), then commit it."""
    zero_detect = src.map.all_data and not dst.map.all_data
    nblocks = src.map.nblocks
    for chunk in sorted(mv.held_chunks(src)):
        first = chunk * mv.CHUNK_BLOCKS
        count = min(mv.CHUNK_BLOCKS, nblocks - first)
        await throttle(count * BLOCK)
        n = await mv.copy_blocks(src, dst, first, count, zero_detect=zero_detect)
        progress(n)
        if n and dst.io.blocking:
            await executor.run_in(dst.pool_dir, dst.io.start_writeback, dst.fd, first * BLOCK, count * BLOCK)
    await dst.commit()
    dst.close_journal()


async def _abandon(
    vm: VolumeManager,
    job: Job,
    vol: Volume | None,
    mirror: mv.Mirror | None,
    dsts: dict[str, Layer],
    target: PoolRecord,
    ids: list[str],
) -> None:
    """Stop mirroring and drop the copies: the source stays as it was. Runs to the end even
    when the job is being cancelled (a second cancel does not cut it short)."""

    async def undo() -> None:
        if vol is not None and mirror is not None and vol.node.mirror is mirror:
            async with vol.node.drained():
                vol.node.mirror = None
        for dst in dsts.values():
            dst.close()
        await executor.run(_remove_copies, vm.io, target.path, ids)

    task = asyncio.ensure_future(undo())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise
    if job.state == CANCELLED:
        log.info("migration of %s cancelled; it stays in its pool", job.volume, extra=job.log_extra())


def finish_swap(
    vm: VolumeManager,
    job: Job,
    target: PoolRecord,
    dsts: dict[str, Layer],
    affected: list[Volume],
    provisioning: str | None,
) -> None:
    """After the catalog commit, inside the drain: every open node reads the copies now.
    Synchronous on purpose: nothing may interleave between the commit and the swap."""
    old_layers: list[Layer] = []
    for lid, dst in dsts.items():
        old = vm.layers.replace(lid, dst)
        if old is not None:
            # The copy takes the old slot: every node's merged index stays right (rebuilding
            # it would stall the first requests after the switch), unless a conversion
            # changed which blocks a layer holds.
            dst.slot, old.slot = old.slot, dst.slot
            old_layers.append(old)
    keep = provisioning is None
    for v in affected:
        v.node.set_layers([dsts.get(lay.id, lay) for lay in v.node.layers], keep_index=keep)
        v.node.mirror = None
    for v in vm.open_nodes():
        if v.record.name == job.volume:
            thick = v.record.thick if provisioning is None else provisioning == "thick"
            v.record = dataclasses.replace(v.record, pool=target.name, thick=thick)
    # Done in the catalog already; in memory the job runs until the source files are gone
    # (so nothing else starts on the volume meanwhile), and can no longer be cancelled.
    job.params["committed"] = True
    for old in old_layers:
        old.close()
