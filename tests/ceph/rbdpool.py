"""A real `blockvirt serve` with an RBD pool on the session's Ceph, and Ceph's own view of what
it made there (the `rbd` and `rados` CLIs, never blockvirt's code).

    server = BlockvirtServer(tmp / "data", extra_args=SERVE_ARGS).start()
    attach(server, ceph_cluster, ceph_pool)            # blockvirt pool "rbd"
    view = CephView(ceph_cluster, ceph_pool)
    assert "vol" in view.ls()
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

from blockvirt.testing import BlockvirtServer
from tests.cephcluster import CephCluster

T = TypeVar("T")

KiB, MiB = 1 << 10, 1 << 20
#: The blockvirt pool the tests attach the Ceph pool as.
BV_POOL = "rbd"
#: Short timeouts, so failures show in seconds; figures looked at every second.
OP_TIMEOUT = 3.0
CONNECT_TIMEOUT = 2.0
SERVE_ARGS = (
    *("--ceph-op-timeout", f"{OP_TIMEOUT:g}"),
    *("--ceph-connect-timeout", f"{CONNECT_TIMEOUT:g}"),
    *("--ceph-retry-interval", "1"),
    *("--ceph-figures-interval", "1"),
)


def attach(server: BlockvirtServer, ceph: CephCluster, ceph_pool: str, name: str = BV_POOL) -> dict[str, Any]:
    """`blockvirt pool create NAME --rbd CEPHPOOL --ceph-conf FILE` through the CLI."""
    r = server.cli("pool", "create", name, "--rbd", ceph_pool, "--ceph-conf", str(ceph.conf_path), "--json")
    assert r.returncode == 0, r.stderr
    info: dict[str, Any] = json.loads(r.stdout)
    return info


def cli_json(server: BlockvirtServer, *args: str) -> Any:
    r = server.cli(*args, "--json")
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return json.loads(r.stdout)


def cli_error(server: BlockvirtServer, *args: str) -> str:
    """Run a command that must fail with one clear line (exit 1, no traceback)."""
    r = server.cli(*args)
    assert r.returncode == 1, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 15.0, every: float = 0.1) -> T:
    """Poll fn() until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def scrape(server: BlockvirtServer) -> str:
    """GET /metrics (blocking: call from a thread in async tests)."""
    with urllib.request.urlopen(server.api_url + "/metrics", timeout=30) as resp:
        text: str = resp.read().decode()
        return text


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in a Prometheus text exposition, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_:]+)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        got = ",".join(sorted(p for p in (m.group(2) or "").split(",") if p))
        if got == want:
            return float(m.group(3))
    return None


class CephView:
    """What Ceph's own tools say about one Ceph pool."""

    def __init__(self, ceph: CephCluster, pool: str) -> None:
        self.ceph = ceph
        self.pool = pool

    def _json(self, *args: str) -> Any:
        return json.loads(self.ceph.rbd(*args, "--format", "json"))

    def spec(self, image: str, snap: str | None = None) -> str:
        return f"{self.pool}/{image}" + (f"@{snap}" if snap else "")

    def ls(self) -> list[str]:
        return sorted(self._json("ls", "-p", self.pool))

    def info(self, image: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json("info", self.spec(image))
        return out

    def snaps(self, image: str) -> list[str]:
        return [s["name"] for s in self._json("snap", "ls", self.spec(image))]

    def meta(self, image: str) -> dict[str, str]:
        raw = self.ceph.rbd("image-meta", "list", self.spec(image), "--format", "json").strip()
        return json.loads(raw) if raw else {}

    def used(self, image: str) -> int:
        """Bytes the image's head holds (`rbd du`: whole objects, from the object map)."""
        for entry in self._json("du", self.spec(image))["images"]:
            if entry["name"] == image and "snapshot" not in entry:
                return int(entry["used_size"])
        raise AssertionError(f"rbd du does not list {image}")

    def export(self, image: str, snap: str | None = None) -> bytes:
        """The image's bytes as another Ceph client reads them (`rbd export ... -`)."""
        r = subprocess.run(
            ["rbd", "-c", str(self.ceph.conf_path), "export", self.spec(image, snap), "-"],
            capture_output=True,
            timeout=60,
            check=True,
        )
        return r.stdout

    def catalog_keys(self) -> list[str]:
        """The keys of blockvirt's catalog object (`rados listomapkeys`)."""
        r = subprocess.run(
            ["rados", "-c", str(self.ceph.conf_path), "-p", self.pool, "listomapkeys", "blockvirt.catalog"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return sorted(r.stdout.split())
