"""A real `blockvirt serve` process on 127.0.0.1, driven by our asyncio NbdClient."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from blockvirt.client import NbdClient, NbdClientError
from blockvirt.nbd import wire
from blockvirt.nbd.connection import ClientConnection
from blockvirt.nbd.constants import Cmd, Errno
from blockvirt.nbd.events import OptionResult
from blockvirt.nbd.transmission import ClientTransmission
from blockvirt.testing import BlockvirtServer

MiB = 1 << 20
#: Generous bound on how long anything here may take before we call it a hang (not a benchmark).
HANG = 30.0


def pattern(i: int, size: int = 4096) -> bytes:
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


async def connect(server: BlockvirtServer, name: str = "vol", **kw: object) -> NbdClient:
    return await asyncio.wait_for(NbdClient.connect(server.uri(name), **kw), HANG)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def client(server: BlockvirtServer, name: str = "vol") -> AsyncIterator[NbdClient]:
    c = await connect(server, name)
    try:
        yield c
    finally:
        await c.close()


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


class RawLink:
    """A hand-driven connection: handshake through the codec, then raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = ClientConnection()
        self.tx: ClientTransmission | None = None

    @classmethod
    async def open(cls, server: BlockvirtServer, name: str = "vol", *, structured: bool = False) -> RawLink:
        reader, writer = await asyncio.open_connection(server.nbd_host, server.nbd_port)
        link = cls(reader, writer)
        hs = link.conn.handshake
        while not hs.greeted:
            link.conn.receive_data(await reader.read(65536))
            hs.next_event()
        writer.write(hs.data_to_send())
        if structured:
            hs.send_option(8)
            writer.write(hs.data_to_send())
            await link._result()
        hs.go(name)
        writer.write(hs.data_to_send())
        res = await link._result()
        assert res.reply == 1, res
        link.tx = link.conn.start_transmission(structured)
        return link

    async def _result(self) -> OptionResult:
        while True:
            ev = self.conn.handshake.next_event()
            if ev is not None:
                return ev
            data = await asyncio.wait_for(self.reader.read(65536), HANG)
            assert data, "server closed during handshake"
            self.conn.receive_data(data)

    def abort(self) -> None:
        self.writer.transport.abort()


async def wait_connections(server: BlockvirtServer, name: str, n: int) -> None:
    """Poll the API until the volume has `n` connections (a hang guard, not a timing check)."""
    for _ in range(int(HANG / 0.05)):
        info = await asyncio.to_thread(server.api.get, f"/api/v1/volumes/{name}")
        if info["connections"] == n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} still has {info['connections']} connections, expected {n}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BlockvirtServer]:
    with BlockvirtServer(tmp_path / "data") as s:
        s.create_volume("vol", 64 * MiB)
        yield s


# ---------------------------------------------------------------- one connection, many requests


async def test_many_concurrent_requests_on_one_connection(server: BlockvirtServer) -> None:
    n = 300
    async with client(server) as c:
        sizes = [512 * (1 + i % 200) for i in range(n)]  # small (inline) and larger (tasks)
        offsets = [i * 128 * 1024 for i in range(n)]
        writes = [c.write(o, pattern(i, s)) for i, (o, s) in enumerate(zip(offsets, sizes, strict=True))]
        await asyncio.wait_for(asyncio.gather(*writes), HANG)
        assert c.tx.in_flight == 0
        got = await asyncio.wait_for(
            asyncio.gather(*(c.read(o, s) for o, s in zip(offsets, sizes, strict=True))), HANG
        )
        for i, data in enumerate(got):
            assert data == pattern(i, sizes[i]), f"request {i}"
        # mixed kinds in flight at once, errors included
        results = await asyncio.wait_for(
            asyncio.gather(
                c.flush(),
                c.zero(0, 4096),
                c.trim(MiB, MiB),
                c.read(64 * MiB - 1, 2),  # past the end: EINVAL, the rest unaffected
                c.block_status(0, 64 * MiB),
                c.read(offsets[5], sizes[5]),
                return_exceptions=True,
            ),
            HANG,
        )
        assert isinstance(results[3], NbdClientError) and results[3].errno == Errno.EINVAL
        assert results[5] == pattern(5, sizes[5])
        assert not any(isinstance(r, BaseException) for i, r in enumerate(results) if i != 3)
        assert await c.read(0, 4096) == bytes(4096)


# ---------------------------------------------------------------- durability across restarts


async def test_data_flushed_on_disconnect_survives_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with BlockvirtServer(data_dir) as s:
        s.create_volume("vol", 16 * MiB)
        c = await connect(s)
        blobs = {i: os.urandom(8192 + i) for i in range(0, 16, 3)}
        for i, b in blobs.items():
            await c.write(i * MiB, b)  # never flushed by the client
        await c.close()
        await wait_connections(s, "vol", 0)
        assert s.stop() == 0
    with BlockvirtServer(data_dir) as s2:
        async with client(s2) as c2:
            for i, b in blobs.items():
                assert await c2.read(i * MiB, len(b)) == b


async def test_sigkill_after_flush_keeps_flushed_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    s = BlockvirtServer(data_dir).start()
    try:
        s.create_volume("vol", 16 * MiB)
        c = await connect(s)
        flushed = os.urandom(MiB)
        await c.write(0, flushed)
        await c.zero(2 * MiB, MiB)
        await c.flush()
        s.kill()  # a crash: no graceful shutdown at all
        with contextlib.suppress(NbdClientError, ConnectionError):
            await c.close()
    finally:
        s.stop()
    with BlockvirtServer(data_dir) as s2:
        async with client(s2) as c2:
            assert await c2.read(0, MiB) == flushed
            assert await c2.read(2 * MiB, MiB) == bytes(MiB)
        info = s2.api.get("/api/v1/volumes/vol")
        assert info["size"] == 16 * MiB


async def test_sigterm_while_writing_keeps_acknowledged_writes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    s = BlockvirtServer(data_dir).start()
    acked: dict[int, bytes] = {}
    cut_off = 0
    blocks = 65536  # 4 KiB blocks of a 256 MiB volume, each written at most once
    try:
        s.create_volume("vol", 256 * MiB)
        c = await connect(s)

        async def writer(start: int) -> None:
            nonlocal cut_off
            for i in range(start, blocks, 4):
                block = pattern(i)
                try:
                    await asyncio.wait_for(c.write(i * 4096, block), HANG)
                except (NbdClientError, ConnectionError, OSError):
                    cut_off += 1
                    return
                acked[i] = block

        writers = [asyncio.ensure_future(writer(k)) for k in range(4)]
        while len(acked) < 200:
            await asyncio.sleep(0.01)
            assert not all(w.done() for w in writers)
        rc = await asyncio.to_thread(s.stop)  # SIGTERM while the writers keep going
        assert rc == 0, s.log()
        await asyncio.wait_for(asyncio.gather(*writers), HANG)
        assert cut_off > 0  # the shutdown really interrupted the writers
        # after the server went away, requests fail at once instead of hanging
        with pytest.raises(NbdClientError):
            await asyncio.wait_for(c.read(0, 4096), HANG)
        with contextlib.suppress(NbdClientError, ConnectionError):
            await c.close()
    finally:
        s.stop()
    assert len(acked) >= 200
    with BlockvirtServer(data_dir) as s2:
        async with client(s2) as c2:
            for i, block in acked.items():
                assert await c2.read(i * 4096, 4096) == block, f"acknowledged write {i} lost"


# ---------------------------------------------------------------- misbehaving clients


async def test_client_vanishing_mid_request_does_not_stall_others(server: BlockvirtServer) -> None:
    async with client(server) as good:
        await good.write(0, b"before" * 100)
        # a WRITE header promising 1 MiB, half the payload, then the socket is gone
        bad = await RawLink.open(server)
        assert bad.tx is not None
        _, out = bad.tx.request(Cmd.WRITE, 4 * MiB, data=bytes(MiB))
        bad.writer.write(out[0] + out[1][: MiB // 2])
        await bad.writer.drain()
        # a second one dies with only part of a request header sent
        bad2 = await RawLink.open(server)
        bad2.writer.write(wire.request(Cmd.READ, 0, 1, 0, 4096)[:13])
        await bad2.writer.drain()
        await wait_connections(server, "vol", 3)
        bad.abort()
        bad2.writer.close()
        for i in range(20):
            await good.write(i * 4096, pattern(i))
            assert await good.read(i * 4096, 4096) == pattern(i)
        await wait_connections(server, "vol", 1)
        # the half-sent write was never applied
        assert await good.read(4 * MiB, 4096) == bytes(4096)


async def test_client_not_reading_replies_does_not_stall_others(server: BlockvirtServer) -> None:
    assert server.proc is not None
    async with client(server) as good:
        await good.write(0, os.urandom(4 * MiB))
        await good.flush()
        lazy = await RawLink.open(server)
        assert lazy.tx is not None
        n, size = 1000, MiB  # 1 GiB of replies nobody reads
        blob = b"".join(b"".join(lazy.tx.request(Cmd.READ, 0, size)[1]) for _ in range(n))
        lazy.writer.write(blob)  # not drained: the server stops reading at some point
        await asyncio.sleep(0.5)
        for i in range(50):
            await asyncio.wait_for(good.write(8 * MiB + i * 4096, pattern(i)), HANG)
            assert await asyncio.wait_for(good.read(8 * MiB + i * 4096, 4096), HANG) == pattern(i)
        # replies waiting for the lazy client are bounded, not 1 GiB
        assert rss_mib(server.proc.pid) < 512, f"server RSS {rss_mib(server.proc.pid)} MiB"
        # once it reads, every reply arrives, in full
        expected = await good.read(0, size)
        got = 0
        while got < n:
            lazy.tx.receive_data(await asyncio.wait_for(lazy.reader.read(4 * MiB), HANG))
            while (ev := lazy.tx.next_event()) is not None:
                assert ev.error == 0 and ev.data == expected
                got += 1
        lazy.writer.close()
        await wait_connections(server, "vol", 1)


async def test_garbage_after_handshake_closes_only_that_connection(server: BlockvirtServer) -> None:
    async with client(server) as good:
        bad = await RawLink.open(server)
        bad.writer.write(b"\xde\xad\xbe\xef" * 16)
        assert await asyncio.wait_for(bad.reader.read(), HANG) == b""  # hard disconnect
        bad.writer.close()
        await good.write(0, b"still fine")
        assert await good.read(0, 10) == b"still fine"


# ---------------------------------------------------------------- several connections


async def test_read_your_writes_across_connections_after_flush(server: BlockvirtServer) -> None:
    async with client(server) as a, client(server) as b:
        assert a.export.can_multi_conn
        data = os.urandom(256 * 1024)
        await a.write(MiB, data)
        await a.flush()
        assert await b.read(MiB, len(data)) == data
        data2 = os.urandom(4096)
        await b.write(3 * MiB, data2, fua=True)
        assert await a.read(3 * MiB, len(data2)) == data2
        await b.zero(MiB, 4096)
        await b.flush()
        assert await a.read(MiB, 4096) == bytes(4096)
        info = server.api.get("/api/v1/volumes/vol")
        assert info["connections"] == 2


async def test_block_status_and_holes_over_the_wire(server: BlockvirtServer) -> None:
    async with client(server) as c:
        await c.write(MiB, b"\x01" * MiB)
        await c.flush()
        status = await c.block_status(0, 4 * MiB)
        ext = status["base:allocation"]
        assert [(e.length, e.flags) for e in ext][:2] == [(MiB, 3), (MiB, 0)]
        one = await c.block_status(0, 4 * MiB, req_one=True)
        assert [(e.length, e.flags) for e in one["base:allocation"]] == [(MiB, 3)]
        reply = await c.request(Cmd.READ, 0, 2 * MiB)
        assert reply.data == bytes(MiB) + b"\x01" * MiB
        assert ("hole", 0, MiB) in reply.chunks
        await c.trim(MiB, MiB)
        status = await c.block_status(0, 4 * MiB)
        assert [(e.length, e.flags) for e in status["base:allocation"]] == [(4 * MiB, 3)]


async def test_simple_replies_client(server: BlockvirtServer) -> None:
    c = await connect(server, structured=False)
    try:
        await c.write(0, b"simple")
        assert await c.read(0, 6) == b"simple"
        with pytest.raises(NbdClientError) as e:
            await c.block_status(0, 4096)
        assert e.value.errno == Errno.EINVAL
    finally:
        await c.close()


async def test_unknown_export_is_refused(server: BlockvirtServer) -> None:
    with pytest.raises(NbdClientError) as e:
        await connect(server, "nope")
    assert e.value.reply == (1 << 31) + 6  # ERR_UNKNOWN
