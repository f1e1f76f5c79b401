"""An initiator that keeps writing through failovers and knows exactly what must be on disk.

Each write puts a block's number and a fresh version number in every 16 bytes of the block,
so a read tells which write a block holds. The oracle remembers every version sent to each
block and the newest one that is *durable*: acknowledged with FUA, or acknowledged before a
FLUSH that was acknowledged. After any failure a block must hold a version that was sent,
never older than its durable one.

The writer connects with blockvirt's client and its fallbacks (every node's URI): when the
node it uses dies, hangs or hands the volume off, it reconnects wherever the volume is served
now, and carries on. Every acknowledgement is timestamped, so a test can measure the pause
the initiator saw (the longest gap between acknowledgements) and the time from a failure to
the first request served again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import struct
import time
from dataclasses import dataclass, field

from blockvirt.client import NbdClient, NbdClientError

BLOCK = 4096
#: A request that gets no answer in this long is given up (its node hangs): the writer
#: drops the connection and reconnects; the write's outcome stays unknown.
REQUEST_TIMEOUT = 2.0


def content(block: int, version: int) -> bytes:
    head = struct.pack(">QQ", block, version)
    return head * (BLOCK // len(head))


def decode(data: bytes) -> tuple[int, int] | None:
    """(block, version) a block holds, None for zeros; (-1, -1) for anything else."""
    if data == bytes(BLOCK):
        return None
    block, version = struct.unpack(">QQ", data[:16])
    return (block, version) if data == content(block, version) else (-1, -1)


@dataclass
class Oracle:
    blocks: int
    durable: list[int] = field(init=False)
    written: list[set[int]] = field(init=False)
    version: int = 0

    def __post_init__(self) -> None:
        self.durable = [0] * self.blocks
        self.written = [{0} for _ in range(self.blocks)]

    def next(self, block: int) -> int:
        self.version += 1
        self.written[block].add(self.version)
        return self.version

    def check(self, image: bytes, where: str) -> list[str]:
        """Problems found in `image` (the region read back); empty when it is right."""
        problems = []
        for b in range(self.blocks):
            got = decode(image[b * BLOCK : (b + 1) * BLOCK])
            version = 0 if got is None else got[1]
            if got is not None and got[0] != b:
                problems.append(f"{where}: block {b} holds block {got[0]}'s data (or garbage)")
            elif version not in self.written[b]:
                problems.append(f"{where}: block {b} holds version {version}, never written")
            elif version < self.durable[b]:
                problems.append(f"{where}: block {b} lost durable version {self.durable[b]}, holds {version}")
        return problems


async def connect(uris: list[str], deadline: float) -> NbdClient:
    """Connect through any node (blockvirt's client follows a refusal to the owner), trying
    again until `deadline` (a failover takes seconds: until then every node refuses)."""
    while True:
        try:
            return await NbdClient.connect(uris[0], fallbacks=tuple(uris[1:]))
        except (OSError, NbdClientError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def abandon(client: NbdClient) -> None:
    """Drop a connection whose server may hang: never wait on it for long."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), 1.0)


async def read_region(uris: list[str], blocks: int, *, timeout: float = 30.0) -> bytes:
    c = await connect(uris, time.monotonic() + timeout)
    try:
        out = bytearray()
        step = 256
        for first in range(0, blocks, step):
            n = min(step, blocks - first)
            out += await asyncio.wait_for(c.read(first * BLOCK, n * BLOCK), timeout)
        return bytes(out)
    finally:
        await abandon(c)


class Writer:
    """Random block writes (QD `depth`, some with FUA), a FLUSH after each batch, through
    failovers. Start with run(), stop with stop.set(); `acks` holds the monotonic time of every
    acknowledged request, `reconnects` when each new connection was made, and where."""

    def __init__(self, uris: list[str], oracle: Oracle, *, seed: int = 1, depth: int = 4) -> None:
        self.uris = uris
        self.oracle = oracle
        self.rng = random.Random(seed)
        self.depth = depth
        self.stop = asyncio.Event()
        self.acks: list[float] = []
        self.errors: list[str] = []
        self.reconnects: list[tuple[float, str]] = []
        #: Give up if no node serves the volume for this long.
        self.patience = 60.0

    async def run(self) -> None:
        while not self.stop.is_set():
            client = await connect(self.uris, time.monotonic() + self.patience)
            peer = client._link.writer.get_extra_info("peername")
            self.reconnects.append((time.monotonic(), f"{peer[0]}:{peer[1]}"))
            try:
                while not self.stop.is_set():
                    await self._batch(client)
            except (NbdClientError, OSError, TimeoutError) as e:
                self.errors.append(f"{time.monotonic():.3f} {type(e).__name__}: {e}")
            finally:
                await abandon(client)

    async def _batch(self, client: NbdClient) -> None:
        oracle = self.oracle
        picks = self.rng.sample(range(oracle.blocks), self.depth)
        versions = [oracle.next(b) for b in picks]
        fua = [self.rng.random() < 0.2 for _ in picks]

        async def one(block: int, version: int, with_fua: bool) -> None:
            await asyncio.wait_for(
                client.write(block * BLOCK, content(block, version), fua=with_fua), REQUEST_TIMEOUT
            )
            self.acks.append(time.monotonic())
            if with_fua:
                oracle.durable[block] = max(oracle.durable[block], version)

        results = await asyncio.gather(
            *(one(b, v, f) for b, v, f in zip(picks, versions, fua, strict=True)), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        # Every write above was acknowledged before this FLUSH was sent: once it is
        # acknowledged, they are all durable.
        await asyncio.wait_for(client.flush(), REQUEST_TIMEOUT)
        self.acks.append(time.monotonic())
        for b, v in zip(picks, versions, strict=True):
            oracle.durable[b] = max(oracle.durable[b], v)

    def first_ack_after(self, t: float) -> float | None:
        return next((a for a in self.acks if a > t), None)

    def first_served_after(self, t: float) -> float | None:
        """The first acknowledgement on a connection made after `t` (replies the old node
        sent before it died may still be read after `t`: they do not count)."""
        conn = next((when for when, _ in self.reconnects if when > t), None)
        return None if conn is None else self.first_ack_after(conn)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without an acknowledgement within [start, end] (the pause the
        initiator saw)."""
        inside = [start, *(a for a in self.acks if start <= a <= end), end]
        return max(b - a for a, b in itertools.pairwise(inside))
