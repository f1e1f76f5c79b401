"""Drive the real sans-I/O core through an in-memory link (h11's ConnectionPair style).

    pair = NbdPair(FakeCatalog(ExportInfo("disk", 1 << 20)))
    neg = pair.negotiate("disk")                      # structured replies + base:allocation + GO
    reply = pair.roundtrip(Cmd.WRITE, 0, data=b"x")   # request -> server Command -> reply bytes

No sockets and no event loop: bytes move between a `ClientConnection` and a
`ServerConnection` only when a method here moves them, so every step can be inspected.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from blockvirt.nbd import wire
from blockvirt.nbd.connection import ClientConnection, ServerConnection, ServerEvent
from blockvirt.nbd.constants import BASE_ALLOCATION, OPT_REPLY_MAGIC, Opt, Rep
from blockvirt.nbd.events import Command, ExportDenied, ExportInfo, Negotiated, OptionResult, Reply
from blockvirt.nbd.handshake import TLSMode
from blockvirt.nbd.transmission import ClientTransmission, ServerTransmission
from blockvirt.server.dispatch import Dispatcher
from blockvirt.storage.node import BlockNode

Buffers = Sequence[bytes | bytearray | memoryview]


class FakeCatalog:
    """An `ExportCatalog` over a fixed set of exports (mutable between handshakes); names in
    `denied` exist but this client may not open them."""

    def __init__(self, *exports: ExportInfo, denied: Iterable[str] = ()) -> None:
        self.by_name: dict[str, ExportInfo] = {e.name: e for e in exports}
        self.denied = set(denied)
        self.lookups: list[str] = []

    def add(self, export: ExportInfo) -> None:
        self.by_name[export.name] = export

    def lookup(self, name: str) -> ExportInfo | ExportDenied | None:
        self.lookups.append(name)
        if name in self.denied:
            return ExportDenied(name, "denied by the test catalog")
        return self.by_name.get(name)

    def listing(self) -> Iterable[tuple[str, str]]:
        return [(e.name, e.description) for e in self.by_name.values() if e.name not in self.denied]


def default_catalog() -> FakeCatalog:
    return FakeCatalog(
        ExportInfo("disk", 1 << 20, description="a test disk"),
        ExportInfo("ro", 1 << 20, read_only=True),
        ExportInfo("plain", 4096, contexts=()),
        denied=("secret",),
    )


def option_payload_info(name: str, infos: Iterable[int] = ()) -> bytes:
    """INFO/GO payload: u32 namelen, name, u16 n, n x u16."""
    raw = name.encode()
    ids = list(infos)
    return wire.U32.pack(len(raw)) + raw + wire.U16.pack(len(ids)) + b"".join(wire.U16.pack(i) for i in ids)


def option_payload_meta(name: str, queries: Iterable[str]) -> bytes:
    """*_META_CONTEXT payload: u32 namelen, name, u32 nq, nq x lp-string."""
    raw = name.encode()
    qs = list(queries)
    return wire.U32.pack(len(raw)) + raw + wire.U32.pack(len(qs)) + b"".join(wire.lp_string(q) for q in qs)


class NbdPair:
    """A client and a server connection joined by an in-memory link."""

    def __init__(
        self, catalog: FakeCatalog | None = None, *, tls: TLSMode = TLSMode.NONE, greet: bool = True
    ) -> None:
        self.catalog = catalog if catalog is not None else default_catalog()
        self.server = ServerConnection(self.catalog, tls=tls)
        self.client = ClientConnection()
        self.negotiated: Negotiated | None = None
        self.ctx: ClientTransmission | None = None
        if greet:
            self.greet()

    # ------------------------------------------------------------ raw movement
    def server_to_client(self) -> bytes:
        """Move the server's pending handshake bytes to the client; returns them."""
        data = self.server.data_to_send()
        if data:
            self.client.receive_data(data)
        return data

    def client_to_server(self) -> list[ServerEvent]:
        """Move the client's pending handshake bytes to the server; returns server events."""
        data = self.client.handshake.data_to_send()
        if data:
            self.server.receive_data(data)
        return self.server_events()

    def server_events(self) -> list[ServerEvent]:
        out: list[ServerEvent] = []
        while True:
            ev = self.server.next_event()
            if ev is None:
                return out
            out.append(ev)
            if self.server.transmission is not None:
                return out  # the rest is transmission input; the caller decides

    def send_raw(self, data: bytes) -> tuple[list[ServerEvent], bytes]:
        """Feed raw bytes to the server; returns its events and the bytes it answered."""
        self.server.receive_data(data)
        events = self.server_events()
        return events, self.server.data_to_send()

    # ------------------------------------------------------------ handshake
    def greet(self) -> None:
        self.server_to_client()
        ev = self.client.next_event()
        assert ev is None and self.client.handshake.greeted
        assert self.client_to_server() == []

    def _client_result(self) -> OptionResult:
        self.server_to_client()
        ev = self.client.next_event()
        assert isinstance(ev, OptionResult), ev
        return ev

    def option(self, opt: int, data: bytes = b"") -> tuple[list[ServerEvent], OptionResult]:
        """One option through the client codec: server events and the client's result."""
        self.client.handshake.send_option(opt, data)
        events = self.client_to_server()
        return events, self._client_result()

    def go(self, name: str, *, info: bool = False) -> tuple[list[ServerEvent], OptionResult]:
        self.client.handshake.go(name, info=info)
        events = self.client_to_server()
        return events, self._client_result()

    def meta(
        self, name: str, queries: Iterable[str], *, list_only: bool = False
    ) -> tuple[list[ServerEvent], OptionResult]:
        self.client.handshake.meta_context(name, queries, list_only=list_only)
        events = self.client_to_server()
        return events, self._client_result()

    def negotiate(
        self, name: str = "disk", *, structured: bool = True, contexts: Sequence[str] = (BASE_ALLOCATION,)
    ) -> Negotiated:
        """Full negotiation ending in GO; starts transmission on both sides."""
        if structured:
            _, res = self.option(Opt.STRUCTURED_REPLY)
            assert res.reply == Rep.ACK
            if contexts:
                _, res = self.meta(name, contexts)
                assert res.reply == Rep.ACK, res
        events, res = self.go(name)
        assert res.reply == Rep.ACK, res
        assert len(events) == 1 and isinstance(events[0], Negotiated), events
        neg = events[0]
        self.negotiated = neg
        self.ctx = self.client.start_transmission(neg.structured)
        return neg

    # ------------------------------------------------------------ transmission
    @property
    def stx(self) -> ServerTransmission:
        assert self.server.transmission is not None, "not negotiated"
        return self.server.transmission

    @property
    def tx(self) -> ClientTransmission:
        assert self.ctx is not None, "not negotiated"
        return self.ctx

    def request(
        self, cmd: int, offset: int = 0, length: int = 0, data: bytes | None = None, flags: int = 0
    ) -> tuple[int, Command]:
        """Encode a request on the client, parse it on the server: (cookie, Command)."""
        cookie, out = self.tx.request(cmd, offset, length, data, flags)
        self.server.receive_data(b"".join(out))
        ev = self.server.next_event()
        assert isinstance(ev, Command), ev
        assert self.server.next_event() is None
        return cookie, ev

    def reply(self, buffers: Buffers) -> Reply:
        """Hand server reply buffers to the client; returns the completed Reply."""
        self.tx.receive_data(b"".join(bytes(b) for b in buffers))
        ev = self.tx.next_event()
        assert isinstance(ev, Reply), ev
        return ev


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split raw server bytes into (option, reply type, payload) triples; asserts framing."""
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    while pos < len(data):
        magic, opt, rep, length = wire.OPTION_REPLY.unpack_from(data, pos)
        assert magic == OPT_REPLY_MAGIC, f"bad option reply magic at {pos}"
        pos += wire.OPTION_REPLY.size
        payload = data[pos : pos + length]
        assert len(payload) == length, "truncated option reply"
        out.append((opt, rep, payload))
        pos += length
    return out


def make_dispatcher(pair: NbdPair, node: BlockNode, size: int | None = None) -> Dispatcher:
    """A Dispatcher for the pair's negotiated session over `node`."""
    neg = pair.negotiated
    assert neg is not None, "negotiate first"
    return Dispatcher(
        node, neg.export.size if size is None else size, neg.transmission_flags, pair.stx, neg.contexts
    )


async def execute(
    pair: NbdPair,
    disp: Dispatcher,
    cmd: int,
    offset: int = 0,
    length: int = 0,
    data: bytes | None = None,
    flags: int = 0,
    *,
    fast_path: bool = False,
) -> Reply:
    """Client request -> server Command -> Dispatcher (check, then run) -> client Reply."""
    _, ev = pair.request(cmd, offset, length, data, flags)
    err = disp.check(ev)
    if err is not None:
        return pair.reply(disp.error_reply(ev, err))
    if fast_path:
        out = disp.try_now(ev)
        if out is not None:
            return pair.reply(out)
    return pair.reply(await disp.run(ev))
