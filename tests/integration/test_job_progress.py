"""Progress of storage jobs through the API: a flatten, and the merge and commit a snapshot
delete starts, report bytes (the bytes they move), a rate and an ETA while they run, and
done == total at the end. The pool's reads are slowed (fault injection) so a few-MiB job
runs long enough to be watched."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB
HEAD_WRITE = 64 * KiB  # written after the snapshot: a stream does not bring these blocks


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockvirtServer]:
    data_dir = tmp_path_factory.mktemp("progress") / "data"
    with BlockvirtServer(data_dir, extra_args=("--fault-injection",)) as s:
        yield s


async def _write(uri: str, offset: int, data: bytes) -> None:
    async with await NbdClient.connect(uri) as c:
        await c.write(offset, data)
        await c.flush()


def _volume_with_snapshot(server: BlockvirtServer, name: str) -> None:
    """SIZE bytes of data in snapshot s1's layer, HEAD_WRITE more in the head above it."""
    uri = server.create_volume(name, SIZE)
    asyncio.run(_write(uri, 0, os.urandom(SIZE)))
    server.api.post(f"/api/v1/volumes/{name}/snapshots", {"name": "s1"})
    asyncio.run(_write(uri, 0, b"h" * HEAD_WRITE))


def _slow_reads(server: BlockvirtServer, on: bool) -> None:
    if on:  # each read of a run of up to 64 blocks (256 KiB) waits: 32 of them for 8 MiB
        rule = {"pool": "default", "ops": ["read"], "delay_ms": 40}
        server.api.request("PUT", "/api/v1/debug/faults", rule)
    else:
        server.api.delete("/api/v1/debug/faults/default")


Job = dict[str, Any]


def _watch(server: BlockvirtServer, job_id: str, timeout: float = 60) -> tuple[list[Job], Job]:
    """The job's views while it runs, and its last view."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = server.api.get(f"/api/v1/jobs/{job_id}")
        if job["state"] != "running":
            return seen, job
        seen.append(job)
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def _assert_reported(seen: list[dict[str, Any]], end: dict[str, Any], moved: int) -> None:
    assert end["state"] == "done", end
    assert end["unit"] == "bytes" and end["done"] == end["total"] == moved, end
    assert seen, "the job ended before it could be watched"
    for job in seen:
        assert job["unit"] == "bytes" and job["total"] == moved, job
        assert 0 <= job["done"] <= job["total"]
    moving = [j for j in seen if 0 < j["done"] < j["total"]]
    assert len(moving) >= 3, [(j["done"], j["rate"]) for j in seen]  # it moves in steps, not pages
    rated = [j for j in moving if j["rate"] and j["eta_seconds"] is not None]
    assert rated, moving
    for j in rated:
        # The pool serves about 256 KiB per 40 ms read: a few MiB/s, far from 0 or a page.
        assert 256 * KiB <= j["rate"] <= 64 * MiB, j
        assert j["eta_seconds"] == pytest.approx((j["total"] - j["done"]) / j["rate"], abs=0.2), j


def test_flatten_reports_bytes_rate_and_eta(server: BlockvirtServer) -> None:
    _volume_with_snapshot(server, "flat")
    _slow_reads(server, True)
    try:
        job = server.api.post("/api/v1/volumes/flat/flatten", {})
        seen, end = _watch(server, job["id"])
    finally:
        _slow_reads(server, False)
    assert end["kind"] == "flatten"
    _assert_reported(seen, end, SIZE - HEAD_WRITE)


def test_snapshot_delete_merge_reports_bytes_rate_and_eta(server: BlockvirtServer) -> None:
    _volume_with_snapshot(server, "merged")
    _slow_reads(server, True)
    try:
        out = server.api.delete("/api/v1/volumes/merged/snapshots/s1")
        seen, end = _watch(server, out["job"])
    finally:
        _slow_reads(server, False)
    assert end["kind"] == "merge"
    _assert_reported(seen, end, SIZE - HEAD_WRITE)


def test_commit_reports_the_bytes_it_moves(server: BlockvirtServer) -> None:
    """s1 holds SIZE, s2 (its only child, not a head) HEAD_WRITE: deleting s1 lays s2 over
    it (a commit), which moves HEAD_WRITE bytes."""
    _volume_with_snapshot(server, "committed")
    server.api.post("/api/v1/volumes/committed/snapshots", {"name": "s2"})
    out = server.api.delete("/api/v1/volumes/committed/snapshots/s1")
    _, end = _watch(server, out["job"])
    assert end["kind"] == "commit"
    assert end["unit"] == "bytes" and end["done"] == end["total"] == HEAD_WRITE, end


async def _zero(uri: str, offset: int, length: int) -> None:
    async with await NbdClient.connect(uri) as c:
        await c.zero(offset, length)
        await c.flush()


@pytest.mark.parametrize("shape", ["thick base", "zeroed in a snapshot"])
def test_flatten_total_is_what_it_moves(server: BlockvirtServer, shape: str) -> None:
    """Not whole 16 MiB pages of a thick base, nor blocks a newer snapshot zeroed (a
    flatten leaves those unallocated: with no parent left they read as zeros)."""
    name = "thick" if shape == "thick base" else "zeroed"
    uri = server.create_volume(name, SIZE, thick=shape == "thick base")
    want = bytearray(os.urandom(SIZE))
    asyncio.run(_write(uri, 0, bytes(want)))
    server.api.post(f"/api/v1/volumes/{name}/snapshots", {"name": "s1"})
    hidden = 0
    if shape == "zeroed in a snapshot":
        hidden = MiB
        asyncio.run(_zero(uri, MiB, hidden))
        want[MiB : MiB + hidden] = bytes(hidden)
        server.api.post(f"/api/v1/volumes/{name}/snapshots", {"name": "s2"})
    asyncio.run(_write(uri, 0, b"h" * HEAD_WRITE))
    want[:HEAD_WRITE] = b"h" * HEAD_WRITE
    job = server.api.post(f"/api/v1/volumes/{name}/flatten", {})
    _, end = _watch(server, job["id"])
    assert end["state"] == "done" and end["total"] == SIZE - HEAD_WRITE - hidden, end
    assert asyncio.run(_read(uri, SIZE)) == want


async def _zero(uri: str, offset: int, length: int) -> None:
    async with await NbdClient.connect(uri) as c:
        await c.zero(offset, length)
        await c.flush()


async def _read(uri: str, length: int) -> bytes:
    async with await NbdClient.connect(uri) as c:
        return await c.read(0, length)
