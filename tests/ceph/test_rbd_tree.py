"""The snapshot tree of an RBD volume is the tree a file volume has after the same commands:
one sequence of snapshots, reverts (branches), deletes and writes runs on a volume in each kind
of pool of one server, and `snapshot list` (parent, current) and the data of every snapshot
and of the head must come out the same."""

from __future__ import annotations

import time
from typing import Any

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer
from tests.ceph.conftest import unique
from tests.ceph.rbdpool import BV_POOL, MiB

pytestmark = pytest.mark.ceph

SIZE = 8 * MiB

#: (command, argument): "w" writes a marker at block N, "s" snapshots, "r" reverts,
#: "d" deletes a snapshot, "g" grows the volume. Branches, deletes of a parent with children,
#: of the snapshot the head sits on, and of a leaf, and reverts across branches.
SEQUENCE: list[tuple[str, Any]] = [
    ("w", 0), ("s", "a"), ("w", 1), ("s", "b"), ("w", 2), ("s", "c"),
    ("r", "a"), ("w", 3), ("s", "d"), ("w", 4), ("s", "e"),
    ("r", "b"), ("w", 5), ("s", "f"),
    ("d", "a"),  # a parent of two branches
    ("r", "e"), ("s", "g"), ("g", 2 * SIZE), ("w", 6), ("s", "h"),
    ("d", "g"),  # a snapshot with one child (h moves up to e)
    ("d", "c"),  # a leaf
    ("r", "f"),
    ("d", "f"),  # the snapshot the head sits on
    ("w", 7), ("s", "i"),
]  # fmt: skip


async def run(server: BlockvirtServer, name: str) -> None:
    for op, arg in SEQUENCE:
        if op == "w":
            async with await NbdClient.connect(server.uri(name)) as c:
                await c.write(arg * 65536, bytes([0x30 + arg]) * 4096)
                await c.flush()
        elif op == "s":
            server.api.post(f"/api/v1/volumes/{name}/snapshots", {"name": arg})
        elif op == "r":
            server.api.post(f"/api/v1/volumes/{name}/snapshots/{arg}/revert", {})
        elif op == "d":
            server.api.delete(f"/api/v1/volumes/{name}/snapshots/{arg}")
        elif op == "g":
            server.api.post(f"/api/v1/volumes/{name}/resize", {"size": arg})


def idle(server: BlockvirtServer) -> None:
    """Wait until no job runs (a file pool merges deleted snapshots' data in the background)."""
    deadline = time.monotonic() + 30
    while any(j["state"] == "running" for j in server.api.get("/api/v1/jobs")["jobs"]):
        assert time.monotonic() < deadline, "jobs still running"
        time.sleep(0.1)


async def contents(server: BlockvirtServer, export: str) -> tuple[int, list[bytes]]:
    """The export's size and the first 4 KiB of each block the sequence writes."""
    async with await NbdClient.connect(server.uri(export)) as c:
        return c.size, [await c.read(n * 65536, 4096) for n in range(8)]


async def test_rbd_and_file_pools_make_the_same_tree(rbd_server: BlockvirtServer) -> None:
    on_file, on_rbd = unique("tf"), unique("tr")
    rbd_server.create_volume(on_file, SIZE)
    rbd_server.create_volume(on_rbd, SIZE, pool=BV_POOL)
    await run(rbd_server, on_file)
    await run(rbd_server, on_rbd)
    idle(rbd_server)

    def tree(name: str) -> list[tuple[str, str | None, bool, int]]:
        snaps = rbd_server.api.get(f"/api/v1/volumes/{name}/snapshots")["snapshots"]
        return [(s["name"], s["parent"], s["current"], s["size"]) for s in snaps]

    file_tree, rbd_tree = tree(on_file), tree(on_rbd)
    assert rbd_tree == file_tree
    # The expected tree, written out (so that a bug shared by both backends shows too).
    assert file_tree == [
        ("b", None, False, SIZE),
        ("d", None, False, SIZE),
        ("e", "d", False, SIZE),
        ("h", "e", False, 2 * SIZE),
        ("i", "b", True, SIZE),
    ]
    for snap in [s[0] for s in file_tree]:
        assert await contents(rbd_server, f"{on_rbd}@{snap}") == await contents(
            rbd_server, f"{on_file}@{snap}"
        ), snap
    assert await contents(rbd_server, on_rbd) == await contents(rbd_server, on_file)
    for name in (on_file, on_rbd):
        info = rbd_server.api.get(f"/api/v1/volumes/{name}")
        assert info["size"] == SIZE and info["snapshots"] == 5, info
        rbd_server.api.delete(f"/api/v1/volumes/{name}")
