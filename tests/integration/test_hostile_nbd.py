"""Hostile NBD clients against a real server process: option floods in the handshake and
pipelined large READs from clients that never read their replies. What is asserted is what
other clients see (API latency, handshake latency) and what the process holds (RSS)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

MiB = 1 << 20
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
OPT_LIST = 3


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            raise ConnectionError("closed")
        buf += d
    return buf


def greeted(server: BlockvirtServer, local: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection((server.nbd_host, server.nbd_port), timeout=10, source_address=(local, 0))
    assert len(recv_exact(s, 18)) == 18
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    return s


def health_latency(server: BlockvirtServer) -> float:
    t0 = time.monotonic()
    with urllib.request.urlopen(server.api_url + "/api/v1/health", timeout=60) as resp:
        assert resp.status == 200
    return time.monotonic() - t0


async def handshake_latency(server: BlockvirtServer, export: str) -> float:
    t0 = time.monotonic()
    async with await NbdClient.connect(server.uri(export)) as c:
        took = time.monotonic() - t0
        assert await c.read(0, 512) == bytes(512)
    return took


@pytest.fixture(scope="module")
def many_exports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockvirtServer]:
    """100 volumes with a snapshot each: 200 exports, as in the report."""
    with BlockvirtServer(tmp_path_factory.mktemp("flood") / "data") as s:
        api = s.api
        for i in range(100):
            api.post("/api/v1/volumes", {"name": f"v{i:03d}", "size": MiB})
            api.post(f"/api/v1/volumes/v{i:03d}/snapshots", {"name": "s"})
        yield s


def _flood(server: BlockvirtServer, options: int, stop: threading.Event, read: bool, out: list[str]) -> None:
    s = greeted(server)
    s.settimeout(60)
    try:
        s.sendall(struct.pack(">QII", IHAVEOPT, OPT_LIST, 0) * options)
        while read and not stop.is_set():
            if not s.recv(1 << 20):
                out.append("closed")
                break
        stop.wait(30)
    except OSError as e:
        out.append(f"closed: {e}")
    finally:
        s.close()


@pytest.mark.slow
@pytest.mark.parametrize("reads_replies", [False, True], ids=["never-reads", "reads"])
def test_list_flood_does_not_stall_others(many_exports: BlockvirtServer, reads_replies: bool) -> None:
    """10,000 pipelined LIST options on one unauthenticated connection: the API and other
    clients' handshakes stay fast, and the server does not buffer the replies."""
    server = many_exports
    assert server.proc is not None
    asyncio.run(handshake_latency(server, "v000"))
    base = rss_bytes(server.proc.pid)
    stop = threading.Event()
    flood_end: list[str] = []
    t = threading.Thread(target=_flood, args=(server, 10_000, stop, reads_replies, flood_end), daemon=True)
    t.start()
    try:
        time.sleep(0.3)  # the flood is being parsed
        worst_health = max(health_latency(server) for _ in range(5))
        worst_handshake = max(asyncio.run(handshake_latency(server, f"v{i:03d}@s")) for i in range(5))
        grown = rss_bytes(server.proc.pid) - base
    finally:
        stop.set()
        t.join(60)
    print(
        f"health {worst_health * 1000:.0f} ms, handshake {worst_handshake * 1000:.0f} ms, "
        f"RSS +{grown / MiB:.0f} MiB"
    )
    assert worst_health < 0.5, f"health took {worst_health:.2f}s"
    assert worst_handshake < 1.0, f"handshake took {worst_handshake:.2f}s"
    assert grown < 32 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
    if reads_replies:  # a client that reads is cut at the option limits
        assert flood_end and flood_end[0].startswith("closed"), flood_end
