"""A floating address for tests: one host:port that can be moved from node to node, the way
keepalived moves a virtual IP. Clients that can only reconnect to the address they were
given (qemu's `reconnect-delay`) reach the new node through it.

It is a TCP forwarder in the test's event loop (these machines have no iptables or nft to
move an address in the kernel). move() points it at another node and resets the connections
it carries, as the new holder of a real virtual IP would answer a stranger's packets with RST.
"""

from __future__ import annotations

import asyncio
import contextlib


class FloatingAddress:
    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.target = target
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> FloatingAddress:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def move(self, target: tuple[str, int]) -> None:
        self.target = target
        for client, upstream in list(self._pairs):
            for w in (client, upstream):
                w.transport.abort()
        self._pairs.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()  # nobody holds the address right now: connection refused
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(src, dst, pair))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            # One side went: the other goes too (a killed node's RST reaches the client).
            self._pairs.discard(pair)
            for w in pair:
                w.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.move(self.target)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
