"""Live migration as real clients see it: fio writes with crc32c verification (and a verify
backlog, so it reads back while writing) through the migration of a volume with a 3-deep
snapshot chain; afterwards every snapshot export is byte-identical (qemu-img compare against
copies taken before), the data lives in the new pool only, and the old pool's space is back."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import MiB, need, qemu_io, run

pytestmark = pytest.mark.interop


def test_fio_verify_through_migration_of_a_snapshot_chain(
    blockvirt_server: BlockvirtServer, tmp_path: Path
) -> None:
    need("fio", "qemu-img", "qemu-io")
    server = blockvirt_server
    fast = tmp_path / "fast"
    server.api.post("/api/v1/pools", {"name": "fast", "path": str(fast)})
    uri = server.create_volume("vm", 64 * MiB)
    # Three snapshots, each over different data (some of it where fio will write later).
    for i in range(3):
        qemu_io(uri, f"write -P {0x11 * (i + 1):#x} {i * 8}M 6M", f"write -P {0x70 + i:#x} {40 + i}M 1M")
        server.api.post("/api/v1/volumes/vm/snapshots", {"name": f"s{i}"})
    images = {}
    for i in range(3):
        img = tmp_path / f"s{i}.raw"
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(f"vm@s{i}"), img])
        images[f"s{i}"] = img
    default_dir = Path(server.api.get("/api/v1/pools/default")["path"])
    assert len(os.listdir(default_dir)) == 8  # head + 3 snapshot layers, 2 files each

    out = tmp_path / "fio.json"
    fio = subprocess.Popen(
        [
            "fio", "--name=mig", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
            "--size=32M", "--iodepth=16", "--rate_iops=1500", "--loops=2", "--verify=crc32c",
            "--verify_backlog=256", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
            "--eta=never", "--output-format=json", f"--output={out}",
        ],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while server.api.get("/api/v1/volumes/vm")["connections"] == 0:
            assert fio.poll() is None and time.monotonic() < deadline, "fio did not connect"
            time.sleep(0.05)
        time.sleep(1.0)  # fio is writing (and verifying) now
        r = server.cli(
            "migrate", "vm", "--pool", "fast", "--bps-limit", "8M", "--wait", "--json", timeout=120
        )
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)
        assert fio.poll() is None, "fio ended before the migration did: the test proves nothing"
        _, err = fio.communicate(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err + (out.read_text() if out.exists() else "")
    [fjob] = json.loads(out.read_text())["jobs"]
    assert fjob["error"] == 0
    assert fjob["write"]["io_bytes"] == 64 * MiB and fjob["read"]["io_bytes"] > 0  # backlog verified
    assert job["state"] == "done" and job["result"]["mirrored_writes"] > 0, job
    # Every snapshot export is byte-identical to what it was.
    for name, img in images.items():
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), server.uri(f"vm@{name}")])
    # The data is in the new pool, the old one gave its space back.
    assert server.api.get("/api/v1/volumes/vm")["pool"] == "fast"
    assert os.listdir(default_dir) == []
    assert len(os.listdir(fast)) == 8
    info = server.api.get("/api/v1/pools/fast")
    assert info["allocated"] >= 3 * 7 * MiB and server.api.get("/api/v1/pools/default")["allocated"] == 0
    server.stop()
    chk = server.cli("check", "--data-dir", str(server.data_dir))
    assert chk.returncode == 0 and "leak" not in chk.stdout, chk.stdout
