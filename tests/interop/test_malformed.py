"""Malformed and hostile input on raw sockets. Whatever one client does, the server must answer
as the spec says (close, or an error reply and carry on), and a client connected at the same
time must keep working."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from blockvirt.client import NbdClient, NbdClientError
from blockvirt.testing import BlockvirtServer

from .conftest import (
    CMD_READ,
    CMD_WRITE,
    EINVAL,
    ENOSPC,
    ERR_INVALID,
    ERR_UNKNOWN,
    ERR_UNSUP,
    IHAVEOPT,
    OPT_GO,
    OPT_INFO,
    REP_ACK,
    REQUEST_MAGIC,
    KiB,
    MiB,
    RawNbd,
    raw_session,
    volume_info,
)

pytestmark = pytest.mark.interop

SIZE = 16 * MiB
CMD_WRITE_ZEROES = 6


class Bystander:
    """A well-behaved client connected throughout; check() proves it still works."""

    def __init__(self, server: BlockvirtServer) -> None:
        self.server = server
        self.conn = raw_session(server, "vol")
        self.blocks: dict[int, bytes] = {}
        self.check()

    def check(self) -> None:
        off = (8 * MiB) + len(self.blocks) * 4 * KiB
        data = os.urandom(4 * KiB)
        assert self.conn.write(off, data) == 0
        self.blocks[off] = data
        for o, d in self.blocks.items():
            assert self.conn.read(o, len(d)) == (0, d)

    def server_is_healthy(self) -> None:
        """The bystander works, a new client works, and the bad session is gone."""
        assert self.server.proc is not None and self.server.proc.poll() is None, self.server.log()
        self.check()
        with raw_session(self.server, "vol") as fresh:
            assert fresh.read(0, 512)[0] == 0
        deadline = time.monotonic() + 10
        while (n := volume_info(self.server, "vol")["connections"]) != 1:
            assert time.monotonic() < deadline, f"{n} sessions on vol, expected only the bystander"
            time.sleep(0.1)


@pytest.fixture
def bystander(blockvirt_server: BlockvirtServer) -> Iterator[Bystander]:
    blockvirt_server.create_volume("vol", SIZE)
    b = Bystander(blockvirt_server)
    try:
        yield b
    finally:
        b.conn.close()


# ---------------------------------------------------------------- handshake: server must close
def _bad_client_flags(server: BlockvirtServer) -> RawNbd:
    return RawNbd(server, cflags=0x3 | 0x4)


def _unknown_high_client_flag(server: BlockvirtServer) -> RawNbd:
    return RawNbd(server, cflags=0x80000001)


def _garbage_option_magic(server: BlockvirtServer) -> RawNbd:
    c = RawNbd(server)
    c.send(struct.pack(">QII", 0x0123456789ABCDEF, OPT_GO, 0))
    return c


def _absurd_option_length(server: BlockvirtServer) -> RawNbd:
    c = RawNbd(server)
    c.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 0xFFFFFFF0))  # and no payload follows
    return c


def _bad_request_magic(server: BlockvirtServer) -> RawNbd:
    c = raw_session(server, "vol")
    c.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_READ, 1, 0, 512))
    return c


@pytest.mark.parametrize(
    "provoke",
    [
        _bad_client_flags,
        _unknown_high_client_flag,
        _garbage_option_magic,
        _absurd_option_length,
        _bad_request_magic,
    ],
)
def test_server_closes(bystander: Bystander, provoke: Callable[[BlockvirtServer], RawNbd]) -> None:
    with provoke(bystander.server) as c:
        c.assert_closed()
    bystander.server_is_healthy()


# ---------------------------------------------------------------- handshake: refuse, keep haggling
def test_unknown_option_is_unsupported_then_go_works(bystander: Bystander) -> None:
    with RawNbd(bystander.server) as c:
        c.option(0x4242, b"junkdata")
        opt, rep, _ = c.option_reply()
        assert (opt, rep) == (0x4242, ERR_UNSUP)
        c.option(0x7654321, b"\0\0\0\0")  # what nbd-tester-client sends
        assert c.option_reply()[:2] == (0x7654321, ERR_UNSUP)
        assert c.go("vol") == (REP_ACK, SIZE)
        off, data = next(iter(bystander.blocks.items()))
        assert c.read(off, len(data)) == (0, data)
    bystander.server_is_healthy()


def test_info_name_longer_than_option_is_invalid(bystander: Bystander) -> None:
    with RawNbd(bystander.server) as c:
        c.option(OPT_INFO, struct.pack(">I", 1000) + b"vol" + b"\0\0")
        rep, _ = c.final_reply(OPT_INFO)
        assert rep == ERR_INVALID
        assert c.go("vol", OPT_INFO) == (REP_ACK, SIZE)
        assert c.go("vol") == (REP_ACK, SIZE)
        assert c.read(0, 4096)[0] == 0
    bystander.server_is_healthy()


def test_go_unknown_export_then_good_export(bystander: Bystander) -> None:
    with RawNbd(bystander.server) as c:
        assert c.go("no-such-volume") == (ERR_UNKNOWN, -1)
        assert c.go("no-such-volume", OPT_INFO) == (ERR_UNKNOWN, -1)
        assert c.go("vol") == (REP_ACK, SIZE)
        off, data = next(iter(bystander.blocks.items()))
        assert c.read(off, len(data)) == (0, data)
    bystander.server_is_healthy()


# ---------------------------------------------------------------- transmission: errors, carry on
def test_out_of_range_read_is_einval_and_session_continues(bystander: Bystander) -> None:
    with raw_session(bystander.server, "vol") as c:
        for off, length in ((SIZE, 512), (SIZE - 256, 512), (1 << 62, 4096), (SIZE + 4096, 1)):
            assert c.read(off, length) == (EINVAL, b""), (off, length)
            off0, data = next(iter(bystander.blocks.items()))
            assert c.read(off0, len(data)) == (0, data)
    bystander.server_is_healthy()


async def test_out_of_range_read_structured(bystander: Bystander) -> None:
    c = await NbdClient.connect(bystander.server.uri("vol"))
    try:
        with pytest.raises(NbdClientError) as e:
            await c.read(SIZE - 512, 1024)
        assert e.value.errno == EINVAL
        off, data = next(iter(bystander.blocks.items()))
        assert await c.read(off, len(data)) == data
    finally:
        await c.close()
    bystander.server_is_healthy()


def test_write_past_end_is_enospc_payload_consumed(bystander: Bystander) -> None:
    with raw_session(bystander.server, "vol") as c:
        tail = os.urandom(512)
        assert c.write(SIZE - 512, tail) == 0
        assert c.write(SIZE, os.urandom(4096)) == ENOSPC
        assert c.write(SIZE - 512, os.urandom(1024)) == ENOSPC  # straddles the end
        assert c.write(1 << 62, os.urandom(512)) == ENOSPC
        cookie = c.request(CMD_WRITE_ZEROES, SIZE - 512, 4096)
        assert c.simple_reply(cookie)[0] == ENOSPC
        # Nothing was written: the payloads were consumed and the tail is intact.
        assert c.read(SIZE - 512, 512) == (0, tail)
    bystander.server_is_healthy()


def test_unknown_command_is_einval(bystander: Bystander) -> None:
    with raw_session(bystander.server, "vol") as c:
        for cmd in (42, 0x7FFF):
            cookie = c.request(cmd, 0, 512)
            assert c.simple_reply(cookie)[0] == EINVAL
            assert c.read(0, 512)[0] == 0
    bystander.server_is_healthy()


def test_client_vanishes_mid_write_payload(bystander: Bystander) -> None:
    for _ in range(3):
        c = raw_session(bystander.server, "vol")
        c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 9, 0, 1 * MiB) + os.urandom(512 * KiB))
        c.close()
    bystander.server_is_healthy()


def test_client_vanishes_mid_handshake_and_mid_header(bystander: Bystander) -> None:
    c = RawNbd(bystander.server)
    c.send(struct.pack(">QI", IHAVEOPT, OPT_GO))  # half an option header
    c.close()
    c = raw_session(bystander.server, "vol")
    c.send(struct.pack(">IHH", REQUEST_MAGIC, 0, CMD_READ))  # half a request header
    c.close()
    bystander.server_is_healthy()
