"""Snapshots, clones, merge and flatten as real clients see them.

Every test keeps the expected content of each export in a local raw image: the same writes
(byte patterns, random data, zeroes; unaligned too) go through qemu-io into the volume and into
a bytearray, a snapshot is taken between phases, and `qemu-img compare` checks every snapshot
export (`VOL@SNAP`) and the volume against its image. The ext4 test (root) snapshots a mounted
filesystem, changes it, reverts, and finds the old files and a clean e2fsck.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import (
    CMD_READ,
    Closed,
    KiB,
    MiB,
    need,
    need_root_fuse,
    qemu_io,
    raw_session,
    run,
    volume_info,
)
from .test_ext4_nbdfuse import NbdFuse, _sha256, _umount

pytestmark = pytest.mark.interop

SIZE = 64 * MiB
EPERM = 1
CMD_TRIM, CMD_WRITE_ZEROES = 4, 6


# --------------------------------------------------------------------------- helpers


class Model:
    """A volume's expected bytes. `fill`/`random`/`zero` queue a write for both the model and
    qemu-io; `apply(uri)` sends the queue in one qemu-io run; `save(path)` writes the image."""

    def __init__(self, size: int, tmp: Path, seed: int = 1) -> None:
        self.buf = bytearray(size)
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.pending: list[str] = []
        self._n = 0

    def copy(self) -> Model:
        m = Model(len(self.buf), self.tmp, self.rng.randrange(1 << 30))
        m.buf[:] = self.buf
        return m

    def fill(self, off: int, length: int, byte: int) -> None:
        self.buf[off : off + length] = bytes([byte]) * length
        self.pending.append(f"write -P {byte:#x} {off} {length}")

    def random(self, off: int, length: int) -> None:
        data = self.rng.randbytes(length)
        self._n += 1
        src = self.tmp / f"src-{id(self)}-{self._n}.bin"
        src.write_bytes(data)
        self.buf[off : off + length] = data
        self.pending.append(f"write -s {src} {off} {length}")

    def zero(self, off: int, length: int) -> None:
        self.buf[off : off + length] = bytes(length)
        self.pending.append(f"write -z {off} {length}")

    def apply(self, uri: str) -> None:
        if self.pending:
            qemu_io(uri, *self.pending)
        self.pending.clear()

    def save(self, path: Path) -> Path:
        path.write_bytes(self.buf)
        return path


def compare(uri: str, image: Path) -> None:
    """`qemu-img compare` of an export against a local raw image: identical or fail."""
    r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, image], timeout=120, check=False)
    assert r.returncode == 0, f"{uri} differs from {image.name}:\n{r.stdout}{r.stderr}"


def dump(uri: str, path: Path) -> Path:
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, path], timeout=120)
    return path


def depth_map(uri: str) -> list[dict[str, Any]]:
    """nbdinfo's qemu:allocation-depth extents: offset, length, type (the depth)."""
    r = run(["nbdinfo", "--json", "--map=qemu:allocation-depth", uri], timeout=60)
    extents: list[dict[str, Any]] = json.loads(r.stdout)
    assert sum(e["length"] for e in extents) == SIZE, extents
    return extents


def depth_at(extents: list[dict[str, Any]], offset: int) -> int:
    for e in extents:
        if e["offset"] <= offset < e["offset"] + e["length"]:
            return int(e["type"])
    raise AssertionError(f"no extent covers {offset}: {extents}")


def snapshots(server: BlockvirtServer, vol: str) -> dict[str, dict[str, Any]]:
    r = server.cli("snapshot", "list", vol, "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    return {s["name"]: s for s in json.loads(r.stdout)}


def cli_ok(server: BlockvirtServer, *args: str, timeout: float = 120) -> str:
    r = server.cli(*args, timeout=timeout)
    assert r.returncode == 0, f"blockvirt {' '.join(args)}: rc={r.returncode}\n{r.stdout}{r.stderr}"
    return r.stdout


def no_errors_logged(server: BlockvirtServer) -> None:
    text = server.log()
    assert "Traceback" not in text and "ERROR" not in text, text


def exports(server: BlockvirtServer) -> set[str]:
    r = run(["nbdinfo", "--list", "--json", server.uri("")], timeout=30)
    return {e["export-name"] for e in json.loads(r.stdout)["exports"]}


# --------------------------------------------------------------------------- tests


def test_snapshot_tree_compare_clone_flatten_merge_revert_check(
    blockvirt_server: BlockvirtServer, tmp_path: Path
) -> None:
    """Phased writes with snapshots between them; then a clone flattened, a middle snapshot
    merged away, a revert making a branch, a restart, and an offline check: every export stays
    byte-identical to its expected image throughout."""
    need("qemu-io", "qemu-img", "nbdinfo")
    server = blockvirt_server
    uri = server.create_volume("v", SIZE)
    img: dict[str, Path] = {}
    m = Model(SIZE, tmp_path)

    # Phase 0 -> s1: patterns, random data, an unaligned write, data near the end.
    m.fill(0, 4 * MiB, 0x11)
    m.random(8 * MiB, 1 * MiB)
    m.fill(12 * MiB + 512, 3000, 0x5A)
    m.fill(SIZE - 64 * KiB, 64 * KiB, 0x1F)
    m.apply(uri)
    cli_ok(server, "snapshot", "create", "v", "s1")
    img["s1"] = m.save(tmp_path / "s1.raw")

    # Phase 1 -> s2: overwrite part of phase 0, zero some of it (zeroes must hide s1's data).
    m.fill(1 * MiB, 1 * MiB, 0x22)
    m.zero(8 * MiB + 256 * KiB, 128 * KiB)
    m.random(20 * MiB + 4 * KiB, 60 * KiB)
    m.fill(12 * MiB + 1024, 512, 0x23)
    m.apply(uri)
    cli_ok(server, "snapshot", "create", "v", "s2")
    img["s2"] = m.save(tmp_path / "s2.raw")

    # Phase 2 -> s3.
    m.random(3 * MiB + 4 * KiB, 2 * MiB)
    m.fill(30 * MiB, 256 * KiB, 0x33)
    m.zero(0, 4 * KiB)
    m.apply(uri)
    cli_ok(server, "snapshot", "create", "v", "s3")
    img["s3"] = m.save(tmp_path / "s3.raw")

    # Phase 3: the head.
    m.fill(40 * MiB + 7, 100_000, 0x44)
    m.random(8 * MiB + 512 * KiB, 4 * KiB)
    m.apply(uri)
    img["v"] = m.save(tmp_path / "v.raw")

    for name in ("s1", "s2", "s3"):
        compare(server.uri(f"v@{name}"), img[name])
    compare(uri, img["v"])

    # Allocation depth: 1 = the head, 2 = s3's layer, ... 4 = s1's layer; 0 = nowhere.
    ext = depth_map(uri)
    assert depth_at(ext, 40 * MiB + 8 * KiB) == 1
    assert depth_at(ext, 30 * MiB) == 2
    assert depth_at(ext, 1 * MiB) == 3
    assert depth_at(ext, SIZE - 4 * KiB) == 4  # written only in phase 0
    assert depth_at(ext, 50 * MiB) == 0
    assert depth_at(depth_map(server.uri("v@s2")), SIZE - 4 * KiB) == 2

    # The tree: a straight line s1 <- s2 <- s3, the head sits on s3.
    tree = snapshots(server, "v")
    assert {n: (s["parent"], s["current"]) for n, s in tree.items()} == {
        "s1": (None, False),
        "s2": ("s1", False),
        "s3": ("s2", True),
    }
    assert all(s["size"] == SIZE and s["created"] > 0 for s in tree.values())
    assert tree["s1"]["unique_bytes"] >= 5 * MiB and tree["s1"]["shared_bytes"] == 0
    assert tree["s2"]["shared_bytes"] > 0 and tree["s3"]["shared_bytes"] > 0
    assert volume_info(server, "v")["chain_depth"] == 4

    # Linked clone of s2, written to, then flattened: it must stand alone with the same bytes.
    cli_ok(server, "volume", "clone", "v@s2", "c")
    compare(server.uri("c"), img["s2"])
    mc = Model(SIZE, tmp_path, seed=7)
    mc.buf[:] = img["s2"].read_bytes()
    mc.fill(2 * MiB, 64 * KiB, 0xC1)
    mc.random(50 * MiB, 1 * MiB)
    mc.apply(server.uri("c"))
    img["c"] = mc.save(tmp_path / "c.raw")
    compare(server.uri("c"), img["c"])
    assert depth_at(depth_map(server.uri("c")), SIZE - 4 * KiB) == 3  # from s1, through s2
    out = json.loads(cli_ok(server, "volume", "flatten", "c", "--wait", "--json", timeout=300))
    assert out["state"] == "done", out
    compare(server.uri("c"), img["c"])
    assert all(e["type"] <= 1 for e in depth_map(server.uri("c"))), "flattened clone reads ancestors"
    assert volume_info(server, "c")["chain_depth"] == 1
    # Writing the clone never touches the source.
    compare(server.uri("v@s2"), img["s2"])
    compare(uri, img["v"])

    # Delete the middle snapshot s2: its layer merges into s3's (a job); the rest is unchanged.
    before = {name: dump(server.uri(name), tmp_path / f"before-{name}.raw") for name in ("v@s1", "v@s3", "v")}
    out = json.loads(cli_ok(server, "snapshot", "delete", "v", "s2", "--wait", "--json", timeout=300))
    assert out.get("job") and out.get("job_state") == "done", out
    job = json.loads(cli_ok(server, "job", "show", out["job"], "--json"))
    assert (job["kind"], job["state"]) == ("merge", "done"), job
    for name, path in before.items():
        compare(server.uri(name), path)
    compare(server.uri("v@s1"), img["s1"])
    compare(server.uri("v@s3"), img["s3"])
    compare(uri, img["v"])
    assert "v@s2" not in exports(server)
    assert {"v", "v@s1", "v@s3", "c"} <= exports(server)
    tree = snapshots(server, "v")
    assert {n: (s["parent"], s["current"]) for n, s in tree.items()} == {
        "s1": (None, False),
        "s3": ("s1", True),
    }
    assert volume_info(server, "v")["chain_depth"] == 3
    ext = depth_map(uri)
    assert depth_at(ext, 1 * MiB) == 2  # s2's data now lives in s3's layer
    assert depth_at(ext, SIZE - 4 * KiB) == 3

    # Revert to s1 and write: a branch. s3 stays (and keeps its bytes), the head sits on s1.
    cli_ok(server, "snapshot", "revert", "v", "s1")
    compare(uri, img["s1"])
    mb = Model(SIZE, tmp_path, seed=9)
    mb.buf[:] = img["s1"].read_bytes()
    mb.fill(60 * MiB, 1 * MiB, 0xB4)
    mb.apply(uri)
    cli_ok(server, "snapshot", "create", "v", "s4")
    img["s4"] = mb.save(tmp_path / "s4.raw")
    img["v"] = img["s4"]
    tree = snapshots(server, "v")
    assert {n: (s["parent"], s["current"]) for n, s in tree.items()} == {
        "s1": (None, False),
        "s3": ("s1", False),
        "s4": ("s1", True),
    }
    human = cli_ok(server, "snapshot", "list", "v")
    assert "s1" in human and "s3" in human and "s4" in human and "current" in human, human

    expected = {"v@s1": img["s1"], "v@s3": img["s3"], "v@s4": img["s4"], "v": img["v"], "c": img["c"]}
    for name, path in expected.items():
        compare(server.uri(name), path)
    no_errors_logged(server)

    # Everything survives a restart, and the offline check finds nothing wrong.
    assert server.stop() == 0
    chk = run([sys.executable, "-m", "blockvirt", "check", "--data-dir", server.data_dir], check=False)
    assert chk.returncode == 0 and "damage" not in chk.stdout.lower(), chk.stdout + chk.stderr
    assert "leak" not in chk.stdout, chk.stdout
    server.start()
    for name, path in expected.items():
        compare(server.uri(name), path)
    assert snapshots(server, "v") == tree
    assert server.stop() == 0
    chk = run(
        [sys.executable, "-m", "blockvirt", "check", "--data-dir", server.data_dir, "--json"], check=False
    )
    report = json.loads(chk.stdout)
    assert chk.returncode == 0 and report["ok"] and not report["leaks"], report


def test_snapshot_export_is_read_only(blockvirt_server: BlockvirtServer, tmp_path: Path) -> None:
    """VOL@SNAP advertises read-only; qemu-io cannot write it; raw WRITE, TRIM and
    WRITE_ZEROES get EPERM and change nothing; reads work."""
    need("qemu-io", "qemu-img", "nbdinfo")
    server = blockvirt_server
    uri = server.create_volume("v", SIZE)
    m = Model(SIZE, tmp_path)
    m.fill(0, 2 * MiB, 0xA5)
    m.random(5 * MiB, 64 * KiB)
    m.apply(uri)
    cli_ok(server, "snapshot", "create", "v", "s")
    image = m.save(tmp_path / "s.raw")
    snap = server.uri("v@s")

    info = json.loads(run(["nbdinfo", "--json", snap]).stdout)
    (export,) = info["exports"]
    assert export["is_read_only"] is True and export["export-size"] == SIZE, export
    assert run(["nbdinfo", "--is", "read-only", snap], check=False).returncode == 0
    assert run(["nbdinfo", "--is", "read-only", uri], check=False).returncode != 0

    out = qemu_io(snap, "write -P 0x77 0 4k", check=False)
    assert "Permission denied" in out or "Operation not permitted" in out, out
    assert "wrote" not in out, out
    read = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xa5 4k 4k", snap])
    assert "read 4096/4096" in read.stdout, read.stdout

    with raw_session(server, "v@s") as c:
        assert c.write(0, b"\x77" * 4096) == EPERM
        assert c.simple_reply(c.request(CMD_TRIM, 0, 1 * MiB))[0] == EPERM
        assert c.simple_reply(c.request(CMD_WRITE_ZEROES, 0, 1 * MiB))[0] == EPERM
        err, data = c.read(0, 4096)
        assert err == 0 and data == b"\xa5" * 4096
    compare(snap, image)
    compare(uri, image)
    no_errors_logged(server)


def test_snapshot_while_connected_revert_needs_force(
    blockvirt_server: BlockvirtServer, tmp_path: Path
) -> None:
    """A snapshot does not disconnect anyone. Revert refuses while a client is connected (rc 1,
    a clear message) and with --force ends that client's session cleanly: requests it already
    sent are answered, then the connection closes. Readers of snapshot exports stay."""
    need("qemu-io", "qemu-img")
    server = blockvirt_server
    uri = server.create_volume("v", SIZE)
    m = Model(SIZE, tmp_path)
    m.fill(0, 1 * MiB, 0x10)
    m.apply(uri)

    with raw_session(server, "v") as c:
        assert c.write(1 * MiB, b"\x20" * (64 * KiB)) == 0
        m.buf[1 * MiB : 1 * MiB + 64 * KiB] = b"\x20" * (64 * KiB)
        cli_ok(server, "snapshot", "create", "v", "s1")  # with c connected
        s1 = m.save(tmp_path / "s1.raw")
        assert c.write(0, b"\x30" * 4096) == 0  # the same connection goes on writing
        m.buf[0:4096] = b"\x30" * 4096
        err, data = c.read(1 * MiB, 4096)
        assert err == 0 and data == b"\x20" * 4096
        compare(server.uri("v@s1"), s1)
        assert volume_info(server, "v")["connections"] == 1

        r = server.cli("snapshot", "revert", "v", "s1", timeout=30)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        msg = r.stderr + r.stdout
        assert "connected" in msg and "--force" in msg, msg
        assert "Traceback" not in msg, msg
        assert len(msg.strip().splitlines()) == 1, msg
        err, data = c.read(0, 4096)  # still connected, nothing changed
        assert err == 0 and data == b"\x30" * 4096

        with raw_session(server, "v@s1") as reader:
            # Requests sent before the forced revert are answered before the close.
            cookie = c.request(CMD_READ, 1 * MiB, 64 * KiB)
            time.sleep(0.2)
            cli_ok(server, "snapshot", "revert", "v", "s1", "--force", timeout=60)
            err, data = c.simple_reply(cookie, 64 * KiB)
            assert err == 0 and data == b"\x20" * (64 * KiB)
            c.assert_closed()
            with pytest.raises((Closed, OSError)):
                c.read(0, 4096)
            # The snapshot's own reader was not disturbed.
            err, data = reader.read(0, 4096)
            assert err == 0 and data == b"\x10" * 4096
            # A snapshot export with a reader cannot be deleted under it.
            r = server.cli("snapshot", "delete", "v", "s1", timeout=30)
            assert r.returncode == 1 and "disconnect" in r.stderr, r.stderr

    compare(uri, s1)  # the head is back on s1: the write after the snapshot is gone
    assert volume_info(server, "v")["connections"] == 0
    no_errors_logged(server)


def test_snapshot_is_point_in_time_under_writes(blockvirt_server: BlockvirtServer) -> None:
    """Snapshots taken while a client writes block after block: each snapshot holds exactly a
    prefix of the writes, with every write acknowledged before the request and none sent after
    the answer."""
    server = blockvirt_server
    server.create_volume("v", SIZE)
    nblocks = 4096  # 16 MiB of 4 KiB writes, one at a time
    sent = [0.0] * nblocks
    acked = [0.0] * nblocks
    errors: list[BaseException] = []

    def block(i: int) -> bytes:
        return (i + 1).to_bytes(4, "big") * 1024

    def writer() -> None:
        try:
            with raw_session(server, "v") as c:
                for i in range(nblocks):
                    sent[i] = time.monotonic()
                    assert c.write(i * 4096, block(i)) == 0
                    acked[i] = time.monotonic()
                    if i % 256 == 255:
                        time.sleep(0.01)  # let the snapshots land anywhere in the sequence
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    taken: list[tuple[str, float, float]] = []
    try:
        while t.is_alive() and len(taken) < 8:
            name = f"p{len(taken)}"
            t0 = time.monotonic()
            server.api.post("/api/v1/volumes/v/snapshots", {"name": name})
            taken.append((name, t0, time.monotonic()))
            time.sleep(0.03)
    finally:
        t.join(120)
    assert not errors, errors
    assert len(taken) >= 2, "the writer finished before two snapshots were taken"

    prefixes = []
    for name, t0, t1 in taken:
        with raw_session(server, f"v@{name}") as c:
            data = bytearray()
            for off in range(0, nblocks * 4096, 1 * MiB):
                err, chunk = c.read(off, 1 * MiB)
                assert err == 0
                data += chunk
        k = 0
        while k < nblocks and data[k * 4096 : (k + 1) * 4096] == block(k):
            k += 1
        assert not any(data[k * 4096 :]), f"{name}: blocks after the first {k} are not all zero"
        done_before = sum(1 for a in acked if 0 < a < t0)
        sent_before_answer = sum(1 for s in sent if 0 < s < t1)
        assert done_before <= k <= sent_before_answer, (name, done_before, k, sent_before_answer)
        prefixes.append(k)
    assert any(0 < k < nblocks for k in prefixes), prefixes  # some snapshot cut the writes
    no_errors_logged(server)


@pytest.mark.root
def test_ext4_snapshot_revert(blockvirt_server: BlockvirtServer, tmp_path: Path) -> None:
    """ext4 on nbdfuse + loop: frozen (fsfreeze) and snapshotted while mounted and connected,
    then files changed and deleted; after unmount and revert the old files are back and
    e2fsck -fn is clean, both on the snapshot export and on the reverted volume."""
    need_root_fuse()
    need("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "mount", "umount", "fsfreeze", "qemu-img")
    server = blockvirt_server
    uri = server.create_volume("ext4", 256 * MiB)
    mnt, fs = tmp_path / "fuse", tmp_path / "fs"
    mnt.mkdir()
    fs.mkdir()
    rng = random.Random(4)
    files = {
        "big.bin": rng.randbytes(3 * MiB),
        "keep/dir/mid.bin": rng.randbytes(1 * MiB + 12345),
        "small.txt": b"blockvirt snapshot\n" * 100,
        "doomed.bin": rng.randbytes(700 * KiB),
    }
    want = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}

    fuse = NbdFuse(mnt, uri, tmp_path / "nbdfuse1.log")
    try:
        run(["mkfs.ext4", "-F", "-q", fuse.file], timeout=120)
        run(["mount", "-o", "loop", fuse.file, fs], timeout=60)
        try:
            for name, data in files.items():
                p = fs / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
            run(["sync", "-f", fs / "big.bin"], timeout=60)
            # Freeze flushes the filesystem and its journal down to the server; the snapshot
            # is taken with nbdfuse connected and the filesystem mounted.
            run(["fsfreeze", "-f", fs], timeout=60)
            try:
                assert volume_info(server, "ext4")["connections"] >= 1
                t0 = time.monotonic()
                out = json.loads(cli_ok(server, "snapshot", "create", "ext4", "s1", "--json"))
                assert time.monotonic() - t0 < 10 and out["seconds"] < 5, out
            finally:
                run(["fsfreeze", "-u", fs], timeout=60)
            # Change the filesystem after the snapshot: rewrite, delete, add.
            (fs / "big.bin").write_bytes(rng.randbytes(2 * MiB))
            (fs / "doomed.bin").unlink()
            (fs / "small.txt").write_bytes(b"changed\n")
            (fs / "new.bin").write_bytes(rng.randbytes(512 * KiB))
            run(["sync", "-f", fs / "new.bin"], timeout=60)
            assert _sha256(fs / "big.bin") != want["big.bin"]
        finally:
            _umount(fs)
        # Revert refuses while nbdfuse is connected.
        r = server.cli("snapshot", "revert", "ext4", "s1", timeout=30)
        assert r.returncode == 1 and "connected" in r.stderr and "--force" in r.stderr, r.stderr
    finally:
        rc = fuse.stop()
    assert rc == 0

    # The snapshot export holds a clean filesystem (read-only nbdfuse).
    sfuse = NbdFuse(mnt, server.uri("ext4@s1"), tmp_path / "nbdfuse-snap.log")
    try:
        fsck = run(["e2fsck", "-f", "-n", sfuse.file], timeout=120, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        assert sfuse.stop() == 0

    cli_ok(server, "snapshot", "revert", "ext4", "s1")

    fuse = NbdFuse(mnt, uri, tmp_path / "nbdfuse2.log")
    try:
        fsck = run(["e2fsck", "-f", "-n", fuse.file], timeout=120, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        run(["mount", "-o", "loop", fuse.file, fs], timeout=60)
        try:
            assert {n: _sha256(fs / n) for n in files} == want
            found = sorted(str(p.relative_to(fs)) for p in fs.rglob("*") if p.is_file())
            assert found == sorted(files), found
        finally:
            _umount(fs)
        fsck = run(["e2fsck", "-f", "-n", fuse.file], timeout=120, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        rc = fuse.stop()
    assert rc == 0
    no_errors_logged(server)
    assert server.stop() == 0
    chk = run([sys.executable, "-m", "blockvirt", "check", "--data-dir", server.data_dir], check=False)
    assert chk.returncode == 0, chk.stdout + chk.stderr
