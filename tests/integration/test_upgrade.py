"""A data directory made by the previous release opens with this one and passes `check`.

The previous release is not a stored directory but its code: `git archive` of the commit
before the storage core was reshaped runs as a real `blockvirt serve`, builds a data directory
through its API and NBD (pools, thin and thick volumes, a snapshot tree with a revert branch,
a linked clone, a merged-away snapshot, access rules, QoS settings), and stops. This release
then checks it offline, serves it, and every byte and setting must be as the old one left it.
The expected contents are patterns this test writes, never values read back from either
release's code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from blockvirt.cli.client import ApiClient
from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

#: The last commit with the old storage core (pools, migration, QoS: release 0.1 as it shipped).
OLD_RELEASE = "48e2020"
REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def _pattern(tag: int, n: int) -> bytes:
    return bytes([tag]) * n


class OldServer:
    """The previous release's `blockvirt serve`, run from its own source tree."""

    def __init__(self, code: Path, data: Path) -> None:
        self.code, self.data = code, data
        self.proc: subprocess.Popen[bytes] | None = None
        self.api_url = ""
        self.nbd = ""

    def __enter__(self) -> OldServer:
        ready = self.data.parent / "old.ready"
        log = open(self.data.parent / "old.log", "ab")
        env = {**os.environ, "PYTHONPATH": str(self.code)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blockvirt", "serve", "--data-dir", str(self.data),
             "--nbd", "127.0.0.1:0", "--api", "127.0.0.1:0", "--ready-file", str(ready)],
            cwd=self.code, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert self.proc.poll() is None, (self.data.parent / "old.log").read_text()
            assert time.monotonic() < deadline, "the old release did not start"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.api_url, self.nbd = info["api"], info["nbd"]
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def api(self) -> ApiClient:
        return ApiClient(self.api_url)

    def uri(self, export: str) -> str:
        return f"nbd://{self.nbd}/{export}"


async def _write(uri: str, writes: list[tuple[int, bytes]]) -> None:
    async with await NbdClient.connect(uri) as disk:
        for off, data in writes:
            await disk.write(off, data)
        await disk.flush()


async def _read(uri: str, off: int, n: int) -> bytes:
    async with await NbdClient.connect(uri) as disk:
        return bytes(await disk.read(off, n))


def _wait_jobs(api: ApiClient) -> None:
    deadline = time.monotonic() + 60
    while any(j["state"] == "running" for j in api.get("/api/v1/jobs")["jobs"]):
        assert time.monotonic() < deadline, "jobs of the old release did not finish"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def old_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.fail("this test needs git and the repository's history (a clone, not an export)")
    dest = tmp_path_factory.mktemp("old-release")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", OLD_RELEASE, "blockvirt"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


async def test_previous_release_data_directory_opens_and_checks_clean(old_code: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    second = tmp_path / "second-pool"
    with OldServer(old_code, data) as old:
        api = old.api
        api.post("/api/v1/pools", {"name": "second", "path": str(second)})
        api.post("/api/v1/volumes", {"name": "base", "size": 8 * MiB})
        api.post("/api/v1/volumes", {"name": "fat", "size": 4 * MiB, "thick": True, "pool": "second"})
        await _write(old.uri("base"), [(0, _pattern(1, 64 * 1024)), (4 * MiB, _pattern(2, 4096))])
        api.post("/api/v1/volumes/base/snapshots", {"name": "s1"})
        await _write(old.uri("base"), [(0, _pattern(3, 4096))])
        api.post("/api/v1/volumes/base/snapshots", {"name": "s2"})
        await _write(old.uri("base"), [(8192, _pattern(4, 4096))])
        api.post("/api/v1/volumes/base/snapshots", {"name": "s3"})
        # A branch: back to s1, keep s2 and s3, write something new on the branch.
        api.post("/api/v1/volumes/base/snapshots/s1/revert", {})
        await _write(old.uri("base"), [(MiB, _pattern(5, 4096))])
        api.post("/api/v1/volumes", {"name": "clone1", "source": "base@s2"})
        await _write(old.uri("clone1"), [(2 * MiB, _pattern(6, 4096))])
        # s3 sits on a hidden layer with one child: deleting it merges (a job of the old release).
        api.request("DELETE", "/api/v1/volumes/base/snapshots/s3")
        _wait_jobs(api)
        await _write(old.uri("fat"), [(MiB, _pattern(7, 8192))])
        api.post("/api/v1/volumes/base/acl", {"kind": "address", "value": "127.0.0.0/8"})
        api.request("PATCH", "/api/v1/volumes/fat/qos", {"shares": 2000, "limit": 700})
        old_snaps = {s["name"]: s["parent"] for s in api.get("/api/v1/volumes/base/snapshots")["snapshots"]}

    check = subprocess.run(
        [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(data), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report["ok"] and not report["damage"] and report["volumes"] == 3

    with BlockvirtServer(data) as new:
        vols = {v["name"]: v for v in new.api.get("/api/v1/volumes")["volumes"]}
        assert set(vols) == {"base", "fat", "clone1"}
        assert vols["fat"]["pool"] == "second" and vols["fat"]["thick"] is True
        assert vols["base"]["size"] == 8 * MiB and vols["clone1"]["size"] == 8 * MiB
        snaps: dict[str, Any] = {
            s["name"]: s["parent"] for s in new.api.get("/api/v1/volumes/base/snapshots")["snapshots"]
        }
        assert snaps == old_snaps == {"s1": None, "s2": "s1"}
        # The head: s1's data plus the branch's own write; s2's later write is not there.
        assert await _read(new.uri("base"), 0, 4096) == _pattern(1, 4096)
        assert await _read(new.uri("base"), MiB, 4096) == _pattern(5, 4096)
        assert await _read(new.uri("base"), 4 * MiB, 4096) == _pattern(2, 4096)
        assert await _read(new.uri("base"), 8192, 4096) == _pattern(1, 4096)
        assert await _read(new.uri("base@s2"), 0, 8192) == _pattern(3, 4096) + _pattern(1, 4096)
        assert await _read(new.uri("base@s2"), MiB, 4096) == bytes(4096)
        assert await _read(new.uri("clone1"), 0, 4096) == _pattern(3, 4096)
        assert await _read(new.uri("clone1"), 2 * MiB, 4096) == _pattern(6, 4096)
        assert await _read(new.uri("fat"), MiB, 8192) == _pattern(7, 8192)
        assert await _read(new.uri("fat"), 0, 4096) == bytes(4096)
        rules = new.api.get("/api/v1/volumes/base/acl")["rules"]
        assert [(r["kind"], r["value"]) for r in rules] == [("address", "127.0.0.0/8")]
        qos = new.api.get("/api/v1/volumes/fat/qos")
        assert qos["shares"] == 2000 and qos["limit"] == 700
        # And the new release writes to it as usual.
        await _write(new.uri("base"), [(3 * MiB, _pattern(8, 4096))])
        assert await _read(new.uri("base"), 3 * MiB, 4096) == _pattern(8, 4096)
    check = subprocess.run(
        [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
