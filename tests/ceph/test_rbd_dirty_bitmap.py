"""qemu:dirty-bitmap contexts on a volume in an RBD pool: the answer comes from RBD's own diff
since the snapshot, and reads like a file pool's (libnbd's own scenario, nbdinfo --map).

One difference, documented in docs/rbd.md: RBD's diff reports what changed in the objects, so
zeroing a range that already read as zeros (never written) is no change there. The scenario
therefore zeroes a range that held data at the snapshot; the expected map is libnbd's."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph

KiB = 1024
MiB = 1024 * KiB
#: info/info-map-qemu-dirty-bitmap.sh's expected output (spaces squeezed), on a 1 MiB disk.
LIBNBD_MAP = """ 0 65536 0 clean
 65536 65536 1 dirty
 131072 393216 0 clean
 524288 65536 1 dirty
 589824 458752 0 clean"""


def squeeze(text: str) -> str:
    return "\n".join(" " + " ".join(line.split()) for line in text.strip().splitlines())


@pytest.fixture
def server(tmp_path: Path, ceph_cluster: CephCluster, ceph_pool: str) -> Iterator[BlockvirtServer]:
    with BlockvirtServer(tmp_path / "data") as s:
        r = s.cli("pool", "create", "ceph", "--rbd", ceph_pool, "--ceph-conf", str(ceph_cluster.conf_path))
        assert r.returncode == 0, r.stderr
        yield s


async def test_libnbd_scenario_on_an_rbd_volume(server: BlockvirtServer) -> None:
    name = f"dirty-{uuid.uuid4().hex[:8]}"
    server.create_volume(name, MiB, pool="ceph")
    async with await NbdClient.connect(server.uri(name)) as disk:
        await disk.write(0, b"a" * 64 * KiB)
        await disk.write(512 * KiB, b"z" * 64 * KiB)
        await disk.flush()
    assert server.cli("snapshot", "create", name, "s1").returncode == 0
    async with await NbdClient.connect(server.uri(name)) as disk:
        await disk.write(64 * KiB, b"b" * 64 * KiB)
        await disk.zero(512 * KiB, 64 * KiB)
        await disk.flush()
    assert server.cli("snapshot", "create", name, "s2").returncode == 0
    for export in (f"{name}@s2", name):
        out = subprocess.run(
            ["nbdinfo", "--map=qemu:dirty-bitmap:s1", server.uri(export)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert squeeze(out.stdout) == LIBNBD_MAP, (export, out.stdout)
