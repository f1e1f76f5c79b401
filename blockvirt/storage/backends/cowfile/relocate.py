"""Moving a volume, with its whole snapshot tree, between two file pools, live.

    prepare   every layer of the volume's tree gets an empty copy (same id) in the target pool;
              a mirror filter goes over the head's chain (drained edit: no request straddles it)
    copy      immutable layers are copied once; the head by one pass over a dirty set while
              every guest change to an already copied chunk is mirrored before it completes
    switch    once the pass is done: drain every export that reads a moved layer, check nothing
              is dirty, commit the catalog (each layer's pool, the volume's pool, the job's end)
              in one transaction, swap the layers in every node, take the filter out, resume.
              Clients see a pause, never an error or a reconnect.
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
from collections.abc import Awaitable, Callable

from blockvirt.storage import executor, pooldirs
from blockvirt.storage.backend import MoveHooks
from blockvirt.storage.backends.cowfile import copy as cp
from blockvirt.storage.backends.cowfile.chain import ChainNode
from blockvirt.storage.backends.cowfile.layer import Layer, remove_layer_files
from blockvirt.storage.backends.cowfile.layer_map import BLOCK
from blockvirt.storage.backends.cowfile.state import FileState
from blockvirt.storage.catalog import CatalogError, LayerRecord, PoolRecord
from blockvirt.storage.export import Export
from blockvirt.storage.filters.mirror import MirrorFilter
from blockvirt.storage.node import StorageError
from blockvirt.storage.pools import fs_space
from blockvirt.storage.work import WorkContext

log = logging.getLogger("blockvirt.migration")

#: The head's copy is synced after every this many bytes.
SYNC_EVERY = 32 * 1024 * 1024
#: The pass reports progress (for rate and ETA) at most this often.
_PROGRESS_EVERY = 0.1

#: An async pause before copying `nbytes` (rate limit, QoS background admission).
Throttle = Callable[[int], Awaitable[None]]

PROVISIONING = (None, "thick", "thin")


def check(
    st: FileState, name: str, target: PoolRecord, layers: list[LayerRecord], provisioning: str | None
) -> None:
    """Refuse a move that cannot fit, or that cannot be done (before the job starts)."""
    _refuse_shared_directory(st, target, layers)
    need = sum(st.layer_allocated(lr.id) for lr in layers)
    if provisioning == "thick":
        need += sum(lr.size for lr in layers if lr.parent is None)
    fs = fs_space(target.path)
    if fs is not None and fs[2] < need and not _same_fs(st, layers, target):
        raise CatalogError(
            "no-space", f"pool {target.name!r} has {fs[2]} bytes free; moving {name!r} needs about {need}"
        )


def _refuse_shared_directory(st: FileState, target: PoolRecord, layers: list[LayerRecord]) -> None:
    """Two pools on one directory (through a symlink): the move's first step, which removes
    stale copies in the target, would remove the very files it is about to copy."""
    here = pooldirs.identity(target.path)
    for lr in layers:
        if here is not None and pooldirs.identity(st.catalog.layer_dir(lr)) == here:
            raise CatalogError(
                "conflict",
                f"pools {lr.pool!r} and {target.name!r} share one directory: nothing can move between them",
            )


def _same_fs(st: FileState, move: list[LayerRecord], target: PoolRecord) -> bool:
    """Whether every layer already lives on the target's filesystem (no new space needed)."""
    try:
        dev = os.stat(target.path).st_dev
        return all(os.stat(st.catalog.layer_dir(lr)).st_dev == dev for lr in move)
    except OSError:
        return False


def _dst_thick(src: Layer, rec: LayerRecord, provisioning: str | None) -> bool:
    if provisioning == "thick":
        return rec.parent is None
    if provisioning == "thin":
        return False
    return src.map.all_data


def _remove_copies(io: object, pool_dir: str, ids: list[str]) -> None:
    for lid in ids:
        remove_layer_files(io, pool_dir, lid)  # type: ignore[arg-type]


async def run(st: FileState, ctx: WorkContext, hooks: MoveHooks) -> None:
    """The move: prepare, copy, switch over, clean up. Restarts from scratch when resumed."""
    params = ctx.params
    target = st.catalog.pool(params["pool"])
    vol_row = st.catalog.volume(ctx.volume)
    recs = [st.catalog.layer(i) for i in params["layers"]]
    if target is None or vol_row is None or any(r is None for r in recs):
        raise CatalogError("conflict", "the volume, its layers or the target pool are gone")
    layer_recs = [r for r in recs if r is not None]
    if vol_row.head != params["head"]:
        raise CatalogError("conflict", "the volume's head changed since the migration started")
    if any(r.pool == target.name for r in layer_recs):
        raise CatalogError("conflict", "some layers are already in the target pool")
    ids = [r.id for r in layer_recs]
    provisioning = params.get("provisioning")
    _refuse_shared_directory(st, target, layer_recs)  # checked again: symlinks change
    # Stale copies from an interrupted attempt: the catalog says they are not live.
    await executor.run(_remove_copies, st.io, target.path, ids)

    sources: dict[str, Layer] = {}
    dsts: dict[str, Layer] = {}
    head: Export | None = None
    mirror: cp.LayerMirror | None = None
    filt: MirrorFilter | None = None
    committed = False
    started = time.monotonic()
    try:
        for r in layer_recs:
            sources[r.id] = st.layers.acquire(r)
        total = sum(cp.data_bytes(s) for s in sources.values())
        ctx.progress(0, total)
        for r in layer_recs:
            src = sources[r.id]
            thick = _dst_thick(src, r, provisioning)
            await executor.run(Layer.create, st.io, target.path, r.id, r.size, thick=thick)
            dsts[r.id] = await executor.run(Layer.open, st.io, target.path, r.id, r.size, writable=True)
        head_id = params["head"]
        async with st.lock:
            head = hooks.open_head()
            node = head.base
            assert isinstance(node, ChainNode)
            await node.commit_frozen()
            async with head.drained():
                assert node.head.id == head_id
                src_head = node.head
                mirror = cp.LayerMirror(
                    src_head,
                    dsts[head_id],
                    zero_detect=src_head.map.all_data and not dsts[head_id].map.all_data,
                )
                filt = MirrorFilter(head.child, mirror)
                head.insert(filt)
        log.info(
            "migration of %s to pool %s: copying %d layer(s), %d bytes",
            ctx.volume, target.name, len(ids), total, extra={"job": ctx.id, "volume": ctx.volume},
        )  # fmt: skip
        copied = 0
        last_note = 0.0

        def progress(n: int) -> None:
            nonlocal copied, last_note
            copied += n
            now = time.monotonic()
            if now - last_note >= _PROGRESS_EVERY:
                ctx.progress(min(copied, total))
                last_note = now

        # Immutable layers first (nothing writes them while the job runs).
        for lid, src in sources.items():
            if lid == head_id:
                continue
            await _copy_layer(src, dsts[lid], hooks.throttle, progress)
        # The head: one pass; failed mirror writes re-dirty chunks, so look until clean.
        while True:
            unsynced = 0
            for chunk in sorted(mirror.dirty):
                if mirror.error is not None:
                    raise cp.MirrorFailed(cp.target_error(mirror.error))
                await hooks.throttle(cp.CHUNK_BYTES)
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
                        raise cp.MirrorFailed(cp.target_error(mirror.error)) from e
                    await asyncio.sleep(0.05)  # retried in the next round
            # Make the copies durable before the switch; mirrored writes since are made
            # durable by the guests' own FLUSH/FUA (which also commit the target).
            for dst in dsts.values():
                await dst.commit()
            if mirror.error is not None:
                raise cp.MirrorFailed(cp.target_error(mirror.error))
            if mirror.dirty:  # a failed mirror write gave a chunk back to the pass
                continue
            ctx.progress(total)
            held = await _switch_over(st, ctx, target, dsts, mirror, provisioning, hooks)
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
            ctx.volume, target.name, seconds, copied, mirror.mirrored_writes, pause * 1000,
            extra={"job": ctx.id, "volume": ctx.volume},
        )  # fmt: skip
    finally:
        if not committed:
            await _abandon(st, ctx, head, filt, dsts, target, ids)
        for lid, src in sources.items():
            # After the swap the registry holds the copy, which took over our references.
            st.layers.release(st.layers.get(lid) or src if committed else src)
        if committed:
            await _delete_moved_files(st, params["source_pool"], ids)


async def _copy_layer(src: Layer, dst: Layer, throttle: Throttle, progress: Callable[[int], None]) -> None:
    """Copy an immutable layer page by page (1 MiB at a time), then commit it."""
    zero_detect = src.map.all_data and not dst.map.all_data
    nblocks = src.map.nblocks
    for chunk in sorted(cp.held_chunks(src)):
        first = chunk * cp.CHUNK_BLOCKS
        count = min(cp.CHUNK_BLOCKS, nblocks - first)
        await throttle(count * BLOCK)
        n = await cp.copy_blocks(src, dst, first, count, zero_detect=zero_detect)
        progress(n)
        if n and dst.io.blocking:
            await executor.run_in(dst.pool_dir, dst.io.start_writeback, dst.fd, first * BLOCK, count * BLOCK)
    await dst.commit()
    dst.close_journal()


async def _switch_over(
    st: FileState,
    ctx: WorkContext,
    target: PoolRecord,
    dsts: dict[str, Layer],
    mirror: cp.LayerMirror,
    provisioning: str | None,
    hooks: MoveHooks,
) -> tuple[float, float] | None:
    """Drain every export that reads a moved layer, re-check, commit the catalog and swap the
    layers in. Returns when requests were held and released (time.monotonic()), or None when
    the copy is not clean after all (the caller copies on and tries again)."""
    started = time.monotonic()
    async with st.lock, contextlib.AsyncExitStack() as drains:
        affected = await st.drain_layers(set(dsts), drains)
        if not mirror.clean or mirror.error is not None:
            return None
        if ctx.cancelled:
            raise asyncio.CancelledError
        row = st.catalog.volume(ctx.volume)
        assert row is not None
        thick = row.thick if provisioning is None else provisioning == "thick"
        with st.catalog.transaction() as t:
            for lid, dst in dsts.items():
                t.move_layer(lid, target.name, dst.map.all_data)
            t.move_volume(row.name, target.name, thick)
            t.finish_job(ctx.id)
        _finish_swap(st, ctx, target, dsts, affected, provisioning)
        hooks.switched()
    return started, time.monotonic()


def _finish_swap(
    st: FileState,
    ctx: WorkContext,
    target: PoolRecord,
    dsts: dict[str, Layer],
    affected: list[Export],
    provisioning: str | None,
) -> None:
    """After the catalog commit, inside the drain: every open node reads the copies now.
    Synchronous on purpose: nothing may interleave between the commit and the swap."""
    old_layers: list[Layer] = []
    for lid, dst in dsts.items():
        old = st.layers.replace(lid, dst)
        if old is not None:
            # The copy takes the old slot: every node's merged index stays right (rebuilding
            # it would stall the first requests after the switch), unless a conversion
            # changed which blocks a layer holds.
            dst.slot, old.slot = old.slot, dst.slot
            old_layers.append(old)
    keep = provisioning is None
    for e in affected:
        node = e.base
        assert isinstance(node, ChainNode)
        node.set_layers([dsts.get(lay.id, lay) for lay in node.layers], keep_index=keep)
        for f in e.filters():
            if isinstance(f, MirrorFilter) and isinstance(f.replica, cp.LayerMirror):
                e.remove(f)
    for e in st.chain_exports():
        if e.volume == ctx.volume:
            thick = e.record.thick if provisioning is None else provisioning == "thick"
            e.record = dataclasses.replace(e.record, pool=target.name, thick=thick)
    # Done in the catalog already; in memory the job runs until the source files are gone
    # (so nothing else starts on the volume meanwhile), and can no longer be cancelled.
    ctx.params["committed"] = True
    for old in old_layers:
        old.close()


async def _abandon(
    st: FileState,
    ctx: WorkContext,
    head: Export | None,
    filt: MirrorFilter | None,
    dsts: dict[str, Layer],
    target: PoolRecord,
    ids: list[str],
) -> None:
    """Stop mirroring and drop the copies: the source stays as it was. Runs to the end even
    when the job is being cancelled (a second cancel does not cut it short)."""

    async def undo() -> None:
        if head is not None and filt is not None and filt in head.filters():
            async with head.drained():
                head.remove(filt)
        for dst in dsts.values():
            dst.close()
        await executor.run(_remove_copies, st.io, target.path, ids)

    task = asyncio.ensure_future(undo())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise
    if ctx.cancelled:
        log.info("migration of %s cancelled; it stays in its pool", ctx.volume, extra={"job": ctx.id})


async def _delete_moved_files(st: FileState, pool: str, layer_ids: list[str]) -> None:
    """Remove the source copies of moved layers (after the commit made them garbage)."""
    prec = st.catalog.pool(pool)
    if prec is None:
        return
    for lid in layer_ids:
        rec = st.catalog.layer(lid)
        if rec is not None and rec.pool == pool:
            continue  # never the live copy
        await st.unlink(remove_layer_files, st.io, prec.path, lid)
