"""Connection limits and timeouts against a real server: floods beyond the limits are refused
at once while a good client keeps working; slow-loris clients (stalled in the handshake,
inside a request header, inside a WRITE payload) are cut by the timeouts without stalling
anyone else; memory does not follow the lengths clients declare."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockvirt.client import NbdClient, NbdClientError
from blockvirt.testing import BlockvirtServer

MiB = 1 << 20
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513


def scrape(server: BlockvirtServer) -> str:
    with urllib.request.urlopen(server.api_url + "/metrics", timeout=30) as resp:
        return resp.read().decode()


def counter(server: BlockvirtServer, name: str, label: str, value: str) -> float:
    m = re.search(rf'^{name}\{{{label}="{value}"\}} (\S+)$', scrape(server), re.M)
    return float(m.group(1)) if m else 0.0


def connect(server: BlockvirtServer, local: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((server.nbd_host, server.nbd_port), timeout=10, source_address=(local, 0))


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            raise ConnectionError("closed")
        buf += d
    return buf


def greeted(server: BlockvirtServer, local: str = "127.0.0.1") -> socket.socket:
    s = connect(server, local)
    assert len(recv_exact(s, 18)) == 18
    return s


def in_transmission(server: BlockvirtServer, export: str) -> socket.socket:
    """A raw connection that sent GO and is in transmission (simple replies)."""
    s = greeted(server)
    s.sendall(struct.pack(">I", 3))
    name = export.encode()
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, 6 + len(name)) + struct.pack(">I", len(name)) + name + b"\0\0")
    while True:  # replies up to the ACK
        _magic, _opt, rep, length = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, length)
        if rep == 1:
            return s
        assert rep == 3, hex(rep)


def closed_within(s: socket.socket, seconds: float) -> float:
    """Wait until the server closes `s` (EOF or reset); returns how long it took."""
    start = time.monotonic()
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {seconds}s") from None
    return time.monotonic() - start


def refused_at_once(s: socket.socket) -> bool:
    """True if the server closed without sending the greeting."""
    s.settimeout(5)
    try:
        return s.recv(18) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


async def good_client_works(server: BlockvirtServer, export: str, local: str = "127.0.0.1") -> None:
    async with await NbdClient.connect(server.uri(export), local_host=local) as c:
        await c.write(4096, b"still served")
        assert await c.read(4096, 12) == b"still served"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------- connection limits


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockvirtServer]:
    args = ("--max-connections", "12", "--max-connections-per-address", "4")
    with BlockvirtServer(tmp_path_factory.mktemp("limits") / "data", extra_args=args, log_level="info") as s:
        s.create_volume("vol", 4 * MiB)
        yield s


async def test_per_address_flood_is_refused_while_others_are_served(limited: BlockvirtServer) -> None:
    before = counter(limited, "blockvirt_connections_refused_total", "reason", "max_per_address")
    held = [greeted(limited) for _ in range(4)]  # the allowance of 127.0.0.1
    try:
        flood = [connect(limited) for _ in range(60)]
        try:
            assert all(refused_at_once(s) for s in flood)
        finally:
            for s in flood:
                s.close()
        # Another address is not affected...
        await good_client_works(limited, "vol", "127.0.0.2")
        # ... and the held connections still work (they can go on to negotiate).
        held[0].sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 3, 0))
        assert struct.unpack(">QIII", recv_exact(held[0], 20))[2] in (1, 2)
        after = counter(limited, "blockvirt_connections_refused_total", "reason", "max_per_address")
        assert after - before == 60
    finally:
        for s in held:
            s.close()
    # Once they are gone, 127.0.0.1 is served again.
    for _ in range(50):
        try:
            await good_client_works(limited, "vol")
            break
        except Exception:
            await asyncio.sleep(0.05)
    else:
        await good_client_works(limited, "vol")
    assert "connection from 127.0.0.1" in limited.log() and "refused: max per address" in limited.log()


async def test_total_limit(limited: BlockvirtServer) -> None:
    before = counter(limited, "blockvirt_connections_refused_total", "reason", "max_connections")
    held = [greeted(limited, f"127.0.0.{1 + i // 4}") for i in range(12)]  # 3 addresses x 4
    try:
        s = connect(limited, "127.0.0.9")
        assert refused_at_once(s)
        s.close()
        assert (
            counter(limited, "blockvirt_connections_refused_total", "reason", "max_connections") == before + 1
        )
        held.pop().close()
        await asyncio.sleep(0.2)
        await good_client_works(limited, "vol", "127.0.0.9")
    finally:
        for s in held:
            s.close()


# ---------------------------------------------------------------- timeouts (slow loris)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockvirtServer]:
    args = ("--handshake-timeout", "1", "--request-timeout", "1")
    with BlockvirtServer(tmp_path_factory.mktemp("strict") / "data", extra_args=args, log_level="info") as s:
        s.create_volume("vol", 4 * MiB)
        yield s


async def _cut_while_others_work(server: BlockvirtServer, s: socket.socket, phase: str) -> None:
    before = counter(server, "blockvirt_connections_timed_out_total", "phase", phase)
    loop = asyncio.get_running_loop()
    waited = loop.run_in_executor(None, closed_within, s, 6.0)
    # While the stalled client waits to be cut, another is served normally, repeatedly.
    t0 = time.monotonic()
    while not waited.done():
        await good_client_works(server, "vol")
        await asyncio.sleep(0.1)
    took = await waited
    assert 0.8 <= took <= 4.0, took
    assert time.monotonic() - t0 >= 0.8
    assert counter(server, "blockvirt_connections_timed_out_total", "phase", phase) == before + 1


async def test_partial_greeting_response_is_cut(strict: BlockvirtServer) -> None:
    s = greeted(strict)
    s.sendall(b"\0\0")  # 2 of the 4 client-flag bytes
    await _cut_while_others_work(strict, s, "handshake")
    s.close()


async def test_partial_option_is_cut(strict: BlockvirtServer) -> None:
    s = greeted(strict)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 100) + b"\0" * 10)
    await _cut_while_others_work(strict, s, "handshake")
    s.close()


async def test_partial_request_header_is_cut(strict: BlockvirtServer) -> None:
    s = in_transmission(strict, "vol")
    time.sleep(1.5)  # idle with nothing half-sent is fine (no idle timeout by default)
    s.sendall(struct.pack(">IHH", REQUEST_MAGIC, 0, 0))  # 8 of 28 header bytes
    await _cut_while_others_work(strict, s, "request")
    s.close()


async def test_trickled_request_header_is_cut_too(strict: BlockvirtServer) -> None:
    """A deadline, not an inactivity timer: a byte every 0.3 s does not keep it alive."""
    s = in_transmission(strict, "vol")
    header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 1, 0, 512)
    start = time.monotonic()
    with contextlib.suppress(OSError):
        for b in header:
            s.sendall(bytes([b]))
            time.sleep(0.3)
    took = closed_within(s, 6.0) + (time.monotonic() - start)
    assert took < 5.0
    s.close()


async def test_partial_write_payload_is_cut(strict: BlockvirtServer) -> None:
    s = in_transmission(strict, "vol")
    s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, 7, 0, MiB) + b"x" * 1000)
    await _cut_while_others_work(strict, s, "request")
    s.close()


async def test_a_complete_request_is_never_cut(strict: BlockvirtServer) -> None:
    """Requests that keep arriving in full are not affected, however long the session lasts."""
    async with await NbdClient.connect(strict.uri("vol")) as c:
        for i in range(15):
            await c.write(i * 4096, bytes([i]) * 4096)
            await asyncio.sleep(0.1)
        assert await c.read(14 * 4096, 4096) == bytes([14]) * 4096


async def test_idle_timeout(tmp_path: Path) -> None:
    with BlockvirtServer(tmp_path / "data", extra_args=("--idle-timeout", "1")) as server:
        server.create_volume("vol", MiB)
        async with await NbdClient.connect(server.uri("vol")) as c:
            await c.write(0, b"before idling")
            await asyncio.sleep(2.5)
            with pytest.raises(NbdClientError, match=r"closed|Connection"):
                await c.read(0, 4)
        # The write made before the cut was flushed and is there for the next client.
        async with await NbdClient.connect(server.uri("vol")) as c:
            assert await c.read(0, 13) == b"before idling"
        assert counter(server, "blockvirt_connections_timed_out_total", "phase", "idle") == 1


def test_bad_limit_flags_are_usage_errors(tmp_path: Path) -> None:
    for args in (("--max-connections", "0"), ("--idle-timeout", "-1"), ("--max-inflight-bytes", "lots")):
        server = BlockvirtServer(tmp_path / "data", extra_args=args)
        with pytest.raises(RuntimeError, match="exited with 2"):
            server.start()


# ---------------------------------------------------------------- memory


def test_memory_does_not_follow_declared_lengths(tmp_path: Path) -> None:
    """40 clients each declare a 64 MiB WRITE (and options of 64 KiB), send a little, stall:
    the server holds about what arrived, not what was declared (40 x 64 MiB = 2.5 GiB)."""
    args = ("--request-timeout", "30", "--handshake-timeout", "30")
    with BlockvirtServer(tmp_path / "data", extra_args=args) as server:
        server.create_volume("vol", 128 * MiB)
        assert server.proc is not None
        asyncio.run(good_client_works(server, "vol"))
        base = rss_bytes(server.proc.pid)
        socks = []
        try:
            for i in range(40):
                s = in_transmission(server, "vol")
                s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, i, 0, 64 * MiB) + b"y" * 65536)
                socks.append(s)
            for _ in range(40):
                s = greeted(server, "127.0.0.3")
                s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 65536) + b"\0" * 1000)
                socks.append(s)
            time.sleep(1.0)
            grown = rss_bytes(server.proc.pid) - base
            # A stalled WRITE holds its payload buffer (grown 1 MiB at a time as data comes)
            # and a 256 KiB receive buffer; a stalled handshake only its receive buffer.
            assert grown < 40 * 2 * MiB + 40 * MiB // 2, f"RSS grew by {grown / MiB:.0f} MiB"
            asyncio.run(good_client_works(server, "vol", "127.0.0.4"))
        finally:
            for s in socks:
                s.close()
