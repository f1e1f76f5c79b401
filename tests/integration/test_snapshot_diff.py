"""`blockvirt snapshot diff VOL S1 [S2] [--json]` and its API route, on a real server, after
writes made through our NBD client, snapshot deletes (merges), reverts and grows."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

KiB = 1024
MiB = 1024 * KiB


async def write(server: BlockvirtServer, name: str, *ops: tuple[str, int, int]) -> None:
    """("w", offset, length) writes a pattern, ("z", offset, length) zeroes (may trim)."""
    c = await NbdClient.connect(server.uri(name))
    try:
        for op, off, ln in ops:
            if op == "w":
                await c.write(off, b"\x5a" * ln)
            else:
                await c.zero(off, ln)
        await c.flush()
    finally:
        await c.close()


def snap(server: BlockvirtServer, name: str, snapshot: str) -> None:
    server.api.post(f"/api/v1/volumes/{name}/snapshots", {"name": snapshot})


def cli(server: BlockvirtServer, *args: str) -> subprocess.CompletedProcess[str]:
    return server.cli("snapshot", "diff", *args, timeout=60)


def diff_json(server: BlockvirtServer, *args: str) -> dict[str, Any]:
    r = cli(server, *args, "--json")
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def extents(out: dict[str, Any]) -> list[tuple[int, int]]:
    return [(e["offset"], e["length"]) for e in out["extents"]]


def test_diff_between_snapshots_and_since_one(blockvirt_server: BlockvirtServer) -> None:
    s = blockvirt_server
    s.create_volume("v", "1M")
    asyncio.run(write(s, "v", ("w", 0, 64 * KiB)))
    snap(s, "v", "s1")
    asyncio.run(write(s, "v", ("w", 64 * KiB, 64 * KiB), ("z", 512 * KiB, 64 * KiB)))
    snap(s, "v", "s2")
    asyncio.run(write(s, "v", ("w", 900 * KiB, 100)))

    r = cli(s, "v", "s1", "s2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "          OFFSET          LENGTH",
        "           65536           65536",
        "          524288           65536",
        "v@s1 -> v@s2: 2 extent(s), 128.0 KiB (131072 bytes) changed",
    ]
    out = diff_json(s, "v", "s1", "s2")
    assert out == {
        "volume": "v",
        "since": "s1",
        "until": "s2",
        "extents": [{"offset": 65536, "length": 65536}, {"offset": 524288, "length": 65536}],
        "changed_bytes": 131072,
    }
    since_s2 = diff_json(s, "v", "s2")
    assert since_s2["until"] is None
    assert extents(since_s2) == [(900 * KiB, 4 * KiB)]  # a partial block counts whole
    since_s1 = [(64 * KiB, 64 * KiB), (512 * KiB, 64 * KiB), (900 * KiB, 4 * KiB)]
    assert extents(diff_json(s, "v", "s1")) == since_s1
    assert cli(s, "v", "s2", "s2").stdout.splitlines() == ["v@s2 -> v@s2: 0 extent(s), 0 B (0 bytes) changed"]


def test_errors(blockvirt_server: BlockvirtServer) -> None:
    s = blockvirt_server
    s.create_volume("e", "1M")
    snap(s, "e", "s1")
    snap(s, "e", "s2")
    r = cli(s, "e", "s2", "s1")
    assert r.returncode == 1
    assert "snapshot 's2' is not an older point of e@s1's branch" in r.stderr
    for path, status in (
        ("/api/v1/volumes/e/snapshots/nope/diff", 404),
        ("/api/v1/volumes/e/snapshots/s1/diff?until=nope", 404),
        ("/api/v1/volumes/nope/snapshots/s1/diff", 404),
        ("/api/v1/volumes/e/snapshots/s2/diff?until=s1", 400),
    ):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(s.api_url + path, timeout=30)
        assert e.value.code == status, path
        assert "error" in json.loads(e.value.read())


def test_a_deleted_intermediate_snapshot_and_a_grow(blockvirt_server: BlockvirtServer) -> None:
    s = blockvirt_server
    s.create_volume("m", "1M")
    snap(s, "m", "s1")
    asyncio.run(write(s, "m", ("w", 0, 8 * KiB)))
    snap(s, "m", "s2")
    asyncio.run(write(s, "m", ("z", 256 * KiB, 4 * KiB), ("w", 4 * KiB, 4 * KiB)))
    snap(s, "m", "s3")
    out = s.api.delete("/api/v1/volumes/m/snapshots/s2")
    if out.get("job"):
        s.api.get(f"/api/v1/jobs/{out['job']}?wait=1")
    # Everything written between s1 and s3 is still there after s2's layer was merged away.
    assert extents(diff_json(s, "m", "s1", "s3")) == [(0, 8 * KiB), (256 * KiB, 4 * KiB)]
    s.api.post("/api/v1/volumes/m/resize", {"size": "3M"})
    assert extents(diff_json(s, "m", "s3")) == [(1 * MiB, 2 * MiB)]
    s.api.post("/api/v1/volumes/m/snapshots/s1/revert", {})
    assert diff_json(s, "m", "s1")["extents"] == []
    r = cli(s, "m", "s3")
    assert r.returncode == 1 and "is not an older point" in r.stderr
