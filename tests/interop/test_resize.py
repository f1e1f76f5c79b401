"""Live resize as real clients see it: fio keeps writing (with verification) while the volume
grows; qemu-img and nbdinfo see the new size when they connect again."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import MiB, need, run

pytestmark = pytest.mark.interop


def test_grow_under_fio_verify_then_clients_see_new_size(
    blockvirt_server: BlockvirtServer, tmp_path: Path
) -> None:
    need("fio", "qemu-img", "nbdinfo")
    server = blockvirt_server
    uri = server.create_volume("live", 64 * MiB)
    out = tmp_path / "fio.json"
    fio = subprocess.Popen(
        [
            "fio", "--name=grow", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
            "--size=48M", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
            "--verify_state_save=0", "--time_based=0", "--eta=never", "--output-format=json",
            f"--output={out}",
        ],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while server.api.get("/api/v1/volumes/live")["connections"] == 0:
            assert time.monotonic() < deadline and fio.poll() is None, "fio never connected"
            time.sleep(0.05)
        sizes = []
        for size in ("80M", "96M", "128M"):  # three grows while fio writes and verifies
            r = server.cli("volume", "resize", "live", size, "--json")
            assert r.returncode == 0, r.stderr
            sizes.append(json.loads(r.stdout)["size"])
            time.sleep(0.2)
        _, err = fio.communicate(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err + (out.read_text() if out.exists() else "")
    [job] = json.loads(out.read_text())["jobs"]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 48 * MiB and job["read"]["io_bytes"] == 48 * MiB
    assert sizes == [80 * MiB, 96 * MiB, 128 * MiB]
    # New connections see the new size.
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", uri]).stdout)
    assert info["virtual-size"] == 128 * MiB
    assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(128 * MiB)
    # A shrink under a connected client is refused; the client is unaffected.
    r = run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 120M 64k", uri])
    assert "wrote" in r.stdout
    r = server.cli("volume", "resize", "live", "64M", "--force")
    assert r.returncode == 0, r.stderr  # nobody connected now: forced shrink works
    assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(64 * MiB)
