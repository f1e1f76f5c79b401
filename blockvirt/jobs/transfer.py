"""Moving a volume with its snapshot tree to a pool of another kind of storage (file <-> RBD),
live, through the seam only.

    stage     the target backend makes an incoming volume (invisible) of the same name
    replay    every snapshot, parents first: the target's head is put back on the snapshot's
              tree parent (revert), resized, given the bytes that changed between the parent
              and the snapshot (changed_extents; a root gets all it holds), and snapshotted:
              the target gets the same tree, snapshot by snapshot
    head      the target's head goes back to where the source head sits; a mirror filter goes
              over the source head (drained), a pass copies the chunks the head changed since
              then while every guest change is mirrored before it completes
    switch    drain every export of the volume; nothing dirty; record the phase; promote the
              target (now visible); every export serves from the target; the source copy is
              retired (lookups skip it); resume; then delete the source copy

A crash or cancel before the promote leaves the source authoritative (the resumed job
discards the incoming copy and starts over); after it, the target (the resumed job deletes
the source copy). A linked clone moved this way becomes independent (its root snapshot gets
all the data it reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from blockvirt.jobs.manager import Job
from blockvirt.storage.backend import SnapshotInfo, VolumeBackend, VolumeRecord
from blockvirt.storage.catalog import CatalogError
from blockvirt.storage.export import Export
from blockvirt.storage.filters.mirror import MirrorFilter
from blockvirt.storage.node import StorageError
from blockvirt.storage.transfer import CHUNK, NodeReplica, Throttle, chunks_of, copy_range
from blockvirt.storage.volumes import VolumeManager

log = logging.getLogger("blockvirt.migration")

#: Phases recorded in the job's params (durable: a resumed job starts from what they say).
COPY, SWITCHING, SWITCHED = "copy", "switching", "switched"


def plan(vm: VolumeManager, source: VolumeBackend, rec: VolumeRecord, target_pool: str) -> dict[str, Any]:
    target = vm.catalog.pool(target_pool)
    assert target is not None
    return {
        "mode": "transfer",
        "source_backend": source.kind,
        "target_backend": target.backend,
        "pool": target_pool,
        "source_pool": rec.pool,
        "phase": COPY,
    }


def restore(vm: VolumeManager, jobs: list[Job]) -> None:
    """At start, before anything is served: a move that promoted its target before a crash
    must not see its source answer for the volume again."""
    for job in jobs:
        p = job.params
        if p.get("mode") != "transfer" or p.get("phase") not in (SWITCHING, SWITCHED):
            continue
        source, target = vm.backends.get(p["source_backend"]), vm.backends.get(p["target_backend"])
        if source is not None and target is not None and target.volume(job.volume) is not None:
            vm.retired[job.volume] = source


def _tree_order(snaps: list[SnapshotInfo]) -> list[SnapshotInfo]:
    """Parents before children; siblings by age."""
    by_name = {s.name: s for s in snaps}
    done: set[str] = set()
    out: list[SnapshotInfo] = []

    def visit(s: SnapshotInfo) -> None:
        if s.name in done:
            return
        if s.parent is not None and s.parent in by_name:
            visit(by_name[s.parent])
        done.add(s.name)
        out.append(s)

    for s in sorted(snaps, key=lambda s: (s.created, s.name)):
        visit(s)
    return out


async def run(vm: VolumeManager, job: Job, throttle: Throttle) -> None:
    p = job.params
    name = job.volume
    source = vm.backends[p["source_backend"]]
    target = vm.backends[p["target_backend"]]
    if p.get("phase") in (SWITCHING, SWITCHED) and target.volume(name) is not None:
        await _finish(vm, job, source, target)  # the switch happened before a crash
        return
    vm.unretire(name)
    await _discard_incoming(target, name)  # an interrupted attempt's copy
    p["phase"] = COPY
    job.checkpoint()
    src_rec = source.volume(name)
    if src_rec is None:
        raise CatalogError("conflict", f"volume {name!r} is gone")
    provisioning = p.get("provisioning")
    thick = src_rec.thick if provisioning is None else provisioning == "thick"
    started = time.monotonic()
    tgt_rec = await target.create(name, src_rec.size, thick=thick, pool=p["pool"], incoming=job.id)
    tgt_head = Export(tgt_rec, target.open(tgt_rec, None))  # private: no session ever sees it
    head: Export | None = None
    filt: MirrorFilter | None = None
    switched = False
    copied = 0
    try:
        snaps = _tree_order(await source.snapshot_tree(name))
        current = next((s.name for s in snaps if s.current), None)
        job.progress(0, sum(s.size for s in snaps) + src_rec.size)  # revised as it goes
        done_bytes = 0
        for s in snaps:
            if job.cancelled:
                raise asyncio.CancelledError
            tgt_rec = await _position(target, tgt_rec, tgt_head, s.parent, s.size)
            ranges = await source.changed_extents(src_rec, s.parent, s.name) if s.parent else [(0, s.size)]
            # Through the snapshot's export: its gate keeps out of the way of graph edits.
            snap_export = vm.volume(f"{name}@{s.name}")
            assert snap_export is not None
            for off, n in ranges:
                await throttle(n)
                copied += await copy_range(snap_export, tgt_head.base, off, n)
            done_bytes += s.size
            job.progress(done_bytes)
            await tgt_head.base.flush()
            await target.snapshot_create(tgt_rec, s.name, tgt_head)
        tgt_rec = await _position(target, tgt_rec, tgt_head, current, src_rec.size)
        # The live head: mirror from now on, then one pass over what it changed.
        async with vm.editing_pools(src_rec.pool, p["pool"]):
            head = vm.head(name)
            src_rec = head.record
            if src_rec.size != tgt_head.size:
                tgt_rec = await target.resize(tgt_rec, src_rec.size, tgt_head, force=True)
            dirty_ranges = await source.changed_extents(src_rec, current) if current else [(0, src_rec.size)]
            replica = NodeReplica(head.base, tgt_head.base, chunks_of(dirty_ranges))
            async with head.drained():
                filt = MirrorFilter(head.child, replica)
                head.insert(filt)
        job.progress(done_bytes, done_bytes + len(replica.dirty) * CHUNK)
        while True:
            for chunk in sorted(replica.dirty):
                if replica.error is not None:
                    raise StorageError(getattr(replica.error, "errno", 5), f"target failed: {replica.error}")
                if job.cancelled:
                    raise asyncio.CancelledError
                await throttle(CHUNK)
                try:
                    copied += await replica.copy_chunk(chunk)
                except (OSError, StorageError):
                    if replica.error is not None:
                        raise
                    await asyncio.sleep(0.05)
                done_bytes += CHUNK
                job.progress(done_bytes)
            await tgt_head.base.flush()
            if not replica.dirty:
                held = await _switch(vm, job, source, target, head, filt, replica)
                if held is not None:
                    switched = True
                    break
        pause = held[1] - held[0]
        p["result"] = {
            "pause_seconds": round(pause, 6),
            "seconds": round(time.monotonic() - started, 3),
            "copied_bytes": copied,
            "mirrored_writes": replica.mirrored_writes,
            "switch_monotonic": [round(held[0], 6), round(held[1], 6)],
        }
        log.info(
            "migration of %s to pool %s (%s) switched over: %d bytes copied, pause %.2f ms",
            name, p["pool"], target.kind, copied, pause * 1000, extra=job.log_extra(),
        )  # fmt: skip
    finally:
        if not switched:
            await _abandon(vm, job, target, head, filt, tgt_head, name)
    await _finish(vm, job, source, target)


async def _position(
    target: VolumeBackend, rec: VolumeRecord, head: Export, snap: str | None, size: int
) -> VolumeRecord:
    """Put the target's head on snapshot `snap` (None: leave it, a root writes all its bytes)
    and give it `size`."""
    if snap is not None:
        rec = await target.revert(rec, snap, head)
    if head.size != size:
        rec = await target.resize(rec, size, head, force=True)
    return rec


async def _switch(
    vm: VolumeManager,
    job: Job,
    source: VolumeBackend,
    target: VolumeBackend,
    head: Export,
    filt: MirrorFilter,
    replica: NodeReplica,
) -> tuple[float, float] | None:
    """Drain every export of the volume, re-check, promote the target and move the exports
    onto it. Returns when requests were held and released, or None to copy on."""
    name = job.volume
    started = time.monotonic()
    pools = (head.record.pool, job.params["pool"])
    async with vm.editing_pools(*pools), contextlib.AsyncExitStack() as drains:
        exports = vm.exports_cache.of_volume(name)
        for e in exports:
            await drains.enter_async_context(e.drained())
        if not replica.clean or replica.error is not None:
            return None
        if job.cancelled:
            raise asyncio.CancelledError
        await replica.target.flush()
        await _copy_settings(source, target, name)
        job.params["phase"] = SWITCHING
        job.checkpoint()
        rec = await target.promote(name)
        head.remove(filt)
        target.release(replica.target)  # the exports open their own nodes on the target
        vm.switch_exports(name, source, target, rec)
        vm.volume_moved(name, rec.pool)
        job.params["phase"] = SWITCHED
        job.params["committed"] = True
        job.checkpoint()
    return started, time.monotonic()


async def _finish(vm: VolumeManager, job: Job, source: VolumeBackend, target: VolumeBackend) -> None:
    """After the switch: delete the source copy (its exports moved to the target)."""
    name = job.volume
    vm.retired[name] = source
    rec = source.volume(name)  # the source still knows it: only the manager skips it
    if rec is not None:
        async with vm.editing_pools(rec.pool):
            await source.delete(rec)
    vm.unretire(name)


async def _copy_settings(source: VolumeBackend, target: VolumeBackend, name: str) -> None:
    """Access rules and QoS settings travel with the volume (each backend keeps its own)."""
    have = {(r.kind, r.value) for r in target.settings.acl_rules(name)}
    for r in source.settings.acl_rules(name):
        if (r.kind, r.value) not in have:
            await target.settings.add_acl_rule(name, r.kind, r.value, r.read_only)
    for vol, group, settings in source.settings.volume_qos():
        if vol == name:
            await target.settings.save_volume_qos(name, group, settings)


async def _discard_incoming(target: VolumeBackend, name: str) -> None:
    leftover = await target.incoming(name)
    if leftover is not None:
        await target.delete(leftover)


async def _abandon(
    vm: VolumeManager,
    job: Job,
    target: VolumeBackend,
    head: Export | None,
    filt: MirrorFilter | None,
    tgt_head: Export,
    name: str,
) -> None:
    """Stop mirroring and drop the incoming copy: the source stays as it was. Runs to the end
    even while the job is being cancelled."""

    async def undo() -> None:
        if head is not None and filt is not None and filt in head.filters():
            async with head.drained():
                head.remove(filt)
        target.release(tgt_head.base)
        try:
            await _discard_incoming(target, name)
        except (CatalogError, StorageError) as e:
            # What made the job fail is its error, not this (a target that went away fails
            # both); the next attempt removes the copy before it starts.
            log.warning(
                "migration of %s: its copy in pool %s stays for now: %s", name, job.params["pool"], e,
                extra=job.log_extra(),
            )  # fmt: skip

    task = asyncio.ensure_future(undo())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise
    if job.cancelled:
        log.info("migration of %s cancelled; it stays where it was", name, extra=job.log_extra())
