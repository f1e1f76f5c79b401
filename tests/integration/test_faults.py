"""Failing and slow devices (serve --fault-injection): EIO fails only the request it hits and
is counted; a failed commit marks the volume failed (writes refused, reads served) until it is
reset; a slow pool never stalls volumes in other pools; a client vanishing in the middle of a
WRITE payload changes nothing. (ENOSPC on a full pool: test_enospc.py.)"""

from __future__ import annotations

import asyncio
import socket
import statistics
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvirt.cli.client import ApiError
from blockvirt.client import NbdClient, NbdClientError
from blockvirt.nbd.constants import Errno
from blockvirt.testing import BlockvirtServer

MiB = 1 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BlockvirtServer]:
    with BlockvirtServer(tmp_path / "data", log_level="info", extra_args=("--fault-injection",)) as s:
        s.api.post("/api/v1/pools", {"name": "bad", "path": str(tmp_path / "bad")})
        yield s


def fault(server: BlockvirtServer, **rule: Any) -> dict[str, Any]:
    out: dict[str, Any] = server.api.request("PUT", "/api/v1/debug/faults", {"pool": "bad", **rule})
    return out


def metric(server: BlockvirtServer, line_start: str) -> float:
    import urllib.request

    with urllib.request.urlopen(server.api_url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start} in /metrics")


async def test_eio_fails_only_the_request(server: BlockvirtServer) -> None:
    server.create_volume("v", 4 * MiB, pool="bad")
    server.create_volume("w", 4 * MiB)
    async with await NbdClient.connect(server.uri("v")) as v, await NbdClient.connect(server.uri("w")) as w:
        await v.write(0, b"v" * 8192)
        await v.flush()
        fault(server, error="EIO", ops=["read"], count=3)
        codes = []
        for _ in range(5):
            try:
                assert await v.read(0, 4096) == b"v" * 4096
                codes.append(0)
            except NbdClientError as e:
                codes.append(e.errno)
        assert codes == [Errno.EIO] * 3 + [0, 0]  # then the device behaves; the connection stayed up
        assert await w.read(0, 4096) == bytes(4096)  # the other pool never noticed
        await v.write(4096, b"x" * 4096)
    assert server.api.get("/api/v1/volumes/v/stats")["errors"] == 3
    assert server.api.get("/api/v1/volumes/v")["state"] == "ok"
    assert server.api.get("/api/v1/debug/faults")["faults"][0]["injected"] == 3


async def test_failed_commit_marks_the_volume_failed_until_reset(server: BlockvirtServer) -> None:
    uri = server.create_volume("f", 4 * MiB, pool="bad")
    async with await NbdClient.connect(uri) as c:
        await c.write(0, b"safe" * 1024)
        await c.flush()  # durable
        await c.write(4096, b"lost" * 1024)
        fault(server, error="EIO", ops=["sync"])
        with pytest.raises(NbdClientError) as ei:
            await c.flush()
        assert ei.value.errno == Errno.EIO
        info = server.api.get("/api/v1/volumes/f")
        assert info["state"] == "failed" and "commit failed" in info["error"]
        with pytest.raises(NbdClientError):
            await c.write(8192, b"more" * 1024)  # refused: nothing can be promised any more
        assert await c.read(0, 4096) == b"safe" * 1024  # reads are still served
    assert metric(server, 'blockvirt_volume_failed{volume="f"}') == 1
    r = server.cli("volume", "info", "f")
    assert "state:       failed" in r.stdout
    server.api.delete("/api/v1/debug/faults/bad")
    info = server.api.post("/api/v1/volumes/f/reset", {})
    assert info["state"] == "ok" and info["error"] is None
    async with await NbdClient.connect(uri) as c:
        assert await c.read(0, 4096) == b"safe" * 1024
        await c.write(8192, b"again" * 800)
        await c.flush()
    assert metric(server, 'blockvirt_volume_failed{volume="f"}') == 0


def test_reset_needs_no_clients_and_bad_rules(server: BlockvirtServer) -> None:
    for bad in ({"error": "EWHAT"}, {"ops": ["eat"]}, {"rate": 2}, {}, {"delay_ms": -1}, {"x": 1}):
        with pytest.raises(ApiError) as ei:
            fault(server, **bad)
        assert ei.value.status == 400
    with pytest.raises(ApiError) as ei:
        server.api.request("PUT", "/api/v1/debug/faults", {"pool": "nope", "error": "EIO"})
    assert ei.value.status == 404


def test_fault_endpoints_are_off_by_default(tmp_path: Path) -> None:
    with BlockvirtServer(tmp_path / "plain") as s:
        with pytest.raises(ApiError) as ei:
            s.api.get("/api/v1/debug/faults")
        assert ei.value.status == 404 and "fault injection is off" in ei.value.message


async def test_slow_pool_never_stalls_other_volumes(server: BlockvirtServer) -> None:
    server.create_volume("slow", 16 * MiB, pool="bad")
    server.create_volume("fast", 16 * MiB)
    async with await NbdClient.connect(server.uri("slow")) as s:
        await s.write(0, b"s" * MiB)
    fault(server, delay_ms=50, ops=["read", "write", "sync"])  # a device taking 50 ms per operation
    stop = asyncio.Event()

    async def hammer() -> int:
        """64 requests outstanding on the slow volume, all the time."""
        n = 0
        async with await NbdClient.connect(server.uri("slow")) as c:

            async def one(i: int) -> None:
                nonlocal n
                while not stop.is_set():
                    if i % 2:
                        await c.read((i % 256) * 4096, 4096)
                    else:
                        await c.write((i % 256) * 4096, b"h" * 4096)
                    n += 1

            await asyncio.gather(*(one(i) for i in range(64)))
        return n

    task = asyncio.ensure_future(hammer())
    await asyncio.sleep(0.5)  # the slow pool's threads are all busy now
    lat = []
    async with await NbdClient.connect(server.uri("fast")) as f:
        for i in range(200):
            t0 = time.perf_counter()
            await f.write(i * 4096, b"f" * 4096, fua=True)  # FUA: a blocking write, in threads
            assert await f.read(i * 4096, 4096) == b"f" * 4096
            lat.append(time.perf_counter() - t0)
        await f.flush()
    stop.set()
    slow_done = await task
    assert slow_done > 0
    lat.sort()
    # The fast volume never waited for the slow device (one operation there takes 50 ms).
    assert lat[int(0.99 * len(lat))] < 0.025, (statistics.median(lat), lat[-5:])
    lag_p99 = metric(server, 'blockvirt_event_loop_lag_seconds_bucket{le="0.025"}')
    lag_all = metric(server, "blockvirt_event_loop_lag_seconds_count")
    assert lag_p99 >= 0.99 * lag_all  # the event loop itself was never held 25 ms


async def test_client_vanishing_mid_write_payload(server: BlockvirtServer) -> None:
    uri = server.create_volume("van", 4 * MiB)
    async with await NbdClient.connect(uri) as c:
        await c.write(0, b"o" * MiB)
        await c.flush()
    for _ in range(3):
        sock = socket.create_connection((server.nbd_host, server.nbd_port))
        sock.settimeout(10)
        sock.recv(18)
        sock.sendall(struct.pack(">I", 1))
        sock.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 3) + b"van")
        got = b""
        while len(got) < 134:
            got += sock.recv(134 - len(got))
        # WRITE of 1 MiB at 0, half the payload, then gone.
        sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 0, MiB) + b"N" * (MiB // 2))
        sock.close()
    await asyncio.sleep(0.3)
    async with await NbdClient.connect(uri) as c:
        assert await c.read(0, MiB) == b"o" * MiB  # nothing of the torn request landed
    assert server.api.get("/api/v1/volumes/van")["connections"] == 0


async def test_second_signal_forces_exit(server: BlockvirtServer) -> None:
    """SIGTERM waits for in-flight requests (here stuck on a device taking 3 s per operation);
    a second signal ends the process at once."""
    import signal

    uri = server.create_volume("stuck", 4 * MiB, pool="bad")
    fault(server, delay_ms=3000, ops=["write", "sync"])
    c = await NbdClient.connect(uri)
    writes = [asyncio.ensure_future(c.write(i * 4096, b"z" * 4096, fua=True)) for i in range(4)]
    await asyncio.sleep(0.5)
    assert server.proc is not None
    proc = server.proc
    proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert proc.poll() is None  # still draining
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = await asyncio.to_thread(proc.wait, 10)
    assert time.monotonic() - t0 < 2.0 and rc == 1
    for w in writes:
        w.cancel()
    await asyncio.gather(*writes, return_exceptions=True)
    await c.close()
    server.stop()


async def test_an_edit_right_after_a_client_left_waits_for_its_last_flush(server: BlockvirtServer) -> None:
    """A client writes without FLUSH and disconnects: the server flushes for it (slow here).
    A delete meanwhile waits for that flush instead of refusing a client that is gone; a
    client still connected is refused at once."""
    uri = server.create_volume("leaving", 4 * MiB, pool="bad")
    fault(server, ops=["sync"], delay_ms=800)
    async with await NbdClient.connect(uri) as c:
        await c.write(0, b"x" * 4096)
        with pytest.raises(ApiError, match="has 1 connected client"):
            server.api.delete("/api/v1/volumes/leaving")
    t0 = time.monotonic()
    server.api.delete("/api/v1/volumes/leaving")  # waits for the server's flush, then deletes
    assert time.monotonic() - t0 >= 0.5
    assert "leaving" not in [v["name"] for v in server.api.get("/api/v1/volumes")["volumes"]]
