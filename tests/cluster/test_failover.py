"""Failover: the node serving a volume dies (kill -9) and another node serves it within 15 s,
with every acknowledged write intact, as seen by blockvirt's own client with fallbacks, fio
with crc32c verify, and qemu-io reconnecting through a floating address."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.cluster.clients import QemuIo, fio, fio_args, need
from tests.cluster.conftest import Cluster, MiB
from tests.cluster.floating import FloatingAddress
from tests.cluster.oracle import Oracle, Writer, read_region

pytestmark = [pytest.mark.ceph, pytest.mark.interop, pytest.mark.slow]

#: The issue's promise: another node serves the volume within this long of the failure.
FAILOVER_BOUND = 15.0


async def wait_for(what: str, ready: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_kill9_of_the_owner_under_writes(cluster2: Cluster, tmp_path: Path) -> None:
    need("fio", "qemu-io")
    a, b = cluster2.nodes
    a.create_volume("ov", 8 * MiB)  # the oracle writer's
    a.create_volume("fv", 16 * MiB)  # fio's
    a.create_volume("qv", 4 * MiB)  # qemu-io's
    await asyncio.to_thread(cluster2.wait_catalog, "qv")

    # fio's write phase on node A (it ends with the writes flushed).
    await asyncio.to_thread(fio, [*fio_args(a.uri("fv"), "4M"), "--do_verify=0", "--end_fsync=1"], tmp_path)

    # qemu-io through a floating address that points at A, reconnecting for up to 60 s.
    vip = await FloatingAddress((a.server.nbd_host, a.server.nbd_port)).start()
    qemu = QemuIo(
        f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={vip.host},"
        f"file.server.port={vip.port},file.export=qv,file.reconnect-delay=60"
    )
    oracle = Oracle(blocks=2048)
    writer = Writer(cluster2.uris("ov", first=a), oracle)
    task = asyncio.ensure_future(writer.run())
    try:
        await qemu.start()
        out = await qemu.run("write -P 0x5a 0 1M")
        assert "wrote 1048576/1048576" in out, out
        await qemu.run("flush")
        await wait_for("the writer's first 200 acknowledgements", lambda: len(writer.acks) >= 200, 30)
        await asyncio.to_thread(cluster2.wait_owner, "ov", "node-a", via=b)

        killed = await asyncio.to_thread(a.kill)
        vip.move((b.server.nbd_host, b.server.nbd_port))  # as keepalived would
        # qemu-io's connection goes with A: its next write waits while qemu reconnects to the
        # same address by itself (reconnect-delay), now leading to B.
        qemu_done: list[float] = []
        qemu_write = asyncio.ensure_future(qemu.run("write -P 0xa5 1M 1M", timeout=90))
        qemu_write.add_done_callback(lambda _: qemu_done.append(time.monotonic()))
        await wait_for("a request served after the kill", lambda: writer.first_served_after(killed), 30)
        first = writer.first_served_after(killed)
        assert first is not None
        failover = first - killed
        assert failover < FAILOVER_BOUND, f"the volume was served again {failover:.1f} s after the kill"
        # Let it write on B for a while, then check everything it was told is durable.
        target = len(writer.acks) + 200
        await wait_for("200 more acknowledgements", lambda: len(writer.acks) >= target, 30)
        writer.stop.set()
        await asyncio.wait_for(task, 30)
        assert writer.reconnects[-1][1] == b.nbd, writer.reconnects
        assert cluster2.owner("ov", via=b) == "node-b"
        image = await read_region([b.uri("ov")], oracle.blocks)
        assert oracle.check(image, "after failover") == []

        out = await qemu_write
        assert "wrote 1048576/1048576" in out, out
        qemu_failover = qemu_done[0] - killed
        assert qemu_failover < FAILOVER_BOUND + 10, qemu_failover  # its backoff adds seconds
        out = await qemu.run("read -P 0x5a 0 1M")
        assert "read 1048576/1048576" in out and "failed" not in out, out
        out = await qemu.run("read -P 0xa5 1M 1M")
        assert "read 1048576/1048576" in out and "failed" not in out, out
    finally:
        writer.stop.set()
        if not task.done():
            task.cancel()
        await qemu.close()
        await vip.close()
    print(f"failover: blockvirt's client {failover:.2f} s, qemu-io {qemu_failover:.2f} s after the kill")

    # fio's verify phase, against node B: every block fio wrote on A checks out.
    await asyncio.to_thread(fio, [*fio_args(b.uri("fv"), "4M"), "--verify_only=1"], tmp_path)
