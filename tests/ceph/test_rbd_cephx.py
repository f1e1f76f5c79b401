"""cephx users and their caps, on a throwaway cluster of its own with authentication on (the
shared test cluster runs without): a node runs an RBD pool with a user whose caps reach that
pool alone, and a user it cannot use is refused at `pool create` at once, in one line that
says why."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockvirt.cli.client import ApiError
from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer
from tests.ceph.conftest import unique
from tests.ceph.rbdpool import SERVE_ARGS, MiB, cli_error, cli_json
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph

POOL, OTHER, TENANT = "vols", "other", "tenant"
RBD_CAPS = {"mon": "profile rbd", "osd": f"profile rbd pool={POOL}"}


@pytest.fixture(scope="module")
def cephx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    with CephCluster(cephx=True, mgr=False, parent_dir=tmp_path_factory.mktemp("cephx")) as ceph:
        ceph.create_pool(POOL)
        ceph.create_pool(OTHER)
        ceph.add_user("node", RBD_CAPS)
        ceph.add_user("reader", {"mon": "profile rbd", "osd": f"profile rbd-read-only pool={POOL}"})
        ceph.add_user("forged", RBD_CAPS, wrong_key=True)
        ceph.rbd("namespace", "create", f"{POOL}/{TENANT}")
        ceph.add_user("tenant", {"mon": "profile rbd", "osd": f"profile rbd pool={POOL} namespace={TENANT}"})
        yield ceph


def create(server: BlockvirtServer, ceph: CephCluster, name: str, pool: str, user: str) -> list[str]:
    return ["pool", "create", name, "--rbd", pool, "--ceph-conf", str(ceph.conf_path), "--ceph-user", user]


def test_users_a_node_cannot_use_are_refused_at_once(tmp_path: Path, cephx: CephCluster) -> None:
    refusals = [
        (OTHER, "node", f"client node may not read Ceph pool '{OTHER}': its caps do not allow it"),
        (POOL, "reader", f"client reader may not write to Ceph pool '{POOL}': a node needs read-write caps"),
        (POOL, "forged", "authentication failed for client forged"),
        (POOL, "nobody", "authentication failed for client nobody"),
        # Caps for one namespace do not reach the rest of the pool.
        (POOL, "tenant", f"client tenant may not read Ceph pool '{POOL}': its caps do not allow it"),
    ]
    with BlockvirtServer(tmp_path / "data", extra_args=SERVE_ARGS) as server:
        for pool, user, words in refusals:
            t0 = time.monotonic()
            line = cli_error(server, *create(server, cephx, unique("p"), pool, user))
            took = time.monotonic() - t0
            assert words in line, (user, line)
            assert took < 5, (user, took)
        # The API says it is the request that is wrong (400), not the cluster that is down.
        with pytest.raises(ApiError) as e:
            server.api.post(
                "/api/v1/pools",
                {"name": unique("p"), "rbd": {"pool": OTHER, "conf": str(cephx.conf_path), "user": "node"}},
            )
        assert e.value.status == 400, e.value
        assert [p["name"] for p in cli_json(server, "pool", "list")] == ["default"]  # none half-made


async def test_a_user_whose_caps_reach_one_pool_serves_it(tmp_path: Path, cephx: CephCluster) -> None:
    name = unique("v")
    data = b"c" * 65536
    with BlockvirtServer(tmp_path / "data", extra_args=SERVE_ARGS) as server:
        r = server.cli(*create(server, cephx, "ceph", POOL, "node"))
        assert r.returncode == 0, r.stderr
        server.create_volume(name, 4 * MiB, pool="ceph")
        async with await NbdClient.connect(server.uri(name)) as c:
            await c.write(0, data, fua=True)
            server.api.post(f"/api/v1/volumes/{name}/snapshots", {"name": "s1"})
            await c.write(0, b"d" * 4096)
            await c.flush()
        async with await NbdClient.connect(server.uri(f"{name}@s1")) as c:
            assert await c.read(0, len(data)) == data
        assert name in cephx.rbd("ls", POOL).split()
        assert "s1" in cephx.rbd("snap", "ls", f"{POOL}/{name}")

    # A restart attaches the pool again as the same user (the node keeps it with the pool).
    with BlockvirtServer(tmp_path / "data", extra_args=SERVE_ARGS) as again:
        info = cli_json(again, "pool", "info", "ceph")
        assert "error" not in info and info["rbd"]["user"] == "node", info
        async with await NbdClient.connect(again.uri(name)) as c:
            assert await c.read(0, 4096) == b"d" * 4096
        again.api.delete(f"/api/v1/volumes/{name}")
        assert name not in cephx.rbd("ls", POOL).split()


async def test_a_user_whose_caps_reach_one_namespace_serves_it(tmp_path: Path, cephx: CephCluster) -> None:
    name = unique("v")
    with BlockvirtServer(tmp_path / "data", extra_args=SERVE_ARGS) as server:
        r = server.cli(*create(server, cephx, "mine", f"{POOL}/{TENANT}", "tenant"))
        assert r.returncode == 0, r.stderr
        server.create_volume(name, MiB, pool="mine")
        async with await NbdClient.connect(server.uri(name)) as c:
            await c.write(0, b"t" * 4096, fua=True)
            assert await c.read(0, 4096) == b"t" * 4096
        server.api.post(f"/api/v1/volumes/{name}/snapshots", {"name": "s1"})
        assert cephx.rbd("ls", f"{POOL}/{TENANT}").split() == [name]
        # Its caps end at its namespace: another one is refused, naming the caps it needs.
        cephx.rbd("namespace", "create", f"{POOL}/elsewhere")
        line = cli_error(server, *create(server, cephx, "theirs", f"{POOL}/elsewhere", "tenant"))
        assert f"client tenant may not use pool '{POOL}', namespace 'elsewhere'" in line, line
        assert f"osd 'profile rbd pool={POOL} namespace=elsewhere'" in line, line
        server.api.delete(f"/api/v1/volumes/{name}")
