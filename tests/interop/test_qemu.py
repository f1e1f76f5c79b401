"""qemu-io and qemu-img against a blockvirt volume."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import MiB, need, qemu_io, run, volume_info

pytestmark = pytest.mark.interop


def test_qemu_io_patterns_fua_zero_discard_flush(blockvirt_server: BlockvirtServer) -> None:
    need("qemu-io")
    uri = blockvirt_server.create_volume("vol", 64 * MiB)
    # -t none: no implicit FUA, so `write -f` is the only FUA write; each range is first
    # written with a pattern so zeroing/discard is visible on read-back.
    out = qemu_io(
        uri,
        "write -P 0x42 0 64k",
        "write -f -P 0x43 64k 64k",
        "write -P 0x44 128k 64k",
        "write -z 128k 64k",  # WRITE_ZEROES + NO_HOLE
        "write -P 0x45 192k 64k",
        "write -z -u 192k 64k",  # WRITE_ZEROES, may punch
        "write -P 0x46 256k 1M",
        "discard 256k 1M",  # TRIM
        "write -P 0x47 3000 5000",  # unaligned
        "write -P 0x48 16M 4M",
        "write -P 0x49 63M 1M",  # the last MiB
        "flush",
        "read -P 0x42 0 3000",
        "read -P 0x47 3000 5000",
        "read -P 0x42 8000 57536",
        "readv -P 0x43 64k 32k 32k",
        "read -P 0 128k 64k",
        "read -P 0 192k 64k",
        "read -P 0 256k 1M",
        "read -P 0x48 16M 4M",
        "read -P 0x49 63M 1M",
        cache="none",
    )
    assert "Pattern verification failed" not in out
    lines = out.splitlines()
    assert sum(ln.startswith("wrote ") for ln in lines) == 10, out
    assert sum(ln.startswith("discard ") for ln in lines) == 1, out
    assert sum(ln.startswith("read ") for ln in lines) == 9, out

    # A fresh connection (a new process) sees the same bytes, the trimmed range as zeros.
    out = qemu_io(
        uri,
        "read -P 0x42 0 3000",
        "read -P 0x47 3000 5000",
        "read -P 0x43 64k 64k",
        "read -P 0 128k 1152k",  # zeroed, zeroed, trimmed
        "read -P 0 1408k 14976k",  # never written
        "read -P 0x48 16M 4M",
        "read -P 0x49 63M 1M",
    )
    assert "Pattern verification failed" not in out

    # The check can fail: a wrong pattern must make qemu-io fail.
    bad = run(["qemu-io", "-f", "raw", "-c", "read -P 0x99 64k 4k", uri], check=False)
    assert bad.returncode != 0
    assert "Pattern verification failed" in bad.stdout + bad.stderr


def test_qemu_io_default_cache_fua_every_write(blockvirt_server: BlockvirtServer) -> None:
    """qemu's default (writethrough) puts FUA on every WRITE; all must land."""
    need("qemu-io")
    uri = blockvirt_server.create_volume("wt", 16 * MiB)
    cmds = [f"write -P {0x10 + i:#x} {i}M 256k" for i in range(8)]
    cmds += [f"read -P {0x10 + i:#x} {i}M 256k" for i in range(8)]
    out = qemu_io(uri, *cmds)
    assert "Pattern verification failed" not in out
    assert sum(ln.startswith("read ") for ln in out.splitlines()) == 8, out
    info = volume_info(blockvirt_server, "wt")
    assert info["allocated"] >= 8 * 256 * 1024


def _make_qcow2(path: Path) -> None:
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"])
    run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0xaa 0 1M",
            "-c",
            "write -P 0xbb 5M 64k",
            "-c",
            "write -P 0xcc 17409k 4k",  # 17 MiB + 1 KiB, unaligned to clusters
            "-c",
            "write -P 0xdd 40M 2M",
            "-c",
            "write -z 40M 64k",  # an explicit zero cluster inside data
            "-c",
            "write -P 0xee 65472k 64k",  # the last 64 KiB
            path,
        ]
    )


def test_qemu_img_convert_into_volume_and_compare(blockvirt_server: BlockvirtServer, tmp_path: Path) -> None:
    need("qemu-img", "qemu-io")
    src = tmp_path / "src.qcow2"
    _make_qcow2(src)
    uri = blockvirt_server.create_volume("conv", 64 * MiB)
    # Dirty the volume where the source has holes: convert must zero those ranges itself.
    qemu_io(uri, "write -P 0x77 10M 1M", "write -P 0x78 40M 64k")

    run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", src, uri], timeout=120)
    same = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, uri], check=False)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "Images are identical" in same.stdout

    # Export it again to a file: identical too.
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out], timeout=120)
    assert run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, out], check=False).returncode == 0

    # One changed sector in the volume (in a source hole) must be found.
    qemu_io(uri, "write -P 0x01 30M 512")
    diff = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, uri], check=False)
    assert diff.returncode == 1, diff.stdout + diff.stderr
    assert f"Content mismatch at offset {30 * MiB}" in diff.stdout

    # ... and one changed byte inside a data range of the copy.
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x00 5M 1", out])
    diff = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", out, uri], check=False)
    assert diff.returncode == 1, diff.stdout + diff.stderr
    assert f"Content mismatch at offset {5 * MiB}" in diff.stdout
