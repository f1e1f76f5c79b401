"""A blockvirt cluster for tests: the session's one-node Ceph, one fresh RBD pool per test, and
two or three `blockvirt serve` nodes (`--node-name`, their own data directories, NBD on
127.0.0.2, .3, .4 with free ports), each attaching the pool.

    async def test_x(cluster3: Cluster) -> None:
        a, b, c = cluster3.nodes
        a.create_volume("v", 16 * MiB)
        a.kill()
        cluster3.wait_presumed_dead(a, by=b)

Every node is stopped after the test (a frozen one is thawed first), the Ceph pool deleted.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvirt.cli.client import ApiClient
from blockvirt.testing import BlockvirtServer
from tests.cephcluster import CephCluster

try:
    import rados  # noqa: F401

    BINDINGS_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on the machine
    BINDINGS_ERROR = str(e)

MiB = 1 << 20
#: How long after its last heartbeat a peer is presumed dead (members.DEAD_AFTER), plus the
#: time it takes to notice: waits are bounded by this and a margin.
DEAD_AFTER = 5.0


class Node:
    """One `blockvirt serve --node-name NAME` process of the cluster."""

    def __init__(self, name: str, host: str, data_dir: Path, pool: str, ceph: CephCluster) -> None:
        self.name = name
        self.host = host
        self.pool = pool
        self.ceph = ceph
        self.server = BlockvirtServer(
            data_dir, extra_args=("--node-name", name), log_level="info", startup_timeout=60
        )
        self.server.nbd_host = host
        self.frozen = False

    # ------------------------------------------------------------ life
    def start(self) -> Node:
        self.server.nbd_port = 0
        self.server.start()
        return self

    def attach(self, pool_name: str = "cp") -> None:
        """`pool create cp --rbd POOL --ceph-conf FILE` (through the API: the CLI's own test
        is test_a_volume_looks_the_same_through_every_node)."""
        existing = {p["name"] for p in self.api.get("/api/v1/pools")["pools"]}
        if pool_name not in existing:
            self.api.post(
                "/api/v1/pools",
                {"name": pool_name, "rbd": {"pool": self.pool, "conf": str(self.ceph.conf_path)}},
            )

    @property
    def pid(self) -> int:
        assert self.server.proc is not None, f"node {self.name} is not running"
        return self.server.proc.pid

    @property
    def running(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    def kill(self) -> float:
        """SIGKILL, as a crash or a power loss would; returns the monotonic time of the kill."""
        proc = self.server.proc
        assert proc is not None
        t = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.server.stop()
        return t

    def freeze(self) -> float:
        """SIGSTOP: the process holds its sockets and its Ceph client but does nothing (a hung
        node, a stalled VM)."""
        t = time.monotonic()
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True
        # Stopped for sure before the caller goes on (it may send requests that must reach
        # the node only after the freeze).
        while self.state() != "T":
            time.sleep(0.001)
        return t

    def state(self) -> str:
        """The process state letter from /proc (R, S, T for stopped, ...)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0]

    def thaw(self) -> float:
        t = time.monotonic()
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False
        return t

    def stop(self) -> None:
        if self.server.proc is not None and self.frozen:
            self.thaw()
        self.server.stop(timeout=15)

    def restart(self) -> None:
        """Start again on the same data directory (it attaches its pools by itself)."""
        self.stop()
        self.start()

    # ------------------------------------------------------------ use
    @property
    def api(self) -> ApiClient:
        return ApiClient(self.server.api_url, timeout=60)

    @property
    def nbd(self) -> str:
        return f"{self.server.nbd_host}:{self.server.nbd_port}"

    def uri(self, volume: str) -> str:
        return self.server.uri(volume)

    def cli(self, *args: str) -> Any:
        """`blockvirt ARGS --json` on this node; the parsed answer (fails on an error)."""
        r = self.server.cli(*args, "--json", timeout=60)
        assert r.returncode == 0, f"blockvirt {' '.join(args)} on {self.name}: {r.stdout}{r.stderr}"
        return json.loads(r.stdout) if r.stdout.strip() else None

    def create_volume(self, name: str, size: int) -> str:
        self.api.post("/api/v1/volumes", {"name": name, "size": size, "pool": "cp"})
        return self.uri(name)

    def nodes(self) -> dict[str, dict[str, Any]]:
        """This node's view of the pool's cluster (GET /api/v1/nodes), by node name."""
        view = self.api.get("/api/v1/nodes")
        pools = [p for p in view["pools"] if p["pool"] == "cp"]
        assert len(pools) == 1, view
        return {n["name"]: n for n in pools[0]["nodes"]}

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.server.api_url + "/metrics", timeout=30) as resp:
            return str(resp.read().decode())

    def log(self) -> str:
        try:
            return self.server.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"Node({self.name} {self.nbd})"


class Cluster:
    def __init__(self, ceph: CephCluster, pool: str, nodes: list[Node]) -> None:
        self.ceph = ceph
        self.pool = pool
        self.nodes = nodes

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def uris(self, volume: str, first: Node | None = None) -> list[str]:
        """The volume's URI on every node (`first` first): what a client with fallbacks uses."""
        order = sorted(self.nodes, key=lambda n: n is not first)
        return [n.uri(volume) for n in order if n.running]

    def wait(self, what: str, ready: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
        """Poll until `ready()`; returns the seconds it took."""
        t0 = time.monotonic()
        while not ready():
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(step)
        return time.monotonic() - t0

    def wait_presumed_dead(self, node: Node, *, by: Node, timeout: float = DEAD_AFTER + 5) -> float:
        return self.wait(
            f"{by.name} to presume {node.name} dead", lambda: not by.nodes()[node.name]["alive"], timeout
        )

    def wait_alive(self, node: Node, *, by: Node, timeout: float = 15.0) -> float:
        def alive() -> bool:
            seen = by.nodes().get(node.name)
            return seen is not None and bool(seen["alive"])

        return self.wait(f"{by.name} to see {node.name} alive", alive, timeout)

    def owner(self, volume: str, *, via: Node) -> str | None:
        """Who serves the volume, as `via` sees it (node list)."""
        for name, n in via.nodes().items():
            if volume in n["volumes"]:
                return name
        return None

    def wait_owner(self, volume: str, owner: str, *, via: Node, timeout: float = 10.0) -> float:
        what = f"{via.name} to see {volume} owned by {owner}"
        return self.wait(what, lambda: self.owner(volume, via=via) == owner, timeout)

    def wait_catalog(self, volume: str, *, timeout: float = 10.0) -> float:
        """Wait until every running node knows the volume."""

        def known() -> bool:
            return all(
                any(v["name"] == volume for v in n.api.get("/api/v1/volumes")["volumes"])
                for n in self.nodes
                if n.running
            )

        return self.wait(f"every node to know {volume}", known, timeout)


def _make_cluster(tmp_path: Path, ceph: CephCluster, count: int) -> Iterator[Cluster]:
    if BINDINGS_ERROR is not None:
        from tests.needs import missing

        missing(f"Ceph's Python bindings are missing: {BINDINGS_ERROR}")
    pool = f"bvcl-{uuid.uuid4().hex[:8]}"
    _pool(ceph, pool, create=True)
    nodes = [
        Node(name, f"127.0.0.{i + 2}", tmp_path / name, pool, ceph)
        for i, name in enumerate(["node-a", "node-b", "node-c"][:count])
    ]
    try:
        # Started side by side: each start is mostly waiting (imports, Ceph connect).
        with concurrent.futures.ThreadPoolExecutor(count) as ex:
            list(ex.map(Node.start, nodes))
            list(ex.map(Node.attach, nodes))
        yield Cluster(ceph, pool, nodes)
    finally:
        failed = []

        def stop(n: Node) -> None:
            try:
                n.stop()
            except Exception as e:  # stop the others anyway
                failed.append(f"{n.name}: {e}")

        with concurrent.futures.ThreadPoolExecutor(len(nodes)) as ex:
            list(ex.map(stop, nodes))
        try:
            _pool(ceph, pool, create=False)
        except Exception as e:
            failed.append(f"pool {pool}: {e}")
        assert not failed, failed


def _pool(ceph: CephCluster, name: str, *, create: bool) -> None:
    """Create (and `rbd pool init`) or delete a Ceph pool through the bindings: a second
    faster than the `ceph` and `rbd` commands, which each start a client."""
    import rados
    import rbd

    cluster = rados.Rados(conffile=str(ceph.conf_path))
    cluster.connect(timeout=10)
    try:
        if create:
            cluster.create_pool(name)
            ioctx = cluster.open_ioctx(name)
            try:
                rbd.RBD().pool_init(ioctx, True)
            finally:
                ioctx.close()
        else:
            cluster.delete_pool(name)
    finally:
        cluster.shutdown()


@pytest.fixture
def cluster2(tmp_path: Path, ceph_cluster: CephCluster) -> Iterator[Cluster]:
    """Two nodes, node-a (127.0.0.2) and node-b (127.0.0.3), over one fresh RBD pool."""
    yield from _make_cluster(tmp_path, ceph_cluster, 2)


@pytest.fixture
def cluster3(tmp_path: Path, ceph_cluster: CephCluster) -> Iterator[Cluster]:
    """Three nodes, node-a, node-b, node-c (127.0.0.2-4), over one fresh RBD pool."""
    yield from _make_cluster(tmp_path, ceph_cluster, 3)


#: How much of each node's log a failed test's report shows (CI keeps only the report).
LOG_TAIL_LINES = 40


def _log_tail(node: Node) -> str:
    """The node's last log lines, a run of one repeated message shown once with its count."""
    lines: list[str] = []
    last, repeats = "", 0
    for line in node.log().splitlines():
        message = line.split(" ", 2)[-1]  # without the date and time
        if message == last:
            repeats += 1
            continue
        if repeats:
            lines.append(f"    ... {repeats} more of the line above")
        lines.append(line[:400])
        last, repeats = message, 0
    if repeats:
        lines.append(f"    ... {repeats} more of the line above")
    return "\n".join(lines[-LOG_TAIL_LINES:])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed cluster test's report carries the tail of every node's log: what the nodes did
    is often the only clue, and the logs go with the test's temporary directory."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Cluster):
            for node in value.nodes:
                report.sections.append((f"{node.name} log (tail)", _log_tail(node)))
