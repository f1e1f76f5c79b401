"""A real ext4 filesystem on a volume: nbdfuse exposes the export as a file, a loop mount
writes files, and after a full disconnect a fresh nbdfuse finds them intact and e2fsck clean."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import MiB, nbdsh_env, need, need_root_fuse, run, volume_info

pytestmark = [pytest.mark.interop, pytest.mark.root]


class NbdFuse:
    """`nbdfuse MNT URI` in the foreground as a child; MNT/nbd is the export as a file."""

    def __init__(self, mnt: Path, uri: str, log: Path) -> None:
        self.mnt = mnt
        self.file = mnt / "nbd"
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["nbdfuse", str(mnt), uri],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=nbdsh_env(),
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while not (os.path.ismount(mnt) and self.file.exists()):
            if self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"nbdfuse exited with {self.proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"nbdfuse did not mount {mnt}: {log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> int | None:
        """Unmount (nbdfuse then exits by itself); kill it only if it does not."""
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True, timeout=30)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mnt):  # nbdfuse was killed: drop the dead FUSE mount
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, timeout=30)
        self._log.close()
        return self.proc.returncode


def _umount(fs: Path) -> None:
    if os.path.ismount(fs):
        r = subprocess.run(["umount", str(fs)], capture_output=True, timeout=60)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(fs)], capture_output=True, timeout=60)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ext4_on_nbdfuse_survives_reconnect(blockvirt_server: BlockvirtServer, tmp_path: Path) -> None:
    need_root_fuse()
    need("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck", "mount", "umount")
    uri = blockvirt_server.create_volume("ext4", 256 * MiB)
    mnt, fs = tmp_path / "fuse", tmp_path / "fs"
    mnt.mkdir()
    fs.mkdir()
    files = {
        "big.bin": os.urandom(3 * MiB),
        "sub/dir/mid.bin": os.urandom(1 * MiB + 12345),
        "small.txt": b"blockvirt interop\n" * 100,
    }
    want = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}

    fuse = NbdFuse(mnt, uri, tmp_path / "nbdfuse1.log")
    try:
        assert fuse.file.stat().st_size == 256 * MiB
        run(["mkfs.ext4", "-F", "-q", fuse.file], timeout=120)
        run(["mount", "-o", "loop", fuse.file, fs], timeout=60)
        try:
            for name, data in files.items():
                p = fs / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
            run(["sync", "-f", fs / "big.bin"], timeout=60)
            assert {n: _sha256(fs / n) for n in files} == want
        finally:
            _umount(fs)
        assert not os.path.ismount(fs)
    finally:
        rc = fuse.stop()
    assert rc == 0

    # The server wrote the filesystem's blocks (thin volume: far less than 256 MiB).
    allocated = volume_info(blockvirt_server, "ext4")["allocated"]
    assert 4 * MiB <= allocated < 256 * MiB, allocated

    fuse = NbdFuse(mnt, uri, tmp_path / "nbdfuse2.log")
    try:
        run(["mount", "-o", "loop", fuse.file, fs], timeout=60)
        try:
            assert {n: _sha256(fs / n) for n in files} == want
            assert sorted(str(p.relative_to(fs)) for p in fs.rglob("*") if p.is_file()) == sorted(files)
        finally:
            _umount(fs)
        fsck = run(["e2fsck", "-f", "-n", fuse.file], timeout=120, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        rc = fuse.stop()
    assert rc == 0
