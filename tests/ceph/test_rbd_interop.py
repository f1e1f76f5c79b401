"""Real NBD clients on RBD-backed volumes: qemu-io, qemu-img (info, map, convert, compare),
nbdinfo, nbdcopy, fio with crc32c verification, and an ext4 through nbdfuse and a loop mount.
What the clients wrote is read back through Ceph itself: `rbd export`, and qemu's own rbd
driver (qemu-img compare nbd://... against rbd:POOL/IMAGE)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from blockvirt.testing import BlockvirtServer
from tests.ceph.conftest import unique
from tests.ceph.rbdpool import BV_POOL, CephView, MiB, cli_json
from tests.cephcluster import CephCluster
from tests.interop.conftest import need, need_root_fuse, qemu_io, run
from tests.interop.test_ext4_nbdfuse import NbdFuse, _sha256, _umount

pytestmark = [pytest.mark.ceph, pytest.mark.interop]


def rbd_uri(view: CephView, image: str, snap: str | None = None) -> str:
    """The image as qemu's rbd driver opens it (straight from Ceph, no blockvirt)."""
    at = f"@{snap}" if snap else ""
    return f"rbd:{view.pool}/{image}{at}:conf={view.ceph.conf_path}"


def volume(server: BlockvirtServer, size: int) -> tuple[str, str]:
    name = unique("q")
    return name, server.create_volume(name, size, pool=BV_POOL)


def identical(a: str, b: str) -> None:
    r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b], check=False, timeout=120)
    assert r.returncode == 0 and "Images are identical" in r.stdout, r.stdout + r.stderr


def test_qemu_io_patterns_land_in_the_rbd_image(rbd_server: BlockvirtServer, ceph_view: CephView) -> None:
    need("qemu-io", "qemu-img")
    name, uri = volume(rbd_server, 32 * MiB)
    out = qemu_io(
        uri,
        "write -P 0x42 0 64k",
        "write -f -P 0x43 64k 64k",  # FUA
        "write -P 0x44 128k 64k",
        "write -z 128k 64k",  # WRITE_ZEROES + NO_HOLE
        "write -P 0x45 4M 4M",
        "write -z -u 4M 4M",  # WRITE_ZEROES that may punch: frees the object
        "write -P 0x46 8M 1M",
        "discard 8M 1M",  # TRIM
        "write -P 0x47 3000 5000",  # unaligned
        "write -P 0x49 31M 1M",  # the last MiB
        "flush",
        "read -P 0x42 0 3000",
        "read -P 0x47 3000 5000",
        "read -P 0x43 64k 64k",
        "read -P 0 128k 64k",
        "read -P 0 4M 5M",
        "read -P 0x49 31M 1M",
        cache="none",
    )
    assert "Pattern verification failed" not in out
    # Ceph's own view of the image is what the client wrote.
    image = ceph_view.export(name)
    assert image[:3000] == b"\x42" * 3000 and image[3000:8000] == b"\x47" * 5000
    assert image[64 * 1024 : 128 * 1024] == b"\x43" * 65536
    assert image[4 * MiB : 9 * MiB] == bytes(5 * MiB) and image[31 * MiB :] == b"\x49" * MiB
    identical(uri, rbd_uri(ceph_view, name))
    # A wrong pattern must make qemu-io fail: the check can fail.
    bad = run(["qemu-io", "-f", "raw", "-c", "read -P 0x99 31M 4k", uri], check=False)
    assert bad.returncode != 0 and "Pattern verification failed" in bad.stdout + bad.stderr


def test_qemu_img_info_map_convert_compare(
    rbd_server: BlockvirtServer, ceph_view: CephView, tmp_path: Path
) -> None:
    need("qemu-img", "qemu-io")
    src = tmp_path / "src.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", src, "24M"])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 1M", "-c", "write -P 0xbb 13M 64k", src])
    name, uri = volume(rbd_server, 24 * MiB)
    qemu_io(uri, "write -P 0x77 6M 1M")  # where the source has a hole: convert must zero it

    info = json.loads(run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == 24 * MiB
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri], timeout=120)
    identical(str(src), uri)
    identical(str(src), rbd_uri(ceph_view, name))

    # The allocation map comes from RBD: data in objects 0 and 3 (4 MiB each), holes elsewhere.
    extents = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", uri]).stdout)
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    covered = sorted({o for s, n in data for o in range(s // (4 * MiB), (s + n - 1) // (4 * MiB) + 1)})
    assert covered == [0, 3], extents

    # A snapshot export converts out whole, while the head moves on.
    cli_json(rbd_server, "snapshot", "create", name, "s")
    qemu_io(uri, "write -P 0xcc 0 1M")
    out = tmp_path / "snap.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", rbd_server.uri(f"{name}@s"), out], timeout=120)
    identical(str(src), str(out))
    identical(str(out), rbd_uri(ceph_view, name, "s"))
    diff = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri], check=False)
    assert diff.returncode == 1 and "Content mismatch at offset 0" in diff.stdout


def test_nbdinfo_and_nbdcopy(rbd_server: BlockvirtServer, ceph_view: CephView, tmp_path: Path) -> None:
    need("nbdinfo", "nbdcopy", "qemu-io")
    name, uri = volume(rbd_server, 16 * MiB)
    [exp] = json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"]
    assert exp["export-size"] == 16 * MiB and exp["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_df"):
        assert exp[flag] is True, flag
    assert "base:allocation" in exp["contexts"]
    qemu_io(uri, "write -P 0x11 4M 4M", "write -P 0x12 12M 64k")
    m = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    kinds = [(e["offset"], e["length"], e["type"]) for e in m]
    assert kinds[0] == (0, 4 * MiB, 3) and (4 * MiB, 4 * MiB, 0) in kinds, kinds
    assert sum(e[1] for e in kinds if e[2] == 0) <= 8 * MiB  # objects 1 and 3 at most

    # nbdcopy into a file volume, and to a local file: the same bytes as Ceph holds.
    copy = "copy-" + name
    dest = rbd_server.create_volume(copy, 16 * MiB)
    run(["nbdcopy", uri, dest], timeout=120)
    local = tmp_path / "local.raw"
    run(["nbdcopy", uri, local], timeout=120)
    assert local.read_bytes() == ceph_view.export(name)
    identical(dest, rbd_uri(ceph_view, name))
    rbd_server.api.delete(f"/api/v1/volumes/{copy}")


@pytest.mark.parametrize(("bs", "size"), [("4k", 24 * MiB), ("64k", 40 * MiB)])
def test_fio_randwrite_verify(
    rbd_server: BlockvirtServer, ceph_view: CephView, tmp_path: Path, bs: str, size: int
) -> None:
    need("fio", "qemu-img")
    name, uri = volume(rbd_server, 48 * MiB)
    out = tmp_path / "fio.json"
    r = run(
        [
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--rw=randwrite",
            f"--bs={bs}",
            f"--size={size}",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--eta=never",
            "--output-format=json",
            f"--output={out}",
        ],
        timeout=180,
        check=False,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr + (out.read_text() if out.exists() else "")
    [job] = json.loads(out.read_text())["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == size and job["read"]["io_bytes"] == size
    assert "verify" not in (r.stderr or "").lower()
    # What fio verified through blockvirt is what Ceph holds.
    identical(uri, rbd_uri(ceph_view, name))


@pytest.mark.root
def test_ext4_on_an_rbd_volume(
    rbd_server: BlockvirtServer, ceph_view: CephView, ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    need_root_fuse()
    need("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "mount", "umount")
    name, uri = volume(rbd_server, 128 * MiB)
    mnt, fs = tmp_path / "fuse", tmp_path / "fs"
    mnt.mkdir()
    fs.mkdir()
    files = {
        "big.bin": os.urandom(3 * MiB),
        "sub/dir/mid.bin": os.urandom(MiB + 12345),
        "small.txt": b"blockvirt on rbd\n" * 100,
    }
    want = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    fuse = NbdFuse(mnt, uri, tmp_path / "nbdfuse1.log")
    try:
        run(["mkfs.ext4", "-F", "-q", "-E", "nodiscard", fuse.file], timeout=120)
        run(["mount", "-o", "loop", fuse.file, fs], timeout=60)
        try:
            for n, d in files.items():
                (fs / n).parent.mkdir(parents=True, exist_ok=True)
                (fs / n).write_bytes(d)
            run(["sync", "-f", fs / "big.bin"], timeout=60)
        finally:
            _umount(fs)
    finally:
        assert fuse.stop() == 0
    assert 4 * MiB <= ceph_view.used(name) < 128 * MiB  # thin: the filesystem's blocks only

    # Snapshot, then change the filesystem; the snapshot keeps the old files.
    cli_json(rbd_server, "snapshot", "create", name, "before")
    fuse = NbdFuse(mnt, uri, tmp_path / "nbdfuse2.log")
    try:
        run(["mount", "-o", "loop", fuse.file, fs], timeout=60)
        try:
            assert {n: _sha256(fs / n) for n in files} == want
            (fs / "big.bin").unlink()
            (fs / "new.txt").write_text("after the snapshot\n")
        finally:
            _umount(fs)
        fsck = run(["e2fsck", "-f", "-n", fuse.file], timeout=120, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        assert fuse.stop() == 0
    # The snapshot, read straight from Ceph, is a clean filesystem with the old files.
    old = tmp_path / "before.img"
    old.write_bytes(ceph_view.export(name, "before"))
    fsck = run(["e2fsck", "-f", "-n", old], timeout=120, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = run(["debugfs", "-R", "ls -p /", old], timeout=60).stdout
    old.unlink()
    assert "big.bin" in listing and "new.txt" not in listing
    assert ceph_view.snaps(name) == ["before"]
