"""fio's NBD engine (libnbd) with data verification at queue depth 16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import MiB, need, run

pytestmark = pytest.mark.interop


@pytest.mark.parametrize(("bs", "size"), [("4k", 32 * MiB), ("64k", 48 * MiB)])
def test_fio_randwrite_verify(blockvirt_server: BlockvirtServer, tmp_path: Path, bs: str, size: int) -> None:
    need("fio")
    uri = blockvirt_server.create_volume("fio", 64 * MiB)
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
        timeout=120,
        check=False,
        cwd=tmp_path,  # fio drops state files in its working directory
    )
    assert r.returncode == 0, r.stdout + r.stderr + (out.read_text() if out.exists() else "")
    [job] = json.loads(out.read_text())["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == size
    assert job["read"]["io_bytes"] == size  # the verify pass read everything back
    assert "verify" not in (r.stderr or "").lower()  # no "verify: bad header/crc" messages
