"""The incremental-backup recipe of docs/backup.md, run for real: a full copy with nbdcopy,
increments with tools/backup/incremental.py (libnbd: the qemu:dirty-bitmap context, then only
the dirty extents), while a libnbd writer keeps writing, zeroing and trimming random ranges of
the volume. After every increment the backup image must equal the snapshot byte for byte
(`cmp`, against nbdcopy's copy of the snapshot export), and a restore into a new volume must
read back the same.

Variants: with an intermediate snapshot deleted (its layer merged away while the next backup
reads) before each increment, and with the server killed (SIGKILL) under the writer between
two increments.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from types import ModuleType

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import REPO_ROOT, MiB, need, need_nbdsh, run
from .test_dirty_bitmap import libnbd

pytestmark = [pytest.mark.interop, pytest.mark.slow]

SIZE = 64 * MiB
SCRIPT = REPO_ROOT / "tools" / "backup" / "incremental.py"


class Writer(threading.Thread):
    """Random writes (unaligned too), zeroes and trims over the whole volume, with a FLUSH
    now and then, until stopped or until the server goes away."""

    def __init__(self, nbd: ModuleType, uri: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.ops = 0
        self.flushes = 0
        self.error: Exception | None = None

    def run(self) -> None:
        rng, h = self.rng, self.h
        try:
            while not self.stop.is_set():
                length = rng.choice((rng.randint(1, 9000), rng.randint(1, 64) * 4096))
                offset = rng.randrange(SIZE - length)
                kind = rng.random()
                if kind < 0.8:
                    h.pwrite(rng.randbytes(length), offset)
                elif kind < 0.9:
                    h.zero(length, offset)
                else:
                    h.trim(length, offset)
                self.ops += 1
                if rng.random() < 0.05:
                    h.flush()
                    self.flushes += 1
        except Exception as e:  # the server was killed under us, in one variant
            self.error = e

    def finish(self) -> None:
        self.stop.set()
        self.join(60)
        assert not self.is_alive()
        if self.error is None:
            self.h.shutdown()


def snapshot(server: BlockvirtServer, name: str) -> None:
    server.api.post("/api/v1/volumes/vm/snapshots", {"name": name})


def full_copy(server: BlockvirtServer, snap: str, image: Path) -> None:
    run(["nbdcopy", server.uri(f"vm@{snap}"), image], timeout=120)


def increment(server: BlockvirtServer, since: str, snap: str, image: Path) -> str:
    """incremental.py with Debian's python3 (libnbd's binding), as the recipe runs it."""
    r = run(["python3", SCRIPT, server.uri(f"vm@{snap}"), since, image], timeout=120)
    return r.stdout


def same_as_snapshot(server: BlockvirtServer, snap: str, image: Path, tmp: Path) -> None:
    want = tmp / f"{snap}.expected"
    full_copy(server, snap, want)
    run(["cmp", image, want])
    want.unlink()


def restore_and_compare(server: BlockvirtServer, image: Path, tmp: Path) -> None:
    server.create_volume("restored", SIZE)
    run(["nbdcopy", image, server.uri("restored")], timeout=120)
    back = tmp / "restored.img"
    run(["nbdcopy", server.uri("restored"), back], timeout=120)
    run(["cmp", image, back])


def wait_jobs(server: BlockvirtServer) -> None:
    for job in server.api.get("/api/v1/jobs")["jobs"]:
        if job["state"] == "running":
            server.api.get(f"/api/v1/jobs/{job['id']}?wait=1")


def start(tmp_path: Path) -> tuple[ModuleType, BlockvirtServer]:
    need("nbdcopy", "cmp")
    need_nbdsh()  # Debian's python3 with the binding, which incremental.py runs on
    nbd = libnbd()
    server = BlockvirtServer(tmp_path / "data").start()
    server.create_volume("vm", SIZE)
    return nbd, server


@pytest.mark.parametrize("merge", [False, True], ids=["plain", "intermediate-deleted"])
def test_full_and_three_increments_under_random_writes(tmp_path: Path, merge: bool) -> None:
    nbd, server = start(tmp_path)
    image = tmp_path / "vm.img"
    writer = Writer(nbd, server.uri("vm"), seed=16 + merge)
    try:
        writer.start()
        snapshot(server, "b0")
        full_copy(server, "b0", image)
        same_as_snapshot(server, "b0", image, tmp_path)
        for i in range(1, 4):
            if merge:  # a snapshot between the two backups, deleted: its layer is merged away
                snapshot(server, f"mid{i}")
            snapshot(server, f"b{i}")
            if merge:
                server.api.delete(f"/api/v1/volumes/vm/snapshots/mid{i}")  # the merge runs on
            out = increment(server, f"b{i - 1}", f"b{i}", image)
            assert "changed extent(s)" in out
            same_as_snapshot(server, f"b{i}", image, tmp_path)
            wait_jobs(server)
            server.api.delete(f"/api/v1/volumes/vm/snapshots/b{i - 1}")  # keep the last one only
        writer.finish()
        assert writer.error is None and writer.ops > 100, (writer.error, writer.ops)
        restore_and_compare(server, image, tmp_path)
    finally:
        writer.stop.set()
        server.stop()


def test_an_increment_after_kill_9_under_writes_is_complete(tmp_path: Path) -> None:
    nbd, server = start(tmp_path)
    image = tmp_path / "vm.img"
    writer = Writer(nbd, server.uri("vm"), seed=99)
    try:
        writer.start()
        snapshot(server, "b0")
        full_copy(server, "b0", image)
        snapshot(server, "b1")
        increment(server, "b0", "b1", image)
        same_as_snapshot(server, "b1", image, tmp_path)
        flushes = writer.flushes
        while writer.flushes < flushes + 3:  # flushed writes since b1, and more unflushed
            writer.join(0.05)
        server.kill()
        writer.join(30)  # its next request fails: it was cut off mid-writes
        assert not writer.is_alive() and writer.error is not None
        server = BlockvirtServer(tmp_path / "data").start()
        # What survived the crash since b1 (the flushed writes at least) is in b2, and the
        # increment must carry all of it.
        snapshot(server, "b2")
        out = increment(server, "b1", "b2", image)
        assert not out.startswith("0 changed"), out
        same_as_snapshot(server, "b2", image, tmp_path)
        restore_and_compare(server, image, tmp_path)
    finally:
        writer.stop.set()
        server.stop()


def test_no_context_means_a_full_copy(tmp_path: Path) -> None:
    _, server = start(tmp_path)
    try:
        image = tmp_path / "vm.img"
        image.write_bytes(b"")
        snapshot(server, "b0")
        r = run(["python3", SCRIPT, server.uri("vm@b0"), "b0", image], check=False)
        assert r.returncode == 2 and "take a full copy" in r.stderr
    finally:
        server.stop()
