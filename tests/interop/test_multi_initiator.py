"""Two initiators on one volume (CAN_MULTI_CONN): what one flushes or FUA-writes, the other reads.

Once the reply to a FLUSH (or a FUA write) has gone out on any connection, its effect must be
visible on every connection to the export, including ones opened before the write.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

from .conftest import KiB, MiB, nbdsh_env, need_nbdsh, volume_info

pytestmark = pytest.mark.interop


async def test_two_nbdclients_flush_and_fua(blockvirt_server: BlockvirtServer) -> None:
    uri = blockvirt_server.create_volume("shared", 32 * MiB)
    a = await NbdClient.connect(uri)
    b = await NbdClient.connect(uri)
    try:
        assert volume_info(blockvirt_server, "shared")["connections"] == 2
        # B looks first (so anything it might cache is stale), then A writes and flushes.
        assert await b.read(1 * MiB, 64 * KiB) == bytes(64 * KiB)
        data = os.urandom(64 * KiB)
        await a.write(1 * MiB, data)
        await a.flush()
        assert await b.read(1 * MiB, 64 * KiB) == data

        # FUA write on B, visible on A without any flush.
        assert await a.read(2 * MiB, 4 * KiB) == bytes(4 * KiB)
        fua = os.urandom(4 * KiB)
        await b.write(2 * MiB, fua, fua=True)
        assert await a.read(2 * MiB, 4 * KiB) == fua

        # Many concurrent writes on A (QD 64), one flush, then concurrent reads on B.
        rnd = random.Random(7)
        offsets = rnd.sample(range(4 * MiB // (4 * KiB), 32 * MiB // (4 * KiB)), 64)
        blocks = {off * 4 * KiB: rnd.randbytes(4 * KiB) for off in offsets}
        await asyncio.gather(*(a.write(off, blk) for off, blk in blocks.items()))
        await a.flush()
        got = await asyncio.gather(*(b.read(off, 4 * KiB) for off in blocks))
        assert got == list(blocks.values())

        # Zeroing and trimming on B, seen by A.
        await b.zero(1 * MiB, 32 * KiB, fast=False)
        await b.trim(1 * MiB + 32 * KiB, 32 * KiB)
        await b.flush()
        assert await a.read(1 * MiB, 64 * KiB) == bytes(64 * KiB)
    finally:
        await a.close()
        await b.close()


# One nbdsh process per initiator, driven line by line over stdin/stdout.
NBDSH_REPL = r"""
import sys, nbd
print("ready", h.get_size(), h.can_multi_conn(), flush=True)
for line in sys.stdin:
    op, *args = line.split()
    if op == "write":
        off, byte, n, *fl = args
        flags = nbd.CMD_FLAG_FUA if fl == ["fua"] else 0
        h.pwrite(bytes([int(byte, 0)]) * int(n), int(off), flags)
        print("ok", flush=True)
    elif op == "flush":
        h.flush()
        print("ok", flush=True)
    elif op == "read":
        data = h.pread(int(args[1]), int(args[0]))
        print("data", bytes(sorted(set(data))).hex(), len(data), flush=True)
    elif op == "quit":
        break
h.shutdown()
print("bye", flush=True)
"""


class Nbdsh:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, uri: str) -> Nbdsh:
        proc = await asyncio.create_subprocess_exec(
            "nbdsh",
            "-u",
            uri,
            "-c",
            NBDSH_REPL,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=nbdsh_env(),
        )
        return cls(proc)

    async def line(self) -> str:
        assert self.proc.stdout is not None
        out = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if not out:
            assert self.proc.stderr is not None
            err = await asyncio.wait_for(self.proc.stderr.read(), 10)
            raise AssertionError(f"nbdsh exited: {err.decode(errors='replace')}")
        return out.decode().strip()

    async def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.line()

    async def quit(self) -> None:
        """Clean exit: the script disconnects (NBD_CMD_DISC) and nbdsh returns 0."""
        assert await self.ask("quit") == "bye"
        assert await asyncio.wait_for(self.proc.wait(), 30) == 0

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def test_two_nbdsh_processes(blockvirt_server: BlockvirtServer) -> None:
    need_nbdsh()
    uri = blockvirt_server.create_volume("shared", 16 * MiB)
    a, b = await Nbdsh.start(uri), await Nbdsh.start(uri)
    try:
        assert await a.line() == f"ready {16 * MiB} True"
        assert await b.line() == f"ready {16 * MiB} True"
        assert await b.ask(f"read {1 * MiB} 65536") == "data 00 65536"

        assert await a.ask(f"write {1 * MiB} 0xab 65536") == "ok"
        assert await a.ask("flush") == "ok"
        assert await b.ask(f"read {1 * MiB} 65536") == "data ab 65536"

        assert await a.ask(f"read {2 * MiB} 4096") == "data 00 4096"
        assert await b.ask(f"write {2 * MiB} 0xcd 4096 fua") == "ok"
        assert await a.ask(f"read {2 * MiB} 4096") == "data cd 4096"
        # Overlapping rewrite by B over A's range, flushed, seen by A.
        assert await b.ask(f"write {1 * MiB + 4096} 0x11 8192") == "ok"
        assert await b.ask("flush") == "ok"
        assert await a.ask(f"read {1 * MiB} 4096") == "data ab 4096"
        assert await a.ask(f"read {1 * MiB + 4096} 8192") == "data 11 8192"
        await a.quit()
        await b.quit()
    finally:
        await a.kill()
        await b.kill()
