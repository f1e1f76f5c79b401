"""tests/cephcluster.py itself: a failed start leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cephcluster import CephCluster, CephClusterError, missing_binaries
from tests.conftest import unavailable

pytestmark = pytest.mark.ceph


def ceph_daemons() -> set[int]:
    """PIDs of ceph-mon/ceph-osd processes started from a CephCluster directory."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(b"ceph-") for a in argv[:4]) and any(b"/bvceph-" in a for a in argv):
            found.add(int(entry.name))
    return found


def test_a_failed_start_cleans_up(tmp_path: Path) -> None:
    missing = missing_binaries()
    if missing:
        unavailable(f"Ceph is not installed (missing {', '.join(missing)})")
    before = ceph_daemons()
    # The mon comes up, then bluestore refuses a 16 MiB device at OSD mkfs.
    cluster = CephCluster(parent_dir=tmp_path, osd_bytes=16 << 20, start_timeout=30)
    with pytest.raises(CephClusterError) as e:
        cluster.start()
    assert "osd" in str(e.value).lower()
    assert ceph_daemons() <= before
    assert cluster.dir is None and os.listdir(tmp_path) == []
    cluster.stop()  # harmless again
