"""A bounded soak (tools/bench/soak.py, shorter): 64 initiators (16 volumes x 4 fio jobs)
mixing crc32c-verified reads and writes, snapshots taken and deleted under the load, two
volumes under QoS limits; then SIGTERM and an offline check. Zero errors, a clean check, and
the server's memory flat after warm-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from blockvirt.testing import BlockvirtServer
from tools.bench import soak

from .conftest import need

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_soak_64_initiators_16_volumes(tmp_path: Path) -> None:
    need("fio")
    with BlockvirtServer(tmp_path / "data") as server:
        res = soak.run(server, tmp_path, volumes=16, jobs=4, duration=40.0)
    bad = {n: r for n, r in res["fio"].items() if r["rc"] or r["errors"]}
    assert not bad, bad
    assert all(r["read_bytes"] and r["write_bytes"] for r in res["fio"].values())
    assert res["churn"]["snapshots"] >= 5 and res["churn"]["errors"] == 0, res["churn"]
    assert res["rss_growth_mib"] <= 32, res["rss_mib"]
    chk = subprocess.run(
        [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert chk.returncode == 0, chk.stdout + chk.stderr
