"""Garbage in file pools: layers nothing needs any more, hidden layers to merge away, and files
a crash left behind.

A layer is live while a volume's head, a snapshot, or a live layer's chain reaches it. A layer
that is not live and not open goes (catalog row, then files). A hidden layer (no snapshot
names it, no volume heads it) with exactly one child is merged into that child by a job, or
the child is committed down into it when that moves less data.
"""

from __future__ import annotations

import logging
import os

from blockvirt.storage import pooldirs
from blockvirt.storage.backends.cowfile import stream as streaming
from blockvirt.storage.backends.cowfile.layer import LAYER_FILE_RE, layer_paths
from blockvirt.storage.backends.cowfile.state import FileState
from blockvirt.storage.catalog import FILE_BACKEND, LayerRecord
from blockvirt.storage.work import JobKind, JobView

log = logging.getLogger("blockvirt.volumes")


def job_layers(st: FileState, job: JobView) -> set[str]:
    """Layers a running job of the file backend reads or writes: its source and target, the
    parent a merge re-points its target to, the whole chain a flatten reads, and the layers a
    migration moves."""
    p = job.params
    out = {x for x in (p.get("source"), p.get("target")) if isinstance(x, str)}
    if job.kind == JobKind.MERGE and isinstance(p.get("source"), str):
        src = st.catalog.layer(p["source"])
        if src is not None and src.parent is not None:
            out.add(src.parent)
    if job.kind == JobKind.FLATTEN and isinstance(p.get("target"), str) and st.catalog.layer(p["target"]):
        out.update(r.id for r in st.catalog.chain(p["target"]))
    out.update(x for x in p.get("layers", []) if isinstance(x, str))
    return out


async def collect(st: FileState, *, start_merges: bool) -> list[JobView]:
    """Delete layers nothing needs; start merges of hidden layers with one child. Runs under
    the file pools' edit lock."""
    while True:
        live = st.catalog.live_layers()
        removed = 0
        for rec in st.catalog.layers():
            if rec.id in live or st.layers.get(rec.id) is not None:
                continue
            if st.catalog.children(rec.id):
                continue  # a child is garbage too and goes first; the next pass takes this one
            with st.catalog.transaction() as t:
                t.delete_layer(rec.id)
            await st.delete_files(rec)
            removed += 1
            log.info("removed unused layer %s", rec.id)
        # Again while that freed parents (a garbage child still open keeps its parent).
        if not removed or not any(
            r.id not in live and st.layers.get(r.id) is None for r in st.catalog.layers()
        ):
            break
    started: list[JobView] = []
    if not start_merges:
        return started
    heads = {v.head: v.name for v in st.catalog.volumes()}
    named = {s.layer for s in st.catalog.all_snapshots()}
    # Layers a running job reads or writes wait for it: it collects again when it ends.
    busy: set[str | None] = set()
    for job in st.host.jobs.running():
        busy.update(job_layers(st, job))
    for rec in st.catalog.layers():
        if rec.id in heads or rec.id in named or rec.id in busy or rec.parent in busy:
            continue
        children = st.catalog.children(rec.id)
        if len(children) != 1:
            continue
        child = children[0]
        if child.id in busy:
            continue
        owner = heads.get(child.id) or _volume_of_layer(st, child.id) or "-"
        kind = JobKind.MERGE
        params = {"backend": FILE_BACKEND, "source": rec.id, "target": child.id, "cursor": 0}
        if child.id not in heads and _commit_is_cheaper(st, rec, child):
            # Move the (smaller) immutable child down into its parent instead.
            kind = JobKind.COMMIT
            params = {"backend": FILE_BACKEND, "source": child.id, "target": rec.id, "cursor": 0}
        started.append(st.host.jobs.start(kind, owner, params))
        busy.update((rec.id, child.id, rec.parent))  # the same rule within this pass
    return started


def _volume_of_layer(st: FileState, layer_id: str) -> str | None:
    for s in st.catalog.snapshots_of_layer(layer_id):
        return s.volume
    for v in st.catalog.volumes():
        if layer_id in {r.id for r in st.catalog.chain(v.head)}:
            return v.name
    return None


def _commit_is_cheaper(st: FileState, parent: LayerRecord, child: LayerRecord) -> bool:
    p = st.layers.acquire(parent)
    c = st.layers.acquire(child)
    try:
        return streaming.blocks_held(c) < streaming.blocks_to_stream(c, p)
    finally:
        st.layers.release(c)
        st.layers.release(p)


def remove_orphan_files(st: FileState) -> None:
    """At start (blocking): remove layer files the catalog does not place in their pool (left
    by a crash during a create or a migration). Nothing else runs yet.

    Never a file another pool may need: a directory two pools share (through a symlink) is
    left alone, and a copy of a layer the catalog places in another pool goes only if that
    pool's own files of it are there, in another directory. Otherwise the sweep refuses,
    and says so: `blockvirt check` tells what to do."""
    pools = [p for p in st.catalog.pools() if p.backend == FILE_BACKEND]
    dirs = {p.name: pooldirs.identity(p.path) for p in pools}
    shared = pooldirs.shared(pools)
    for prec in pools:
        if prec.name in shared:
            log.error(
                "pool %s shares its directory %s with pool(s) %s: not removing any file from it "
                "(run blockvirt check)", prec.name, prec.path, ", ".join(shared[prec.name]),
            )  # fmt: skip
            continue
        try:
            entries = os.listdir(prec.path)
        except OSError:
            continue
        for entry in entries:
            if not LAYER_FILE_RE.fullmatch(entry):
                continue
            rec = st.catalog.layer(entry[:32])
            if rec is not None and rec.pool == prec.name:
                continue
            if rec is not None and not _held_elsewhere(st, rec, dirs, dirs[prec.name]):
                log.error(
                    "pool %s: not removing %s: the catalog places layer %s in pool %s, whose own "
                    "files of it are missing (this may be the only copy; run blockvirt check)",
                    prec.name, entry, rec.id, rec.pool,
                )  # fmt: skip
                continue
            st.io.unlink(os.path.join(prec.path, entry))
            log.info("removed orphan file %s from pool %s", entry, prec.name)


def _held_elsewhere(
    st: FileState, rec: LayerRecord, dirs: dict[str, pooldirs.DirId | None], here: pooldirs.DirId | None
) -> bool:
    """Whether the layer's files are whole in its own pool's directory, which is not `here`."""
    own = dirs.get(rec.pool)
    if own is None or own == here:
        return False
    return all(os.path.isfile(p) for p in layer_paths(st.catalog.layer_dir(rec), rec.id))
