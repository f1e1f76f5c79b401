"""Hypothesis: VolumeManager (volumes, snapshots, clones, reverts, merges, flatten, restarts)
against an in-memory model: every volume a bytearray, every snapshot a frozen copy.

Each example is a list of operations run in one `asyncio.run` on real files under a fresh
data directory. After every operation the volume it touched reads exactly as the model says;
after every tree edit, every few operations and at the end, every volume and every VOL@SNAP
export does (whole reads, plus block status and sparse reads). Restarts (a new
VolumeManager on the same directory) come at random points, some while a merge or flatten
job is still running, which must resume. At the end the offline check finds no damage and
no leaks.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from blockvirt.jobs.manager import FAILED, RUNNING
from blockvirt.jobs.runners import register_all
from blockvirt.service import build_storage, check_data_dir
from blockvirt.storage.catalog import CatalogError
from blockvirt.storage.node import ZERO
from blockvirt.storage.volumes import VolumeManager

KiB = 1024
BLOCK = 4096
SIZES = (256 * KiB, 512 * KiB, 1024 * KiB)
MAX_VOLUMES = 5
MAX_SNAPSHOTS = 8
#: Check every node (not just the one an operation touched) at least this often.
FULL_CHECK_EVERY = 4

# ---------------------------------------------------------------- operations

picks = st.integers(0, 63)
offsets = st.one_of(
    st.integers(0, 15).map(lambda b: b * BLOCK),  # a hot spot: operations overlap
    st.integers(0, 16 * BLOCK),
    st.integers(0, 255).map(lambda b: b * BLOCK),  # block aligned
    st.integers(0, 2047).map(lambda s: s * 512),  # sector aligned
    st.integers(0, 1024 * KiB),  # anywhere
)
lengths = st.one_of(
    st.integers(1, 3 * BLOCK),  # unaligned, often crossing a block edge
    st.integers(1, 24).map(lambda n: n * BLOCK),
    st.integers(64 * KiB, 200 * KiB),  # past the inline write limit
)
seeds = st.integers(0, 2**32 - 1)
#: What follows a job-starting operation: wait for the job, let later data operations (and
#: reads) run while it does, or restart the manager under it (it must resume).
job_modes = st.sampled_from(("wait", "background", "restart"))
DATA_OPS = frozenset({"write", "batch", "zero", "trim", "flush"})

OP = st.one_of(
    st.tuples(st.just("write"), picks, offsets, lengths, seeds, st.booleans()),
    st.tuples(st.just("write"), picks, offsets, lengths, seeds, st.booleans()),
    st.tuples(st.just("write"), picks, offsets, lengths, seeds, st.booleans()),
    st.tuples(st.just("batch"), picks, st.lists(st.tuples(offsets, lengths, seeds), min_size=2, max_size=6)),
    st.tuples(st.just("zero"), picks, offsets, lengths, st.booleans(), st.booleans()),
    st.tuples(st.just("trim"), picks, offsets, lengths),
    st.tuples(st.just("trim"), picks, offsets, lengths),
    st.tuples(st.just("flush"), picks),
    st.tuples(st.just("snapshot"), picks),
    st.tuples(st.just("snapshot"), picks),
    st.tuples(st.just("revert"), picks, picks),
    st.tuples(st.just("clone"), picks),
    st.tuples(st.just("snapshot_delete"), picks, job_modes),
    st.tuples(st.just("snapshot_delete"), picks, job_modes),
    st.tuples(st.just("flatten"), picks, job_modes),
    st.tuples(st.just("delete"), picks),
    st.tuples(st.just("create"), st.sampled_from(SIZES), st.booleans()),
    st.tuples(st.just("reopen")),
)


@dataclass
class Model:
    volumes: dict[str, bytearray] = field(default_factory=dict)
    snapshots: dict[tuple[str, str], bytes] = field(default_factory=dict)
    counter: int = 0

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def volume(self, pick: int) -> str | None:
        names = sorted(self.volumes)
        return names[pick % len(names)] if names else None

    def snapshot(self, pick: int, volume: str | None = None) -> tuple[str, str] | None:
        keys = sorted(k for k in self.snapshots if volume is None or k[0] == volume)
        return keys[pick % len(keys)] if keys else None


def _range(size: int, offset: int, length: int) -> tuple[int, int]:
    offset %= size
    return offset, max(1, min(length, size - offset))


def _data(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


# ---------------------------------------------------------------- checks


async def _open(data_dir: str) -> VolumeManager:
    """Storage alone, as the service wires it (no QoS, no NBD), started."""
    vm, jobs = build_storage(data_dir)
    register_all(jobs, vm, None)
    await vm.start()
    jobs.resume()
    return vm


async def _check_export(vm: VolumeManager, export: str, want: bytes | bytearray, *, deep: bool) -> None:
    vol = vm.volume(export)
    assert vol is not None, f"{export} is gone"
    node = vol
    assert node.size == len(want), f"{export}: size {node.size}, model {len(want)}"
    got = bytes(await node.read(0, node.size))
    if got != want:
        bad = [b for b in range(0, len(want), BLOCK) if got[b : b + BLOCK] != want[b : b + BLOCK]]
        raise AssertionError(f"{export}: {len(bad)} block(s) differ, first at block {bad[0] // BLOCK}")
    if not deep:
        return
    pos = 0
    for seg_off, n, data in await node.read_sparse(0, node.size):
        assert seg_off == pos
        assert (bytes(n) if data is None else bytes(data)) == want[pos : pos + n], f"{export}: sparse read"
        pos += n
    assert pos == node.size
    pos = 0
    for n, flags in await node.block_status(0, node.size):
        if flags & ZERO:
            assert want[pos : pos + n] == bytes(n), f"{export}: block status says zero at {pos}"
        pos += n
    assert pos == node.size


async def _check_all(vm: VolumeManager, model: Model, *, deep: bool = False) -> None:
    assert sorted(r.name for r in vm.records()) == sorted(model.volumes)
    for name, want in model.volumes.items():
        await _check_export(vm, name, want, deep=deep)
        snaps = {s.name for s in vm.snapshots(name)}
        assert snaps == {s for v, s in model.snapshots if v == name}, f"{name}: snapshots {snaps}"
    for (vname, sname), content in model.snapshots.items():
        await _check_export(vm, f"{vname}@{sname}", content, deep=deep)


async def _settle_jobs(vm: VolumeManager) -> None:
    """Wait for every job, including merges that finishing jobs start."""
    while True:
        running = [j for j in vm.jobs.list() if j.state == RUNNING and j.task is not None]
        if not running:
            break
        for job in running:
            await vm.jobs.wait(job)
            assert job.task is not None and job.task.done()
    failed = [f"{j.kind} {j.id}: {j.error}" for j in vm.jobs.list() if j.state == FAILED]
    assert not failed, failed
    stuck = [j for j in vm.jobs.list() if j.state == RUNNING]
    assert not stuck, f"jobs still running without a task: {stuck}"


# ---------------------------------------------------------------- the run


async def _run(data_dir: str, ops: list[tuple[Any, ...]]) -> None:
    vm = await _open(data_dir)
    model = Model()
    first = model.name("v")
    await vm.create(first, SIZES[0])
    model.volumes[first] = bytearray(SIZES[0])
    try:
        for i, op in enumerate(ops):
            kind = op[0]
            if kind not in DATA_OPS and kind != "reopen":
                await _settle_jobs(vm)  # tree edits refuse to run beside a job
            touched, structural = await _apply(vm, model, op)
            mode = op[-1] if kind in ("snapshot_delete", "flatten") else "wait"
            if kind == "reopen" or mode == "restart":
                # A restart, maybe while a merge or flatten is running.
                await vm.close()
                vm = await _open(data_dir)
            if mode == "wait" and kind not in DATA_OPS:
                await _settle_jobs(vm)
            if structural or kind == "reopen" or i % FULL_CHECK_EVERY == FULL_CHECK_EVERY - 1:
                await _check_all(vm, model, deep=i % 3 == 0)
            elif touched is not None:
                await _check_export(vm, touched, model.volumes[touched], deep=False)
        await _settle_jobs(vm)
        await _check_all(vm, model, deep=True)
    finally:
        await vm.close()
    # The state survives a restart, and the offline check is clean.
    vm = await _open(data_dir)
    try:
        await _settle_jobs(vm)
        await _check_all(vm, model)
    finally:
        await vm.close()
    report = check_data_dir(data_dir)
    assert not report.damage, report.text()
    assert not report.leaks, report.text()
    assert not [n for n in report.notes if "torn" in n], report.text()


async def _apply(vm: VolumeManager, model: Model, op: tuple[Any, ...]) -> tuple[str | None, bool]:
    """Run one operation on both sides; returns (volume whose data changed, tree edited)."""
    kind = op[0]
    event(kind)
    if kind in ("write", "batch", "zero", "trim", "flush"):
        name = model.volume(op[1])
        if name is None:
            return None, False
        vol = vm.volume(name)
        assert vol is not None
        node, mem = vol, model.volumes[name]
        size = len(mem)
        if kind == "write":
            offset, length = _range(size, op[2], op[3])
            data = _data(op[4], length)
            await node.write(offset, data, fua=op[5])
            mem[offset : offset + length] = data
        elif kind == "batch":
            # Concurrent writes to disjoint byte ranges (possibly sharing blocks): all land.
            taken: list[tuple[int, int]] = []
            writes = []
            for off, ln, seed in op[2]:
                offset, length = _range(size, off, ln)
                if any(offset < b and a < offset + length for a, b in taken):
                    continue
                taken.append((offset, offset + length))
                data = _data(seed, length)
                writes.append(node.write(offset, data))
                mem[offset : offset + length] = data
            await asyncio.gather(*writes)
        elif kind in ("zero", "trim"):
            offset, length = _range(size, op[2], op[3])
            if kind == "zero":
                await node.zero(offset, length, may_trim=op[4], fua=op[5])
            else:
                await node.trim(offset, length)
            mem[offset : offset + length] = bytes(length)
        else:
            await node.flush()
        return name, False
    if kind == "snapshot":
        name = model.volume(op[1])
        if name is None or len(model.snapshots) >= MAX_SNAPSHOTS:
            return None, False
        snap = model.name("s")
        await vm.snapshot_create(name, snap)
        model.snapshots[(name, snap)] = bytes(model.volumes[name])
        return name, True
    if kind == "revert":
        name = model.volume(op[1])
        key = model.snapshot(op[2], name) if name is not None else None
        if name is None or key is None:
            return None, False
        await vm.snapshot_revert(name, key[1], force=True)
        model.volumes[name] = bytearray(model.snapshots[key])
        return name, True
    if kind == "clone":
        key = model.snapshot(op[1])
        if key is None or len(model.volumes) >= MAX_VOLUMES:
            return None, False
        new = model.name("c")
        await vm.clone(f"{key[0]}@{key[1]}", new)
        model.volumes[new] = bytearray(model.snapshots[key])
        return new, True
    if kind == "snapshot_delete":
        key = model.snapshot(op[1])
        if key is None:
            return None, False
        await vm.snapshot_delete(*key)
        del model.snapshots[key]
        return None, True
    if kind == "flatten":
        name = model.volume(op[1])
        if name is None:
            return None, False
        vol = vm.volume(name)
        assert vol is not None
        if len(vol.base.layers) == 1:
            with pytest.raises(CatalogError, match="nothing to flatten"):
                await vm.flatten(name)
            event("flatten: nothing to do")
        else:
            await vm.flatten(name)
        return name, True
    if kind == "delete":
        name = model.volume(op[1])
        if name is None or len(model.volumes) == 1:
            return None, False
        await vm.delete(name)
        del model.volumes[name]
        for key in [k for k in model.snapshots if k[0] == name]:
            del model.snapshots[key]
        return None, True
    if kind == "create":
        if len(model.volumes) >= MAX_VOLUMES:
            return None, False
        name = model.name("v")
        await vm.create(name, op[1], thick=op[2])
        model.volumes[name] = bytearray(op[1])
        return name, True
    assert kind == "reopen"
    return None, True


@settings(
    max_examples=160,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(ops=st.lists(OP, min_size=8, max_size=40))
# A merge (stream into the head) must carry the hidden layer's ZERO blocks over its parent.
@example(
    ops=[
        ("write", 0, 0, 8192, 1, False),
        ("snapshot", 0),
        ("trim", 0, 0, 8192),
        ("snapshot", 0),
        ("snapshot_delete", 1, "wait"),
    ]
)
# A hidden base under an immutable child: merged either way (commit overlays the child).
@example(
    ops=[
        ("write", 0, 0, 65536, 2, False),
        ("snapshot", 0),
        ("trim", 0, 0, 8192),
        ("write", 0, 16384, 4096, 3, False),
        ("snapshot", 0),
        ("write", 0, 4096, 100, 4, True),
        ("snapshot", 0),
        ("snapshot_delete", 0, "wait"),
        ("reopen",),
    ]
)
# A clone outlives its source volume; the orphaned base merges into the clone's head.
@example(
    ops=[
        ("write", 0, 0, 65536, 5, False),
        ("snapshot", 0),
        ("clone", 0),
        ("write", 0, 1000, 5000, 6, False),
        ("delete", 1),
        ("flatten", 0, "wait"),
        ("reopen",),
    ]
)
# Revert to an older snapshot (a branch), then delete both snapshots.
@example(
    ops=[
        ("write", 0, 0, 20000, 7, False),
        ("snapshot", 0),
        ("write", 0, 8192, 8192, 8, False),
        ("snapshot", 0),
        ("revert", 0, 0),
        ("zero", 0, 0, 4096, True, False),
        ("snapshot_delete", 1, "wait"),
        ("snapshot_delete", 0, "wait"),
    ]
)
# Restarts while a merge and a flatten run: both resume.
@example(
    ops=[
        ("write", 0, 0, 200 * KiB, 9, False),
        ("snapshot", 0),
        ("write", 0, 4096, 150 * KiB, 10, False),
        ("snapshot", 0),
        ("snapshot_delete", 1, "restart"),
        ("write", 0, 0, 100, 11, True),
        ("flatten", 0, "restart"),
    ]
)
# Guest writes, trims and reads while a merge and then a flatten run: the guest's data wins.
@example(
    ops=[
        ("write", 0, 0, 200 * KiB, 12, False),
        ("snapshot", 0),
        ("trim", 0, 0, 16 * KiB),
        ("write", 0, 64 * KiB, 100 * KiB, 13, False),
        ("snapshot", 0),
        ("snapshot_delete", 1, "background"),
        ("write", 0, 2000, 9000, 14, False),
        ("trim", 0, 100 * KiB, 24 * KiB),
        ("flush", 0),
        ("flatten", 0, "background"),
        ("write", 0, 150 * KiB, 3000, 15, True),
        ("zero", 0, 190 * KiB, 20 * KiB, False, False),
        ("reopen",),
    ]
)
def test_volume_manager_matches_model(tmp_path: Path, ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as data_dir:
        asyncio.run(_run(data_dir, ops))


# ---------------------------------------------------------------- guest writes beside a stream


@pytest.mark.parametrize("seed", range(6))
async def test_guest_writes_win_over_a_running_flatten(tmp_path: Path, seed: int) -> None:
    """Writes, unaligned writes and write-zeroes to blocks the head does not hold yet, while
    a flatten streams the parent's data into it. With the pwrite handed to a thread (as the
    stall guard or a large write does), the stream must not copy older data over blocks a
    guest write is filling."""
    vm = await _open(str(tmp_path))
    size = 4 * 1024 * KiB
    try:
        await vm.create("v", size)
        vol = vm.volume("v")
        assert vol is not None
        await vol.write(0, b"\x11" * size)
        await vol.flush()
        await vm.snapshot_create("v", "s")
        node = vol
        vol.base.guard.inline = False  # every pwrite leaves the loop: the window is wide open
        model = bytearray(b"\x11" * size)
        rng = random.Random(seed)
        job = await vm.flatten("v")
        for k in range(48):
            offset = rng.randrange(0, size - 64 * KiB) // BLOCK * BLOCK
            length = 64 * KiB
            if k % 6 == 5:
                offset, length = offset + 100, 3 * BLOCK  # read-modify-write at both ends
            if k % 8 == 7:
                await node.zero(offset, length, may_trim=False)
                model[offset : offset + length] = bytes(length)
            else:
                data = bytes([k + 0x20]) * length
                await node.write(offset, data)
                model[offset : offset + length] = data
        await vm.jobs.wait(job)
        assert job.state == "done", job.error
        got = bytes(await node.read(0, size))
        bad = [b // BLOCK for b in range(0, size, BLOCK) if got[b : b + BLOCK] != model[b : b + BLOCK]]
        assert not bad, f"{len(bad)} block(s) lost guest data, first {bad[:5]}"
        assert len(vol.base.layers) == 1
    finally:
        await vm.close()
