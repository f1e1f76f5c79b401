"""Bad input and faults on RBD pools, through a real server: a clear error within seconds,
or EIO/ENOSPC on the affected requests only (counted in /metrics), nothing acknowledged lost,
the server's other pools unaffected.

Each test puts the shared cluster back as it found it (mon and OSD up, no quota).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvirt.cli.client import ApiError
from blockvirt.client import NbdClient, NbdClientError
from blockvirt.nbd.constants import Errno
from blockvirt.testing import BlockvirtServer
from tests.ceph.conftest import unique
from tests.ceph.rbdpool import (
    BV_POOL,
    CONNECT_TIMEOUT,
    OP_TIMEOUT,
    SERVE_ARGS,
    CephView,
    MiB,
    attach,
    cli_error,
    cli_json,
    metric,
    scrape,
    wait_for,
)
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph


def timed_error(server: BlockvirtServer, body: dict[str, object]) -> tuple[ApiError, float]:
    t0 = time.monotonic()
    with pytest.raises(ApiError) as e:
        server.api.post("/api/v1/pools", body)
    return e.value, time.monotonic() - t0


# ---------------------------------------------------------------------------- pool create


def test_pool_create_refusals_are_clear_and_prompt(
    rbd_server: BlockvirtServer, ceph_cluster: CephCluster, module_ceph_pool: str, tmp_path: Path
) -> None:
    conf = str(ceph_cluster.conf_path)

    def refused(rbd: dict[str, object], status: int, words: str, within: float = 1.5) -> None:
        err, took = timed_error(rbd_server, {"name": unique("p"), "rbd": rbd})
        assert err.status == status and words in err.message, (err.status, err.message)
        assert took < within, (words, took)

    refused({"pool": module_ceph_pool, "conf": str(tmp_path / "nope.conf")}, 400, "does not exist")
    garbage = tmp_path / "garbage.conf"
    garbage.write_text("[global\nmon_host = \n")
    refused({"pool": module_ceph_pool, "conf": str(garbage)}, 400, "Ceph config")
    refused({"pool": "no-such-pool", "conf": conf}, 400, "does not exist")
    plain = unique("plain")
    ceph_cluster.create_pool(plain, rbd=False)
    try:
        refused({"pool": plain, "conf": conf}, 400, f"rbd pool init {plain}")
    finally:
        ceph_cluster.delete_pool(plain)
    # A cluster nobody answers for: 503 after the connect timeout, not a hang.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    unreachable = tmp_path / "unreachable.conf"
    unreachable.write_text(f"[global]\nmon_host = 127.0.0.1:{dead}\n")
    t0 = time.monotonic()
    refused(
        {"pool": module_ceph_pool, "conf": str(unreachable)}, 503, "no monitor answered", 3 * CONNECT_TIMEOUT
    )
    print(f"unreachable cluster refused after {time.monotonic() - t0:.2f} s")
    # The same Ceph pool twice on one node.
    refused({"pool": module_ceph_pool, "conf": conf}, 409, "attached already")
    # The request itself.
    refused({"pool": module_ceph_pool, "conf": "ceph.conf"}, 400, "absolute path")
    refused({"pool": module_ceph_pool, "conf": conf, "keyring": "x"}, 400, "unknown field")
    err, _ = timed_error(rbd_server, {"name": "both", "path": str(tmp_path / "d"), "rbd": {"pool": "x"}})
    assert err.status == 400 and "not both" in err.message
    r = rbd_server.cli("pool", "create", "nope", "--path", str(tmp_path / "d"), "--ceph-conf", conf)
    assert r.returncode == 2 and "--rbd" in r.stderr
    # None of it left a pool behind.
    assert sorted(p["name"] for p in cli_json(rbd_server, "pool", "list")) == ["default", BV_POOL]


# ---------------------------------------------------------------------------- names


async def test_a_name_held_by_a_foreign_image_is_refused(
    rbd_server: BlockvirtServer, ceph_cluster: CephCluster, ceph_view: CephView
) -> None:
    # Every blockvirt name is a legal RBD image and snapshot name ([A-Za-z0-9][A-Za-z0-9_.-]{0,63}:
    # RBD refuses only '/' and '@' and the empty name), so the way RBD refuses a name is that
    # something of Ceph's own holds it already.
    foreign = unique("foreign")
    ceph_cluster.rbd("create", "--size", "4M", ceph_view.spec(foreign))
    ceph_cluster.rbd("bench", "--io-type", "write", "--io-total", "64K", ceph_view.spec(foreign))
    msg = cli_error(rbd_server, "volume", "create", foreign, "--size", "1M", "--pool", BV_POOL)
    assert "exists already in the Ceph pool" in msg
    name = unique("v")
    cli_json(rbd_server, "volume", "create", name, "--size", "4M", "--pool", BV_POOL)
    cli_json(rbd_server, "snapshot", "create", name, "s")
    assert "exists already in the Ceph pool" in cli_error(rbd_server, "volume", "clone", f"{name}@s", foreign)
    # A snapshot name an operator took on a blockvirt image with `rbd snap create`.
    ceph_cluster.rbd("snap", "create", ceph_view.spec(name, "backup"))
    msg = cli_error(rbd_server, "snapshot", "create", name, "backup")
    assert "taken" in msg and "backup" in msg, msg
    # The foreign image and snapshot are untouched, and blockvirt does not list them.
    assert foreign in ceph_view.ls() and ceph_view.used(foreign) > 0 and ceph_view.meta(foreign) == {}
    assert ceph_view.snaps(name) == ["s", "backup"]
    assert [s["name"] for s in cli_json(rbd_server, "snapshot", "list", name)] == ["s"]
    assert foreign not in [v["name"] for v in cli_json(rbd_server, "volume", "list")]
    ceph_cluster.rbd("snap", "rm", ceph_view.spec(name, "backup"))
    ceph_cluster.rbd("rm", ceph_view.spec(foreign))
    rbd_server.api.delete(f"/api/v1/volumes/{name}")


async def test_an_image_deleted_behind_our_back(
    tmp_path: Path, ceph_cluster: CephCluster, module_ceph_pool: str
) -> None:
    view = CephView(ceph_cluster, module_ceph_pool)
    with BlockvirtServer(tmp_path / "data", extra_args=SERVE_ARGS) as server:
        attach(server, ceph_cluster, module_ceph_pool, name="gone")
        name = unique("v")
        cli_json(server, "volume", "create", name, "--size", "4M", "--pool", "gone")
        # Not opened by the server yet: nothing watches the image, so `rbd rm` may take it.
        ceph_cluster.rbd("rm", view.spec(name))
        async with await NbdClient.connect(server.uri(name)) as c:
            for _ in range(3):
                with pytest.raises(NbdClientError) as e:
                    await c.read(0, 4096)
                assert e.value.errno == Errno.EIO
            with pytest.raises(NbdClientError) as e:
                await c.write(0, b"x" * 4096)
            assert e.value.errno == Errno.EIO
            text = await asyncio.to_thread(scrape, server)
            assert metric(text, "blockvirt_volume_errors_total", volume=name) == 4
        assert "missing from the Ceph pool" in cli_error(server, "snapshot", "create", name, "s")
        assert "missing from the Ceph pool" in cli_error(server, "volume", "resize", name, "8M")
        assert f"{name}: its RBD image is missing from Ceph pool" in server.log()
        info = cli_json(server, "volume", "info", name)
        assert info["state"] == "failed" and "missing from Ceph pool" in info["error"], info
        # Deleting the volume still works, and forgets it.
        cli_json(server, "volume", "delete", name)
        assert name not in [v["name"] for v in cli_json(server, "volume", "list")]


# ---------------------------------------------------------------------------- the cluster away


@contextlib.contextmanager
def mon_down(ceph: CephCluster) -> Iterator[None]:
    ceph.stop_mon()
    try:
        yield
    finally:
        ceph.start_mon()


async def test_ceph_down_at_start_then_back(
    tmp_path: Path, ceph_cluster: CephCluster, module_ceph_pool: str
) -> None:
    name, local, dropped = unique("v"), unique("f"), unique("d")
    data = os.urandom(65536)
    ns = unique("ns")  # a second blockvirt pool in the same cluster, to be detached while down
    ceph_cluster.rbd("namespace", "create", f"{module_ceph_pool}/{ns}")
    with BlockvirtServer(tmp_path / "data", extra_args=SERVE_ARGS) as server:
        attach(server, ceph_cluster, module_ceph_pool, name="later")
        attach(server, ceph_cluster, f"{module_ceph_pool}/{ns}", name="gone")
        cli_json(server, "volume", "create", name, "--size", "4M", "--pool", "later")
        cli_json(server, "volume", "create", dropped, "--size", "4M", "--pool", "gone")
        server.create_volume(local, 4 * MiB)
        async with await NbdClient.connect(server.uri(name)) as c:
            await c.write(0, data, fua=True)
        async with await NbdClient.connect(server.uri(dropped)) as c:
            await c.write(0, data[::-1], fua=True)

    server: BlockvirtServer | None = None
    try:
        with mon_down(ceph_cluster):
            t0 = time.monotonic()
            server = BlockvirtServer(tmp_path / "data", extra_args=SERVE_ARGS).start()
            started = time.monotonic() - t0
            print(f"started in {started:.2f} s with the mon down")
            assert started < CONNECT_TIMEOUT + 8
            # The file pool serves; the RBD pool says why it cannot.
            async with await NbdClient.connect(server.uri(local)) as c:
                await c.write(0, b"f" * 4096, fua=True)
                assert await c.read(0, 4096) == b"f" * 4096
            info = cli_json(server, "pool", "info", "later")
            assert "no monitor answered" in info["error"], info
            assert info["state"] == "critical" and any("unreachable" in w for w in info["warnings"])
            assert info["capacity"] is None
            assert "unreachable" in server.cli("pool", "info", "later").stdout
            assert "cannot be reached" in cli_error(
                server, "volume", "create", unique("v"), "--size", "1M", "--pool", "later"
            )
            # Its volumes' names stay taken: no file volume may take one meanwhile (it would
            # hide the RBD volume once the pool is back), and their exports say why they
            # cannot be served.
            assert f"volume '{name}' exists in pool 'later', which cannot be reached now" in cli_error(
                server, "volume", "create", name, "--size", "1M"
            )
            with pytest.raises(NbdClientError, match="unavailable"):
                await NbdClient.connect(server.uri(name))
            assert "cannot be reached now" in server.log()
            # Listed by name, as unavailable; asked for, it says why.
            [listed] = [v for v in cli_json(server, "volume", "list") if v["name"] == name]
            assert (listed["pool"], listed["state"], listed["size"]) == ("later", "unavailable", None), listed
            assert "unavailable" in server.cli("volume", "list").stdout
            assert "in pool 'later', which cannot be reached now" in cli_error(server, "volume", "info", name)
            # Its volumes are counted as last seen; it cannot be seen to be empty, so it is
            # detached only when asked to be (Ceph keeps the volume).
            info = cli_json(server, "pool", "info", "gone")
            assert info["volumes"] == 1 and "1 volume(s) as last seen" in " ".join(info["warnings"])
            refused = cli_error(server, "pool", "delete", "gone")
            assert f"when last reached it held volumes {dropped}" in refused and "--force" in refused
            cli_json(server, "pool", "delete", "gone", "--force")
            assert dropped not in [v["name"] for v in cli_json(server, "volume", "list")]
        # The backend retries: the pool comes back by itself once the mon is up again.
        t0 = time.monotonic()
        wait_for("the pool to come back", lambda: "error" not in cli_json(server, "pool", "info", "later"))
        print(f"pool back {time.monotonic() - t0:.2f} s after the mon")
        async with await NbdClient.connect(server.uri(name)) as c:
            assert await c.read(0, 65536) == data
            await c.write(65536, b"n" * 4096)
        assert name in [v["name"] for v in cli_json(server, "volume", "list")]
        # The detached pool, attached again, brings its volume back as it was.
        attach(server, ceph_cluster, f"{module_ceph_pool}/{ns}", name="gone")
        async with await NbdClient.connect(server.uri(dropped)) as c:
            assert await c.read(0, 65536) == data[::-1]
        server.api.delete(f"/api/v1/volumes/{dropped}")
        server.api.delete("/api/v1/pools/gone")
        server.api.delete(f"/api/v1/volumes/{name}")
        server.api.delete(f"/api/v1/volumes/{local}")
    finally:
        if server is not None:
            server.stop()


@contextlib.contextmanager
def osd_gone(ceph: CephCluster, how: str) -> Iterator[None]:
    if how == "stop":
        ceph.stop_osd()
    else:
        ceph.freeze_osd()  # alive to TCP, answers nothing: a hung node
    try:
        yield
    finally:
        if how == "stop":
            ceph.start_osd()
        else:
            ceph.thaw_osd()


async def test_a_migration_whose_rbd_target_goes_away(
    rbd_server: BlockvirtServer, ceph_cluster: CephCluster
) -> None:
    """A file volume migrating to an RBD pool whose OSD stops under the copy: the initiator
    writing to it waits at most about the mirror wait (1 s) for any write, where each write
    to a chunk already copied waited for Ceph's op timeout before. The job gives up, the
    volume stays in its file pool with every write, and once the OSD is back a migration
    goes through."""
    name = unique("m")
    size, block = 32 * MiB, 4096
    blocklisted_before = set(ceph_cluster.blocklist_ls())  # other tests' fencing
    rbd_server.create_volume(name, size)
    model: dict[int, bytes] = {}
    rng = random.Random(4)
    async with await NbdClient.connect(rbd_server.uri(name)) as c:
        for off in range(0, size, MiB):  # data for the pass to copy: it takes 8 s at 4 MB/s
            await c.write(off, bytes([off // MiB + 1]) * MiB)
        await c.flush()
        job = cli_json(rbd_server, "migrate", name, "--pool", BV_POOL, "--bps-limit", "4M")
        stopped_at: list[float] = []
        slowest = 0.0
        writes = 0

        async def writer(until: asyncio.Event) -> None:
            nonlocal slowest, writes
            while not until.is_set():
                blk = rng.randrange(size // block)
                data = os.urandom(block)
                t0 = time.monotonic()
                await c.write(blk * block, data)
                took = time.monotonic() - t0
                model[blk] = data
                writes += 1
                if stopped_at and t0 > stopped_at[0]:
                    slowest = max(slowest, took)
                await asyncio.sleep(0.01)

        def state() -> str:
            st: str = rbd_server.api.get(f"/api/v1/jobs/{job['id']}")["state"]
            return st

        until = asyncio.Event()
        writing = asyncio.ensure_future(writer(until))
        try:
            await asyncio.sleep(2.0)  # the pass is copying; changes to copied chunks are mirrored
            assert await asyncio.to_thread(state) == "running"
            stopped_at.append(time.monotonic())
            await asyncio.to_thread(ceph_cluster.stop_osd)
            try:
                deadline = time.monotonic() + 60
                while await asyncio.to_thread(state) == "running":
                    assert time.monotonic() < deadline, "the migration neither failed nor finished"
                    await asyncio.sleep(0.5)
                gave_up = time.monotonic() - stopped_at[0]
                until.set()
                await writing
            finally:
                await asyncio.to_thread(ceph_cluster.start_osd)
        finally:
            until.set()
            writing.cancel()
        print(f"target away: {writes} writes, slowest after stop {slowest:.3f} s; job ended in {gave_up:.1f}")
        assert await asyncio.to_thread(state) == "failed"
        assert slowest < 1.8, slowest
        info = cli_json(rbd_server, "volume", "info", name)
        assert info["pool"] == "default", info

        async def check() -> None:
            for blk, data in model.items():
                assert await c.read(blk * block, block) == data, blk

        await check()
        # Back: the same migration goes through once the copy left by the first attempt is
        # removed (its stale watch lasts about 30 s after the OSD is back: the delete waits).
        r = await asyncio.to_thread(rbd_server.cli, "migrate", name, "--pool", BV_POOL, "--wait", timeout=120)
        assert r.returncode == 0, r.stderr
        # Its copy was closed while the OSD was away and kept that handle's lock: released,
        # not broken (librbd's remove would have blocklisted this node's own client).
        assert set(ceph_cluster.blocklist_ls()) <= blocklisted_before
        assert "by a handle of this client that is gone" in rbd_server.log_path.read_text()
        assert cli_json(rbd_server, "volume", "info", name)["pool"] == BV_POOL
        await check()
    rbd_server.api.delete(f"/api/v1/volumes/{name}")


@pytest.mark.parametrize("how", ["stop", "freeze"])
async def test_osd_going_away_under_io(
    how: str, rbd_server: BlockvirtServer, ceph_cluster: CephCluster
) -> None:
    name, local = unique("v"), unique("f")
    cli_json(rbd_server, "volume", "create", name, "--size", "16M", "--pool", BV_POOL)
    rbd_server.create_volume(local, 16 * MiB)
    acked = os.urandom(MiB)
    async with (
        await NbdClient.connect(rbd_server.uri(name)) as c,
        await NbdClient.connect(rbd_server.uri(local)) as other,
    ):
        await c.write(0, acked)
        await c.flush()
        with osd_gone(ceph_cluster, how):
            t0 = time.monotonic()
            ops = [c.write(2 * MiB + i * 65536, b"w" * 65536) for i in range(8)]
            # Reads of data (unallocated objects read as zeros from the object map, which the
            # client holds: those need no OSD).
            ops += [c.read(i * 65536, 65536) for i in range(8)]
            pending = asyncio.gather(*ops, return_exceptions=True)
            # The file volume is served meanwhile, promptly.
            worst = 0.0
            n = 0
            while not pending.done():
                t = time.monotonic()
                await other.write((n % 256) * 4096, b"o" * 4096, fua=True)
                assert await other.read((n % 256) * 4096, 4096) == b"o" * 4096
                worst = max(worst, time.monotonic() - t)
                n += 1
            results = await pending
            took = time.monotonic() - t0
            print(f"{how}: 16 requests failed after {took:.2f} s (op timeout {OP_TIMEOUT:g} s); "
                  f"{n} file-volume round trips meanwhile, worst {worst * 1000:.1f} ms")  # fmt: skip
            for r in results:
                assert isinstance(r, NbdClientError) and r.errno == Errno.EIO, r
            assert OP_TIMEOUT - 0.5 < took < OP_TIMEOUT + 3
            assert n > 20 and worst < 0.5
            text = await asyncio.to_thread(scrape, rbd_server)
            assert metric(text, "blockvirt_volume_errors_total", volume=name) == 16
            assert metric(text, "blockvirt_volume_errors_total", volume=local) == 0

            # The node's own row says its heartbeats fail, and since when they did not.
            def me() -> dict[str, Any]:
                [pool] = [p for p in rbd_server.api.get("/api/v1/nodes")["pools"] if p["pool"] == BV_POOL]
                [row] = [n for n in pool["nodes"] if n["me"]]
                return row  # type: ignore[no-any-return]

            failing = await asyncio.to_thread(
                wait_for, "the heartbeat to fail", lambda: me() if me()["heartbeat_error"] else None
            )
            assert "timed out" in failing["heartbeat_error"] and failing["heartbeat_age"] > 1.0, failing
            assert "heartbeats failing" in rbd_server.cli("node", "list").stdout
        await asyncio.to_thread(wait_for, "a heartbeat again", lambda: me()["heartbeat_error"] is None)
        assert me()["heartbeat_age"] < 5.0
        # Back: the same session carries on, and nothing acknowledged was lost.
        await c.write(2 * MiB, b"b" * 65536, fua=True)
        assert await c.read(2 * MiB, 65536) == b"b" * 65536
        assert await c.read(0, MiB) == acked
    rbd_server.api.delete(f"/api/v1/volumes/{name}")
    rbd_server.api.delete(f"/api/v1/volumes/{local}")


async def test_stop_while_the_cluster_is_away(
    tmp_path: Path, ceph_cluster: CephCluster, module_ceph_pool: str
) -> None:
    """A node stopped while its cluster does not answer ends within its shutdown deadline.
    Before, each step of the stop (an API request under way, the in-flight writes' flush,
    leaving the member list, the catalog's watch) waited out the op timeout in turn: a
    minute and more at the default 30 s."""
    name = unique("v")
    deadline = 2.0
    args = (*SERVE_ARGS, "--ceph-op-timeout", "30", "--shutdown-deadline", f"{deadline:g}")
    acked = os.urandom(MiB)
    server = BlockvirtServer(tmp_path / "data", extra_args=args, log_level="info").start()
    try:
        attach(server, ceph_cluster, module_ceph_pool, name="away")
        cli_json(server, "volume", "create", name, "--size", "8M", "--pool", "away")
        c = await NbdClient.connect(server.uri(name))
        try:
            await c.write(0, acked)
            await c.flush()
            with osd_gone(ceph_cluster, "stop"):
                # Writes that will not be answered while the OSD is away: in flight at the stop.
                pending = asyncio.gather(
                    *(c.write(2 * MiB + i * 65536, b"w" * 65536) for i in range(4)), return_exceptions=True
                )
                # And an API request that waits on the cluster (30 s, the op timeout).
                asking = asyncio.ensure_future(asyncio.to_thread(server.cli, "snapshot", "create", name, "s"))
                await asyncio.sleep(0.5)
                t0 = time.monotonic()
                rc = await asyncio.to_thread(server.stop, 60.0)
                took = time.monotonic() - t0
                print(f"stopped in {took:.2f} s (deadline {deadline:g} s, op timeout 30 s), exit {rc}")
                for r in await pending:  # cut off by the stop, never acknowledged
                    assert isinstance(r, Exception), r
                log = server.log_path.read_text()
                assert rc == 0
                assert (await asking).returncode != 0  # cut off by the stop: never acknowledged
                # Sessions, API requests, the flushes, the pool: one deadline each at most.
                assert took < 4 * deadline + 3, took
                assert "flush of" in log and f"did not finish within {deadline:g} s" in log
                assert "its Ceph cluster did not answer within" in log
                assert "Traceback" not in log and "Exception ignored" not in log
        finally:
            await c.close()
        # Back: the node starts again as itself (its key stayed in the member list) and
        # finds what was acknowledged before the cluster went away.
        server.start()
        async with await NbdClient.connect(server.uri(name)) as c2:
            assert await c2.read(0, MiB) == acked
        server.api.delete(f"/api/v1/volumes/{name}")
        # An empty pool deleted while its cluster is away: detached at once, its client
        # closing in the background (before, the delete waited out two op timeouts).
        with osd_gone(ceph_cluster, "stop"):
            t0 = time.monotonic()
            server.api.delete("/api/v1/pools/away")
            took = time.monotonic() - t0
            print(f"pool delete with the OSD away: {took:.2f} s")
            assert took < deadline + 2, took
            assert "away" not in [p["name"] for p in cli_json(server, "pool", "list")]
            assert "its client closes in the background" in server.log_path.read_text()
    finally:
        server.stop()


async def test_snapshot_delete_while_the_mon_is_away(
    tmp_path: Path, ceph_cluster: CephCluster, module_ceph_pool: str
) -> None:
    """Removing an RBD snapshot waits on the mon, and librbd can lose that request to a mon
    restart: the call never returned, and its volume manager's lock held every later
    snapshot, create and resize of every pool (file pools too) until the node was killed.
    Now such a call fails after three op timeouts with a clear error; the delete is finished
    by running it again. While it waits, only its own pool's edits wait: file pools' edits
    go on at once (each RBD pool has its own edit lock)."""
    name, local = unique("v"), unique("f")
    server = BlockvirtServer(tmp_path / "data", extra_args=SERVE_ARGS, log_level="info").start()
    try:
        attach(server, ceph_cluster, module_ceph_pool, name="snaps")
        cli_json(server, "volume", "create", name, "--size", "8M", "--pool", "snaps")
        server.create_volume(local, 4 * MiB)
        cli_json(server, "snapshot", "create", name, "s1")
        with mon_down(ceph_cluster):
            t0 = time.monotonic()
            deleting = asyncio.ensure_future(asyncio.to_thread(server.cli, "snapshot", "delete", name, "s1"))
            await asyncio.sleep(1.0)  # the delete holds its pool's edit lock by now
            assert not deleting.done()
            # Every kind of edit of a file pool, while the RBD pool's delete waits on Ceph.
            edits: list[tuple[str, float]] = []
            for what, args in (
                ("create", ("volume", "create", f"{local}-2", "--size", "4M")),
                ("snapshot", ("snapshot", "create", local, "f1")),
                ("resize", ("volume", "resize", local, "8M")),
                ("clone", ("volume", "clone", f"{local}@f1", f"{local}-c")),
                ("delete", ("volume", "delete", f"{local}-2")),
            ):
                e0 = time.monotonic()
                await asyncio.to_thread(cli_json, server, *args)
                edits.append((what, time.monotonic() - e0))
            assert not deleting.done(), "the RBD delete ended before the file edits were timed"
            timed = ", ".join(f"{w} {t:.2f} s" for w, t in edits)
            print(f"file pool edits while an RBD pool's edit waits: {timed}")
            assert all(t < 2 for _, t in edits), edits
            r = await asyncio.wait_for(deleting, 60)
            took = time.monotonic() - t0
            print(f"snapshot delete with the mon away: {took:.2f} s: {r.stderr.strip()}")
            assert r.returncode == 1 and "Traceback" not in r.stderr
            assert "no answer from the cluster" in r.stderr and "run the delete again" in r.stderr
            assert took < 3 * OP_TIMEOUT + 5, took

        # Back: running the delete again finishes it, whatever Ceph did meanwhile.
        def listed() -> list[str] | None:
            r = server.cli("snapshot", "list", name, "--json")
            if r.returncode != 0:  # the RBD snapshot went once the mon was back
                assert "its delete was cut short" in r.stderr, r.stderr
                return ["s1"]
            return [s["name"] for s in json.loads(r.stdout)]

        assert wait_for("the pool to answer", listed) == ["s1"]
        cli_json(server, "snapshot", "delete", name, "s1")
        assert listed() == []
        cli_json(server, "snapshot", "create", name, "s2")
        assert listed() == ["s2"]
        server.api.delete(f"/api/v1/volumes/{name}")
        server.api.delete(f"/api/v1/volumes/{local}-c")
        server.api.delete(f"/api/v1/volumes/{local}")
        server.api.delete("/api/v1/pools/snaps")
        t0 = time.monotonic()
        assert server.stop(30) == 0
        assert time.monotonic() - t0 < 15
    finally:
        server.stop()


# ---------------------------------------------------------------------------- full


async def test_quota_full_pool(
    rbd_server: BlockvirtServer, ceph_cluster: CephCluster, module_ceph_pool: str
) -> None:
    ceph_cluster.wait_for_stats()
    name, local = unique("v"), unique("f")
    cli_json(rbd_server, "volume", "create", name, "--size", "128M", "--pool", BV_POOL)
    cli_json(rbd_server, "snapshot", "create", name, "before")
    rbd_server.create_volume(local, 4 * MiB)
    stored = int(
        next(p for p in ceph_cluster.ceph_json("df")["pools"] if p["name"] == module_ceph_pool)["stats"][
            "stored"
        ]
    )
    ceph_cluster.set_pool_quota(module_ceph_pool, stored + 12 * MiB)
    written: dict[int, bytes] = {}
    try:
        async with await NbdClient.connect(rbd_server.uri(name)) as c:
            # Write 4 MiB objects until the quota trips (the mgr reports usage a second or
            # two behind, so a few writes past the quota still land).
            error: NbdClientError | None = None
            t0 = time.monotonic()
            for i in range(32):  # room for a slow mgr: it trips after 6-7 here
                chunk = os.urandom(4 * MiB)
                try:
                    await c.write(i * 4 * MiB, chunk)
                except NbdClientError as e:
                    error = e
                    break
                written[i] = chunk
                await asyncio.sleep(0.5)
            assert error is not None and error.errno == Errno.ENOSPC, error
            print(f"quota tripped after {len(written)} writes, {time.monotonic() - t0:.1f} s")
            # Reads of what was written work, and so does the file pool.
            for i, chunk in written.items():
                assert await c.read(i * 4 * MiB, 4 * MiB) == chunk
            async with await NbdClient.connect(rbd_server.uri(local)) as other:
                await other.write(0, b"l" * 4096, fua=True)
            info = cli_json(rbd_server, "pool", "info", BV_POOL)
            assert info["capacity"] == stored + 12 * MiB
            # Clear errors for what needs new space.
            msg = cli_error(rbd_server, "volume", "create", unique("v"), "--size", "4M", "--pool", BV_POOL)
            assert "full" in msg, msg
            msg = cli_error(rbd_server, "snapshot", "create", name, "after")
            assert "full" in msg, msg
            text = await asyncio.to_thread(scrape, rbd_server)
            assert (metric(text, "blockvirt_volume_errors_total", volume=name) or 0) >= 1
        # Space given back: deleting works on a full pool.
        cli_json(rbd_server, "snapshot", "delete", name, "before")
    finally:
        ceph_cluster.set_pool_quota(module_ceph_pool, 0)
    async with await NbdClient.connect(rbd_server.uri(name)) as c:

        async def writes_again() -> bool:
            try:
                await c.write(124 * MiB, b"again" * 800)  # a new object: needs space
                return True
            except NbdClientError:
                await asyncio.sleep(0.5)
                return False

        deadline = time.monotonic() + 20
        while not await writes_again():
            assert time.monotonic() < deadline, "writes did not resume after the quota was lifted"
        for i, chunk in written.items():
            assert await c.read(i * 4 * MiB, 4 * MiB) == chunk
    rbd_server.api.delete(f"/api/v1/volumes/{name}")
    rbd_server.api.delete(f"/api/v1/volumes/{local}")
