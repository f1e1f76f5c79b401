"""Fencing, never split-brain: a node frozen (SIGSTOP) while it serves a volume with writes in
flight and queued is presumed dead, another node takes the volume over (breaking its lock,
which blocklists the frozen node's Ceph client) and writes; when the frozen node resumes, not
one of its writes lands, it tells its clients, logs and counts it, and comes back with a
fresh Ceph client without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from blockvirt.client import NbdClient, NbdClientError
from tests.cluster.conftest import Cluster, MiB
from tests.cluster.oracle import BLOCK, content, decode
from tests.promql import value

pytestmark = [pytest.mark.ceph, pytest.mark.slow]

BLOCKS = 256  # the region both nodes write: 1 MiB
#: Version ranges, so that a block read back tells who wrote it and when.
BEFORE, INFLIGHT, QUEUED, TAKEOVER = 1, 1_000, 100_000, 200_000


async def wait_for(what: str, ready: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def read_blocks(c: NbdClient) -> list[tuple[int, int] | None]:
    data = await asyncio.wait_for(c.read(0, BLOCKS * BLOCK), 10)
    return [decode(data[i * BLOCK : (i + 1) * BLOCK]) for i in range(BLOCKS)]


async def test_a_frozen_owner_is_fenced_and_none_of_its_writes_land(cluster2: Cluster) -> None:
    a, b = cluster2.nodes
    a.create_volume("zv", 4 * MiB)
    await asyncio.to_thread(cluster2.wait_catalog, "zv")

    zombie_client = await NbdClient.connect(a.uri("zv"))
    for blk in range(BLOCKS):
        await zombie_client.write(blk * BLOCK, content(blk, BEFORE + 0))
    await zombie_client.flush()
    await asyncio.to_thread(cluster2.wait_owner, "zv", "node-a", via=b)

    # Writes in flight when A freezes: 16 at a time over the region, until they stop coming back.
    inflight_acked: set[int] = set()
    stop = asyncio.Event()

    async def hammer() -> None:
        v = INFLIGHT
        while not stop.is_set():
            batch = []
            for blk in range(0, BLOCKS, BLOCKS // 16):
                v += 1
                batch.append((blk, v))

            async def one(blk: int, v: int) -> None:
                await zombie_client.write(blk * BLOCK, content(blk, v))
                inflight_acked.add(v)

            await asyncio.gather(*(one(blk, v) for blk, v in batch))

    hammering = asyncio.ensure_future(hammer())
    await wait_for("writes flowing", lambda: len(inflight_acked) > 200, 20)
    frozen = await asyncio.to_thread(a.freeze)
    stop.set()
    # Queued: sent to the frozen node, in its socket buffers; it must never carry them out.
    queued = [
        asyncio.ensure_future(zombie_client.write(blk * BLOCK, content(blk, QUEUED + blk)))
        for blk in range(BLOCKS)
    ]
    try:
        dead = await asyncio.to_thread(cluster2.wait_presumed_dead, a, by=b)
        # B takes the volume over at its first request: read the region (what it holds at the
        # takeover), then overwrite the even blocks. The client tries the frozen A first: A's
        # kernel accepts the connection, A never greets; the client gives up on it and goes on.
        async with await NbdClient.connect(a.uri("zv"), fallbacks=(b.uri("zv"),), attempt_timeout=1.0) as c:
            peer = c._link.writer.get_extra_info("peername")
            assert f"{peer[0]}:{peer[1]}" == b.nbd
            at_takeover = await read_blocks(c)
            for blk in range(0, BLOCKS, 2):
                await c.write(blk * BLOCK, content(blk, TAKEOVER + blk))
            await c.flush()
        assert all(x is not None and x[0] == i for i, x in enumerate(at_takeover))
        assert not [x for x in at_takeover if x is not None and x[1] >= QUEUED], "a queued write landed"
        took_over = time.monotonic()
        assert cluster2.owner("zv", via=b) == "node-b"

        thawed = await asyncio.to_thread(a.thaw)
        # The zombie tells its client: every request it holds fails or the connection drops,
        # none is acknowledged.
        outcomes = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 15)
        told = time.monotonic() - thawed
        acked = [i for i, r in enumerate(outcomes) if not isinstance(r, BaseException)]
        assert acked == [], f"the fenced node acknowledged queued writes to blocks {acked[:10]}"
        assert all(isinstance(r, NbdClientError | ConnectionError) for r in outcomes), outcomes[:3]
        with contextlib.suppress(asyncio.TimeoutError, NbdClientError, ConnectionError):
            await asyncio.wait_for(hammering, 5)
    finally:
        if a.frozen:
            await asyncio.to_thread(a.thaw)
        stop.set()
        hammering.cancel()
        await zombie_client.close()

    # Not one of the zombie's writes landed after the takeover: the even blocks hold B's
    # writes, the odd ones what B read when it took over.
    await asyncio.sleep(1.0)  # anything the zombie still had in librbd would have landed now
    async with await NbdClient.connect(b.uri("zv")) as c:
        now = await read_blocks(c)
    for blk in range(BLOCKS):
        want = (blk, TAKEOVER + blk) if blk % 2 == 0 else at_takeover[blk]
        assert now[blk] == want, f"block {blk}: {now[blk]}, not {want}: a write landed after the takeover"

    # The zombie noticed: it logged it, counted it, and is back with a fresh Ceph client (same
    # process), alive in B's eyes.
    assert a.server.proc is not None
    assert a.running, f"node A ended (exit {a.server.proc.returncode}) after the thaw:\n{a.log()[-6000:]}"
    await asyncio.to_thread(cluster2.wait_alive, a, by=b)
    log = a.log()
    assert "fenced" in log, log[-3000:]
    text = a.metrics()
    assert value(text, "blockvirt_cluster_fenced_total", pool="cp") == 1
    assert (value(text, "blockvirt_cluster_ownership_changes_total", pool="cp", change="lost") or 0) >= 1
    # ...and it serves a volume again when asked: zv moves back to it.
    await asyncio.to_thread(b.api.post, "/api/v1/volumes/zv/move", {"node": "node-a"})
    async with await NbdClient.connect(a.uri("zv")) as c:
        assert await read_blocks(c) == now
        await c.write(0, content(0, 999_999), fua=True)
        assert decode(await c.read(0, BLOCK)) == (0, 999_999)
    print(
        f"zombie: frozen {took_over - frozen:.1f} s (presumed dead after {dead:.1f} s), "
        f"{len(queued)} queued writes all refused within {told:.2f} s of the thaw, none landed"
    )
