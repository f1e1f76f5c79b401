#!/usr/bin/env python3
"""Handshake cost of the sans-I/O codec: full negotiations per second, no sockets.

Each negotiation is what qemu sends: STRUCTURED_REPLY, SET_META_CONTEXT (base:allocation),
GO with NAME, DESCRIPTION and BLOCK_SIZE requested; the server answers from a catalog of one
export. Both roles run (the client codec encodes the options and decodes the replies), so
this is the codec's whole share of a connection's setup; a TCP connect alone costs ~50 us.
Also times the option bodies alone (the server parsing an INFO and a META_CONTEXT payload).

    .venv/bin/python tools/bench/handshake.py [--seconds 3] [--live 500]

With --live N it also times N whole connections to a real `blockvirt serve` (TCP connect,
greeting, the same options, GO, disconnect): the cost the codec's share is part of.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from blockvirt.nbd.connection import ClientConnection, ServerConnection
from blockvirt.nbd.constants import BASE_ALLOCATION, Opt
from blockvirt.nbd.events import ExportDenied, ExportInfo, Negotiated, OptionResult
from blockvirt.nbd.handshake import _parse_info, _parse_meta

EXPORT = ExportInfo("disk", 1 << 30, description="a benchmark disk")


class OneExport:
    def lookup(self, name: str) -> ExportInfo | ExportDenied | None:
        return EXPORT if name == EXPORT.name else None

    def listing(self) -> Iterable[tuple[str, str]]:
        return [(EXPORT.name, EXPORT.description)]


CATALOG = OneExport()


def negotiate() -> None:
    server, client = ServerConnection(CATALOG), ClientConnection()
    client.receive_data(server.data_to_send())
    assert client.next_event() is None  # greeting in, client flags out

    def roundtrip() -> OptionResult:
        server.receive_data(client.handshake.data_to_send())
        while (ev := server.next_event()) is not None:
            if isinstance(ev, Negotiated):
                break
        client.receive_data(server.data_to_send())
        res = client.next_event()
        assert isinstance(res, OptionResult), res
        return res

    client.handshake.send_option(Opt.STRUCTURED_REPLY)
    roundtrip()
    client.handshake.meta_context(EXPORT.name, [BASE_ALLOCATION])
    roundtrip()
    client.handshake.go(EXPORT.name)
    res = roundtrip()
    assert res.export is not None and server.negotiated is not None


def rate(fn: Callable[[], object], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(100):
            fn()
        n += 100
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


async def _live(n: int) -> float:
    from blockvirt.client import NbdClient
    from blockvirt.testing import temporary_server

    with temporary_server() as server:
        uri = server.create_volume("disk", "64M")
        for _ in range(20):  # warm: the volume is opened once, then cached
            async with await NbdClient.connect(uri):
                pass
        start = time.perf_counter()
        for _ in range(n):
            async with await NbdClient.connect(uri):
                pass
        return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--live", type=int, default=0, metavar="N", help="also time N real connections")
    args = ap.parse_args(argv)
    info = b"\0\0\0\4disk\0\3\0\3\0\1\0\2"
    meta = b"\0\0\0\4disk\0\0\0\1\0\0\0\x0fbase:allocation"
    assert _parse_info(info).error is None and _parse_meta(meta).error is None
    hs = rate(negotiate, args.seconds)
    pi = rate(lambda: _parse_info(info), args.seconds / 2)
    pm = rate(lambda: _parse_meta(meta), args.seconds / 2)
    print(f"handshakes: {hs:,.0f}/s ({1e6 / hs:.1f} us each, both roles)")
    print(f"INFO body parse: {1e6 / pi:.2f} us; META_CONTEXT body parse: {1e6 / pm:.2f} us")
    if args.live:
        each = asyncio.run(_live(args.live))
        print(f"live connections: {1 / each:,.0f}/s ({each * 1e6:.0f} us each, client and server)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
