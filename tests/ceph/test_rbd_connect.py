"""Connecting: clear, prompt errors for each way a configuration can be wrong."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from blockvirt.storage.backends.rbd.cluster import CephConfig, CephConnection
from blockvirt.storage.backends.rbd.errors import CephError
from tests.ceph.conftest import unique
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph


async def connect_error(config: CephConfig) -> tuple[CephError, float]:
    t0 = time.monotonic()
    with pytest.raises(CephError) as info:
        await CephConnection.open(config)
    return info.value, time.monotonic() - t0


async def test_missing_config_file(tmp_path: Path) -> None:
    err, took = await connect_error(CephConfig(pool="p", conf_file=str(tmp_path / "nope.conf")))
    assert err.kind == "bad-config" and "nope.conf" in str(err)
    assert took < 1


async def test_unparsable_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global\nmon_host = \n")
    err, took = await connect_error(CephConfig(pool="p", conf_file=str(conf)))
    assert err.kind == "bad-config"
    assert took < 1


async def test_bad_client_option(ceph_config: CephConfig) -> None:
    err, _ = await connect_error(replace(ceph_config, options={"rados_osd_op_timeout": "soon"}))
    assert err.kind == "bad-config" and "rados_osd_op_timeout" in str(err)


async def test_unreachable_monitor_fails_within_the_connect_timeout() -> None:
    # A port nobody listens on: the client hunts, then gives up after client_mount_timeout.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err, took = await connect_error(
        CephConfig(pool="p", mon_host=f"127.0.0.1:{port}", connect_timeout=2, mon_op_timeout=2)
    )
    assert err.kind == "unreachable", err
    assert 1.5 < took < 5, took


async def test_missing_pool(ceph_config: CephConfig) -> None:
    err, took = await connect_error(replace(ceph_config, pool="no-such-pool"))
    assert err.kind == "no-pool" and "no-such-pool" in str(err)
    assert took < 3


async def test_pool_not_initialised_for_rbd(ceph_cluster: CephCluster, ceph_config: CephConfig) -> None:
    name = unique("raw")
    ceph_cluster.create_pool(name, rbd=False)
    try:
        err, took = await connect_error(replace(ceph_config, pool=name))
        assert err.kind == "not-rbd-pool" and f"rbd pool init {name}" in str(err)
        assert took < 3
        # Plain RADOS use (an omap catalog, say) may still want such a pool.
        async with CephConnection(replace(ceph_config, pool=name, require_rbd=False)) as c:
            assert c.connected
    finally:
        ceph_cluster.delete_pool(name)


async def test_identity_and_reconnect(conn: CephConnection, ceph_cluster: CephCluster) -> None:
    first_id, first_addr = conn.instance_id(), conn.client_address()
    assert first_id > 0 and first_addr.startswith("127.0.0.1:")
    generation = conn.generation
    await conn.reconnect()
    assert conn.generation == generation + 1
    assert conn.instance_id() != first_id and conn.client_address() != first_addr
    assert not conn.fenced
    # mon commands go through the same client and its timeouts.
    pools = await conn.mon_command("osd pool ls")
    assert conn.config.pool in pools


async def test_control_calls_use_the_connections_own_threads(conn: CephConnection) -> None:
    names = await asyncio.gather(*(conn.run(lambda: threading.current_thread().name) for _ in range(4)))
    assert all(n.startswith("ceph-ctl-") for n in names)


async def test_closed_connection_says_so(ceph_config: CephConfig) -> None:
    c = await CephConnection.open(ceph_config)
    await c.close()
    await c.close()  # idempotent
    with pytest.raises(CephError) as info:
        await c.run(lambda: None)
    assert info.value.kind == "closed"
