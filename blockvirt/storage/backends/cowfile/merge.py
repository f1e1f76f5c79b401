"""The file backend's background work: merge (stream a hidden layer into its only child),
commit (overlay a small immutable child onto its hidden parent) and flatten (copy everything a
volume reads from its ancestors into its head).

Each copies while guests keep using the chain (stream.py keeps their writes winning), then
changes the catalog and every open chain in one step with the affected exports drained; the
job's row ends in that same transaction, so a crash after it never redoes the work, and a
crash before it resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from blockvirt.storage.backends.cowfile import gc
from blockvirt.storage.backends.cowfile import stream as streaming
from blockvirt.storage.backends.cowfile.chain import ChainNode
from blockvirt.storage.backends.cowfile.layer import Layer
from blockvirt.storage.backends.cowfile.layer_map import BLOCK
from blockvirt.storage.backends.cowfile.state import FileState
from blockvirt.storage.catalog import LayerRecord
from blockvirt.storage.work import JobKind, WorkContext


async def run(st: FileState, ctx: WorkContext) -> None:
    if ctx.kind == JobKind.MERGE:
        await run_merge(st, ctx)
    elif ctx.kind == JobKind.COMMIT:
        await run_commit(st, ctx)
    elif ctx.kind == JobKind.FLATTEN:
        await run_flatten(st, ctx)
    else:
        raise AssertionError(f"the file backend runs no {ctx.kind} work")


def _progress(ctx: WorkContext) -> Callable[[int, int], object]:
    def progress(done: int, total: int) -> None:
        ctx.progress(done, total)

    return progress


def _checkpoint(ctx: WorkContext) -> Callable[[int], object]:
    def checkpoint(next_page: int) -> None:
        ctx.params["cursor"] = next_page
        ctx.checkpoint()

    return checkpoint


async def run_commit(st: FileState, ctx: WorkContext) -> None:
    """Overlay the immutable child `source` onto its hidden parent `target`, then let the
    parent take the child's place (its name, its children) and drop the child."""
    src_rec = st.catalog.layer(ctx.params["source"])
    tgt_rec = st.catalog.layer(ctx.params["target"])
    if src_rec is None or tgt_rec is None or src_rec.parent != tgt_rec.id:
        ctx.note("nothing to commit (already done)")  # a crash after its commit
        return
    target = st.layers.acquire(tgt_rec, writable=True)
    try:
        if src_rec.size > target.size:
            _grow_for(st, target, src_rec.size)
        source = st.layers.acquire(src_rec)
        try:
            await streaming.overlay(
                target,
                source,
                start_page=ctx.params["cursor"],
                on_progress=_progress(ctx),
                checkpoint=_checkpoint(ctx),
            )
        finally:
            st.layers.release(source)
        await _swap_in_parent(st, ctx, parent=target, child=src_rec)
    finally:
        st.layers.release(target)


def _grow_for(st: FileState, parent: Layer, size: int) -> None:
    """The child grew after its parent was frozen: the parent must hold the child's blocks
    past its own end. The new blocks are UNALLOC (a thick layer's read as its zeroed file),
    which reads as before: where an ancestor reaches, the child's resize marked them ZERO
    or holds them, and the overlay copies that. The size goes to the catalog before any
    block is laid there, so a restart after a crash opens the layer with room for them
    (its journal's states past the recorded end would be cut off)."""
    parent.resize_file(size)
    parent.map.grow(-(-size // BLOCK))
    with st.catalog.transaction() as t:
        t.set_layer_size(parent.id, size)


async def _swap_in_parent(st: FileState, ctx: WorkContext, *, parent: Layer, child: LayerRecord) -> None:
    """The parent now reads as the child: it takes the child's name and children."""
    async with st.lock, contextlib.AsyncExitStack() as drains:
        affected = await st.drain_layers({child.id}, drains)
        with st.catalog.transaction() as t:
            t.rename_snapshot_layer(child.id, parent.id)
            t.reparent_children(child.id, parent.id)
            t.delete_layer(child.id)
            t.finish_job(ctx.id)
        ctx.mark_done()
        for e in affected:
            node = e.base
            assert isinstance(node, ChainNode)
            old = node.layers
            idx = next(i for i, lay in enumerate(old) if lay.id == child.id)
            node.set_layers([*old[:idx], *old[idx + 1 :]], keep_index=False)
            st.layers.release(old[idx])
    if st.layers.get(child.id) is None:
        await st.delete_files(child)
    async with st.lock:
        await gc.collect(st, start_merges=True)


async def run_merge(st: FileState, ctx: WorkContext) -> None:
    """Stream the hidden layer `source` into its only child `target`, then drop it."""
    src_rec = st.catalog.layer(ctx.params["source"])
    tgt_rec = st.catalog.layer(ctx.params["target"])
    if src_rec is None or tgt_rec is None or tgt_rec.parent != src_rec.id:
        ctx.note("nothing to merge (already done)")
        return
    target = st.layers.acquire(tgt_rec, writable=True)
    try:
        source = st.layers.acquire(src_rec)
        try:
            await _stream(st, ctx, target, [source], keep_zeros=src_rec.parent is not None)
        finally:
            st.layers.release(source)
        await _rechain(st, ctx, target, new_parent=src_rec.parent, dropped=[src_rec])
    finally:
        st.layers.release(target)


async def run_flatten(st: FileState, ctx: WorkContext) -> None:
    tgt_rec = st.catalog.layer(ctx.params["target"])
    if tgt_rec is None or tgt_rec.parent is None:
        return
    target = st.layers.acquire(tgt_rec, writable=True)
    sources = st.layers.acquire_chain(tgt_rec.parent, writable_head=False)
    try:
        await _stream(st, ctx, target, sources, keep_zeros=False)
        await _rechain(st, ctx, target, new_parent=None, dropped=[])
    finally:
        st.layers.release_all(sources)
        st.layers.release(target)


async def _stream(
    st: FileState, ctx: WorkContext, target: Layer, sources: list[Layer], *, keep_zeros: bool
) -> None:
    def notify(first: int, count: int, is_data: bool) -> None:
        # A chain headed by the target reads the streamed blocks from it from now on.
        for node in st.nodes_headed_by(target.id):
            if is_data:
                node.merged.set_owner(first, count, node.head.slot)

    await streaming.stream(
        target,
        sources,
        keep_zeros=keep_zeros,
        start_page=ctx.params["cursor"],
        on_progress=_progress(ctx),
        checkpoint=_checkpoint(ctx),
        notify=notify,
    )


async def _rechain(
    st: FileState, ctx: WorkContext, target: Layer, *, new_parent: str | None, dropped: list[LayerRecord]
) -> None:
    """Commit: target's parent becomes `new_parent`, dropped layers leave every open chain."""
    async with st.lock, contextlib.AsyncExitStack() as drains:
        affected = await st.drain_layers({target.id}, drains)
        if ctx.cancelled:
            return
        with st.catalog.transaction() as t:
            t.set_layer_parent(target.id, new_parent)
            for rec in dropped:
                t.delete_layer(rec.id)
            t.finish_job(ctx.id)
        ctx.mark_done()
        for e in affected:
            node = e.base
            assert isinstance(node, ChainNode)
            old = node.layers
            idx = next(i for i, lay in enumerate(old) if lay.id == target.id)
            tail = st.layers.acquire_chain(new_parent, writable_head=False) if new_parent else []
            node.set_layers([*old[: idx + 1], *tail], keep_index=False)
            st.layers.release_all(old[idx + 1 :])
    for rec in dropped:
        if st.layers.get(rec.id) is None:
            await st.delete_files(rec)
    async with st.lock:
        await gc.collect(st, start_merges=True)
