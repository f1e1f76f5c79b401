"""Option haggling, both roles, as pure state machines (bytes in, events and bytes out).

Every state change goes through `_TRANSITIONS`; a move that is not in the table is a bug or a
peer violation and raises. The server asks an `ExportCatalog` (a synchronous lookup, no I/O)
what it serves, so the whole negotiation, including every error answer, lives here.
"""

from __future__ import annotations

import enum
import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from blockvirt.nbd import options, wire
from blockvirt.nbd.buffer import ReceiveBuffer
from blockvirt.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_STRING,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from blockvirt.nbd.events import (
    Aborted,
    AccessDenied,
    ExportDenied,
    ExportInfo,
    ExportUnavailable,
    Negotiated,
    OptionRefused,
    OptionResult,
    StartTLS,
)
from blockvirt.nbd.exceptions import LocalProtocolError, RemoteProtocolError

#: More meta-context queries than this in one option get ERR_TOO_BIG.
MAX_META_QUERIES = 128
#: The client refuses option replies longer than this (ours are at most a few KiB): a peer
#: declaring more is not allowed to make us buffer it.
MAX_OPTION_REPLY = MAX_OPTION_LENGTH
#: A handshake with more options than this is closed: real clients send a handful (nbdinfo
#: --list sends one INFO per export, so this leaves room for a thousand exports), a flood
#: of pipelined options only burns the server's time.
MAX_OPTIONS = 1024
#: LIST is the one option whose answer grows with the catalog: at most this many per handshake.
MAX_LISTS = 16


class TLSMode(enum.Enum):
    NONE = "none"  # STARTTLS refused
    ALLOW = "allow"  # STARTTLS offered, plaintext also served
    REQUIRE = "require"  # nothing but STARTTLS/ABORT before TLS


class State(enum.Enum):
    GREETING = "greeting"  # server sent greeting, waits for client flags
    OPTIONS = "options"
    TLS_PENDING = "tls-pending"  # STARTTLS acked; the adapter must upgrade the transport
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class Input(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTION = "option"
    STARTTLS = "starttls"
    TLS_READY = "tls-ready"
    SELECTED = "selected"  # GO / EXPORT_NAME succeeded
    ABORT = "abort"
    VIOLATION = "violation"


_TRANSITIONS: dict[State, dict[Input, State]] = {
    State.GREETING: {
        Input.CLIENT_FLAGS: State.OPTIONS,
        Input.VIOLATION: State.CLOSED,
    },
    State.OPTIONS: {
        Input.OPTION: State.OPTIONS,
        Input.STARTTLS: State.TLS_PENDING,
        Input.SELECTED: State.TRANSMISSION,
        Input.ABORT: State.CLOSED,
        Input.VIOLATION: State.CLOSED,
    },
    State.TLS_PENDING: {Input.TLS_READY: State.OPTIONS, Input.VIOLATION: State.CLOSED},
    State.TRANSMISSION: {Input.VIOLATION: State.CLOSED, Input.ABORT: State.CLOSED},
    State.CLOSED: {},
}


class StateMachine:
    __slots__ = ("state",)

    def __init__(self, state: State) -> None:
        self.state = state

    def fire(self, what: Input) -> State:
        try:
            self.state = _TRANSITIONS[self.state][what]
        except KeyError:
            raise LocalProtocolError(f"{what.value} is not allowed in state {self.state.value}") from None
        return self.state


class ExportCatalog(Protocol):
    """What a server connection may see. Implemented by the export registry, one view per
    client: the view applies that client's access rules."""

    def lookup(self, name: str) -> ExportInfo | ExportDenied | ExportUnavailable | None:
        """The export as this client may use it (read-only if that is all it is granted),
        `ExportDenied` if it exists but this client may not open it, `ExportUnavailable` if
        it may but the export cannot be opened, None if unknown."""
        ...

    def listing(self) -> Iterable[tuple[str, str]]:
        """What LIST shows, as (name, description): only the exports this client may open.
        Must be cheap (catalog data, nothing opened): an unauthenticated client may ask."""
        ...


ServerHandshakeEvent = StartTLS | Negotiated | Aborted | AccessDenied | OptionRefused


def not_found_message(name: str) -> str:
    """The one answer to a name this client may not open, whether it exists or not: a
    denied client must not learn which names exist. Why it was refused (the rules, who the
    client is) goes to the server log only (`AccessDenied`)."""
    return f"no export named {name!r} for this client"


def transmission_flags(export: ExportInfo, structured: bool) -> int:
    """Export flags derived from what the export can do (never from switches)."""
    tf = TransmissionFlag
    flags = tf.HAS_FLAGS
    if export.read_only:
        flags |= tf.READ_ONLY
    else:
        if export.can_trim:
            flags |= tf.SEND_TRIM
        if export.can_zero:
            flags |= tf.SEND_WRITE_ZEROES
            if export.can_fast_zero:
                flags |= tf.SEND_FAST_ZERO
    if export.can_flush:
        flags |= tf.SEND_FLUSH
    if export.can_fua:
        flags |= tf.SEND_FUA
    if export.can_multi_conn:
        flags |= tf.CAN_MULTI_CONN
    if export.can_cache:
        flags |= tf.SEND_CACHE
    if export.rotational:
        flags |= tf.ROTATIONAL
    if structured and export.can_df:
        flags |= tf.SEND_DF
    return int(flags)


@dataclass(frozen=True, slots=True)
class _Parsed:
    """An option's decoded payload, or the error to answer it with."""

    name: str = ""
    infos: tuple[int, ...] = ()
    queries: tuple[str, ...] = ()
    error: Rep | None = None
    message: str = ""


def _decode_name(raw: bytes) -> str | None:
    if len(raw) > MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parse_info(data: bytes) -> _Parsed:
    """INFO/GO payload (options.INFO_REQUEST), checked rule by rule in wire order."""
    if len(data) < 6:
        return _Parsed(error=Rep.ERR_INVALID, message="option payload too short")
    if options.U32.parse(data) > len(data) - 6:
        return _Parsed(error=Rep.ERR_INVALID, message="name length exceeds option length")
    try:
        req = options.INFO_REQUEST.parse(data)
    except options.ParseError:  # fewer or more u16s than the count says, unless...
        req = None
    name = _decode_name(req.name if req is not None else options.CHECKED_STRING.parse(data))
    if name is None:  # ... the name is bad: that rule comes first
        return _Parsed(error=Rep.ERR_INVALID, message="export name is not valid UTF-8 text")
    if req is None:
        return _Parsed(error=Rep.ERR_INVALID, message="information request count mismatch")
    return _Parsed(name=name, infos=tuple(req.infos))


def _parse_meta(data: bytes) -> _Parsed:
    """*_META_CONTEXT payload (options.META_CONTEXT_REQUEST), read field by field so that
    the first broken rule decides the answer (a huge count is refused before its queries)."""
    if len(data) < 8:
        return _Parsed(error=Rep.ERR_INVALID, message="option payload too short")
    if options.U32.parse(data) > len(data) - 8:
        return _Parsed(error=Rep.ERR_INVALID, message="name length exceeds option length")
    stream = io.BytesIO(data)
    name = _decode_name(options.CHECKED_STRING.parse_stream(stream))
    if name is None:
        return _Parsed(error=Rep.ERR_INVALID, message="export name is not valid UTF-8 text")
    if options.QUERY_COUNT.parse_stream(stream) > MAX_META_QUERIES:
        return _Parsed(error=Rep.ERR_TOO_BIG, message="too many meta context queries")
    stream.seek(-4, io.SEEK_CUR)
    queries: list[str] = []
    for _ in range(options.QUERY_COUNT.parse_stream(stream)):
        try:
            raw = options.STRING.parse_stream(stream)
        except options.ParseError:
            return _Parsed(error=Rep.ERR_INVALID, message="truncated meta context query")
        q = _decode_name(raw)
        if q is None:
            return _Parsed(error=Rep.ERR_INVALID, message="meta context query is not valid text")
        queries.append(q)
    if stream.tell() != len(data):
        return _Parsed(error=Rep.ERR_INVALID, message="trailing bytes after meta context queries")
    return _Parsed(name=name, queries=tuple(queries))


#: Stable per-connection ids for the contexts we know (ids are opaque to clients).
CONTEXT_IDS: dict[str, int] = {BASE_ALLOCATION: 1, "qemu:allocation-depth": 2}
#: Contexts without a fixed id (qemu:dirty-bitmap:NAME) get the next free one from here.
FIRST_DYNAMIC_CONTEXT_ID = 3


def _context_id(name: str, taken: Iterable[int]) -> int:
    """The id SET_META_CONTEXT gives `name`: its fixed one, else the lowest free dynamic id."""
    fixed = CONTEXT_IDS.get(name)
    if fixed is not None:
        return fixed
    used = set(taken)
    cid = FIRST_DYNAMIC_CONTEXT_ID
    while cid in used:
        cid += 1
    return cid


def _match_contexts(available: Iterable[str], queries: tuple[str, ...], listing: bool) -> list[str]:
    """Contexts selected by `queries`: exact names; in LIST also 'ns:' prefixes and no query.
    In the export's order whatever the queries' order, as qemu-nbd answers."""
    avail = list(available)
    if listing and not queries:
        return avail
    chosen: set[str] = set()
    for q in queries:
        for name in avail:
            if name == q or (listing and q.endswith(":") and name.startswith(q)):
                chosen.add(name)
    return [name for name in avail if name in chosen]


class ServerHandshake:
    """Server side of the handshake. Feed bytes; read events and bytes to send."""

    def __init__(
        self,
        catalog: ExportCatalog,
        *,
        tls: TLSMode = TLSMode.NONE,
        options_per_call: int | None = None,
    ) -> None:
        self.catalog = catalog
        self.tls_mode = tls
        #: With a number, `next_event` handles at most that many options per call and then
        #: returns None with `backlog` set, so an adapter can let others run in between.
        self.options_per_call = options_per_call
        self.backlog = False
        self.options = 0  # options received in this handshake (MAX_OPTIONS)
        self.lists = 0
        self.tls_active = False
        self.shutting_down = False
        self.machine = StateMachine(State.GREETING)
        self.buffer = ReceiveBuffer()
        self.no_zeroes = False
        self.structured = False
        self._meta_export: str | None = None
        self._meta: dict[int, str] = {}
        self._out: list[bytes] = [wire.greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)]

    @property
    def state(self) -> State:
        return self.machine.state

    # ------------------------------------------------------------ adapter API
    def receive_data(self, data: bytes) -> None:
        self.buffer.feed(data)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The adapter finished the TLS handshake; earlier negotiation is forgotten (spec)."""
        self.machine.fire(Input.TLS_READY)
        self.tls_active = True
        self.structured = False
        self._meta_export = None
        self._meta = {}

    def next_event(self) -> ServerHandshakeEvent | None:
        """Process buffered input; returns an event, or None when more data is needed (or,
        with `options_per_call`, when that many options were handled: then `backlog` is set
        and the caller should call again soon)."""
        self.backlog = False
        budget = self.options_per_call
        while True:
            st = self.machine.state
            if st is State.GREETING:
                if len(self.buffer) < 4:
                    return None
                (cflags,) = wire.CLIENT_FLAGS.unpack(self.buffer.take(4))
                # int(): ~ on an IntFlag only inverts the defined bits (so ~all == 0)
                known = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
                if cflags & ~known:
                    self._violation(f"unknown client flags {cflags:#x}")
                self.no_zeroes = bool(cflags & ClientFlag.C_NO_ZEROES)
                self.machine.fire(Input.CLIENT_FLAGS)
                continue
            if st is not State.OPTIONS:
                return None
            if len(self.buffer) < wire.OPTION.size:
                return None
            magic, opt, length = wire.OPTION.unpack_from(self.buffer.buf, self.buffer.pos)
            if magic != IHAVEOPT:
                self._violation("bad option magic")
            if length > MAX_OPTION_LENGTH:
                self._violation(f"option length {length} exceeds {MAX_OPTION_LENGTH}")
            if len(self.buffer) < wire.OPTION.size + length:
                return None
            if budget is not None:
                if budget <= 0:
                    self.backlog = True
                    return None
                budget -= 1
            self.options += 1
            if self.options > MAX_OPTIONS:
                self._violation(f"more than {MAX_OPTIONS} options in one handshake")
            self.buffer.advance(wire.OPTION.size)
            data = self.buffer.take(length)
            ev = self._option(opt, data)
            if ev is not None:
                return ev

    # ------------------------------------------------------------ internals
    def _violation(self, why: str) -> None:
        self.machine.fire(Input.VIOLATION)
        raise RemoteProtocolError(why)

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out.append(wire.option_reply(opt, rep, data))

    def _refuse(self, opt: int, rep: Rep, message: str) -> OptionRefused:
        self._reply(opt, rep, wire.utf8_prefix(message, MAX_STRING))
        return OptionRefused(opt, int(rep), message)

    def _deny(self, opt: int, denied: ExportDenied) -> AccessDenied:
        message = denied.elsewhere if denied.elsewhere is not None else not_found_message(denied.name)
        self._reply(opt, Rep.ERR_UNKNOWN, wire.utf8_prefix(message, MAX_STRING))
        return AccessDenied(opt, denied.name, denied.reason, elsewhere=denied.elsewhere)

    def _option(self, opt: int, data: bytes) -> ServerHandshakeEvent | None:
        self.machine.fire(Input.OPTION)
        if opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            self.machine.fire(Input.ABORT)
            return Aborted("client sent NBD_OPT_ABORT")
        tls_needed = self.tls_mode is TLSMode.REQUIRE and not self.tls_active
        if opt == Opt.EXPORT_NAME:
            return self._export_name(data, tls_needed)
        if self.shutting_down:
            return self._refuse(opt, Rep.ERR_SHUTDOWN, "server is shutting down")
        if opt == Opt.STARTTLS:
            return self._starttls(data)
        if tls_needed:
            return self._refuse(opt, Rep.ERR_TLS_REQD, f"TLS is required before option {opt}")
        if opt in (Opt.INFO, Opt.GO):
            return self._info(opt, data)
        if opt == Opt.LIST:
            if data:
                return self._refuse(opt, Rep.ERR_INVALID, "LIST takes no payload")
            self.lists += 1
            if self.lists > MAX_LISTS:
                self._violation(f"more than {MAX_LISTS} LIST options in one handshake")
            for name, description in self.catalog.listing():
                reply = options.SERVER_REPLY.build(
                    {"name": name.encode(), "description": description.encode()}
                )
                self._reply(opt, Rep.SERVER, reply)
            self._reply(opt, Rep.ACK)
            return None
        if opt == Opt.STRUCTURED_REPLY:
            if data:
                return self._refuse(opt, Rep.ERR_INVALID, "STRUCTURED_REPLY takes no payload")
            self.structured = True  # a repeat is acked again, harmlessly
            self._reply(opt, Rep.ACK)
            return None
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            return self._meta_context(opt, data)
        return self._refuse(opt, Rep.ERR_UNSUP, f"option {opt} is not supported")

    def _starttls(self, data: bytes) -> StartTLS | OptionRefused:
        opt = Opt.STARTTLS
        if self.tls_mode is TLSMode.NONE:
            return self._refuse(opt, Rep.ERR_UNSUP, "TLS is not configured on this server")
        if data:
            return self._refuse(opt, Rep.ERR_INVALID, "STARTTLS takes no payload")
        if self.tls_active:
            return self._refuse(opt, Rep.ERR_INVALID, "TLS is already active")
        self._reply(opt, Rep.ACK)
        self.machine.fire(Input.STARTTLS)
        return StartTLS()

    def _export_name(self, data: bytes, tls_needed: bool) -> Negotiated | Aborted | AccessDenied:
        # No error reply exists for EXPORT_NAME: failures close the connection.
        name = _decode_name(data)
        export = None if name is None or tls_needed or self.shutting_down else self.catalog.lookup(name)
        if isinstance(export, ExportDenied):
            self.machine.fire(Input.ABORT)
            return AccessDenied(
                Opt.EXPORT_NAME, export.name, export.reason, closed=True, elsewhere=export.elsewhere
            )
        if isinstance(export, ExportUnavailable):
            self.machine.fire(Input.ABORT)
            return Aborted(export.reason)
        if export is None:
            self.machine.fire(Input.ABORT)
            why = "TLS required" if tls_needed else f"no export named {name!r}"
            return Aborted(why)
        flags = transmission_flags(export, self.structured)
        pad = b"" if self.no_zeroes else bytes(124)
        self._out.append(wire.EXPORT_NAME_REPLY.pack(export.size, flags) + pad)
        return self._selected(export, flags)

    def _selected(self, export: ExportInfo, flags: int) -> Negotiated:
        self.machine.fire(Input.SELECTED)
        contexts = dict(self._meta) if self._meta_export == export.name and self.structured else {}
        return Negotiated(export, flags, self.structured, contexts)

    def _info(self, opt: int, data: bytes) -> Negotiated | OptionRefused | AccessDenied | None:
        p = _parse_info(data)
        if p.error is not None:
            return self._refuse(opt, p.error, p.message)
        export = self.catalog.lookup(p.name)
        if isinstance(export, ExportDenied):
            return self._deny(opt, export)
        if isinstance(export, ExportUnavailable):
            # "Not available" is ERR_UNKNOWN's meaning; the message says why.
            return self._refuse(opt, Rep.ERR_UNKNOWN, export.reason)
        if export is None:
            return self._refuse(opt, Rep.ERR_UNKNOWN, not_found_message(p.name))
        flags = transmission_flags(export, self.structured)
        info = {"type": Info.EXPORT, "size": export.size, "flags": flags}
        self._reply(opt, Rep.INFO, options.INFO_EXPORT.build(info))
        if Info.NAME in p.infos:
            self._reply(
                opt, Rep.INFO, options.INFO_TEXT.build({"type": Info.NAME, "text": export.name.encode()})
            )
        if Info.DESCRIPTION in p.infos and export.description:
            text = {"type": Info.DESCRIPTION, "text": export.description.encode()}
            self._reply(opt, Rep.INFO, options.INFO_TEXT.build(text))
        # Always sent: it is cheap and tells well-behaved clients our limits.
        sizes = {
            "type": Info.BLOCK_SIZE,
            "minimum": export.min_block,
            "preferred": export.pref_block,
            "maximum": export.max_block,
        }
        self._reply(opt, Rep.INFO, options.INFO_BLOCK_SIZE.build(sizes))
        self._reply(opt, Rep.ACK)
        if opt == Opt.GO:
            return self._selected(export, flags)
        return None

    def _meta_context(self, opt: int, data: bytes) -> OptionRefused | AccessDenied | None:
        setting = opt == Opt.SET_META_CONTEXT
        if setting:  # SET replaces the previous selection even when it fails
            self._meta_export, self._meta = None, {}
        if not self.structured:
            return self._refuse(opt, Rep.ERR_INVALID, "structured replies were not negotiated")
        p = _parse_meta(data)
        if p.error is not None:
            return self._refuse(opt, p.error, p.message)
        export = self.catalog.lookup(p.name)
        if isinstance(export, ExportDenied):
            return self._deny(opt, export)
        if isinstance(export, ExportUnavailable):
            # "Not available" is ERR_UNKNOWN's meaning; the message says why.
            return self._refuse(opt, Rep.ERR_UNKNOWN, export.reason)
        if export is None:
            return self._refuse(opt, Rep.ERR_UNKNOWN, not_found_message(p.name))
        chosen = _match_contexts(export.contexts, p.queries, listing=not setting)
        selected: dict[int, str] = {}
        for name in chosen:
            cid = _context_id(name, selected) if setting else 0
            selected[cid] = name
            self._reply(
                opt, Rep.META_CONTEXT, options.META_CONTEXT_REPLY.build({"id": cid, "name": name.encode()})
            )
        if setting:
            self._meta_export, self._meta = export.name, selected
        self._reply(opt, Rep.ACK)
        return None


# ======================================================================= client role


class ClientHandshake:
    """Client side: send one option at a time, get one `OptionResult` per option."""

    def __init__(self) -> None:
        self.buffer = ReceiveBuffer()
        self.greeted = False
        self.server_flags = 0
        self._out: list[bytes] = []
        self._pending: int | None = None  # option awaiting its final reply
        self._exports: list[tuple[str, str]] = []
        self._contexts: list[tuple[int, str]] = []
        self._export: ExportInfo | None = None
        self._tflags = 0
        self._pending_name = ""

    def receive_data(self, data: bytes) -> None:
        self.buffer.feed(data)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send_option(self, opt: int, data: bytes = b"", *, name: str = "") -> None:
        if not self.greeted:
            raise LocalProtocolError("greeting not received yet")
        if self._pending is not None:
            raise LocalProtocolError("one option at a time")
        self._pending = opt
        self._pending_name = name
        self._exports, self._contexts = [], []
        self._export = None
        self._tflags = 0
        self._out.append(wire.option(opt, data))

    # Convenience encoders for the options we use.
    def go(self, name: str, *, info: bool = False) -> None:
        infos = [Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION]
        payload = options.INFO_REQUEST.build({"name": name.encode(), "infos": infos})
        self.send_option(Opt.INFO if info else Opt.GO, payload, name=name)

    def meta_context(self, name: str, queries: Iterable[str], *, list_only: bool = False) -> None:
        request = {"name": name.encode(), "queries": [q.encode() for q in queries]}
        payload = options.META_CONTEXT_REQUEST.build(request)
        self.send_option(Opt.LIST_META_CONTEXT if list_only else Opt.SET_META_CONTEXT, payload)

    def export_name(self, name: str) -> None:
        self.send_option(Opt.EXPORT_NAME, name.encode(), name=name)

    def next_event(self) -> OptionResult | None:
        if not self.greeted:
            if len(self.buffer) < wire.GREETING.size:
                return None
            magic, ihave, hflags = wire.GREETING.unpack(self.buffer.take(wire.GREETING.size))
            if magic != NBDMAGIC or ihave != IHAVEOPT:
                raise RemoteProtocolError("not a fixed-newstyle NBD server")
            if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
                raise RemoteProtocolError("server does not speak fixed newstyle")
            self.server_flags = hflags
            self.greeted = True
            cflags = ClientFlag.C_FIXED_NEWSTYLE
            if hflags & HandshakeFlag.NO_ZEROES:
                cflags |= ClientFlag.C_NO_ZEROES
            self._out.append(wire.CLIENT_FLAGS.pack(cflags))
            return None
        while self._pending is not None:
            if self._pending == Opt.EXPORT_NAME:
                return self._export_name_reply()
            if len(self.buffer) < wire.OPTION_REPLY.size:
                return None
            magic, opt, rep, length = wire.OPTION_REPLY.unpack_from(self.buffer.buf, self.buffer.pos)
            if magic != OPT_REPLY_MAGIC or opt != self._pending:
                raise RemoteProtocolError("bad option reply")
            if length > MAX_OPTION_REPLY:
                raise RemoteProtocolError(f"option reply of {length} bytes exceeds {MAX_OPTION_REPLY}")
            if len(self.buffer) < wire.OPTION_REPLY.size + length:
                return None
            self.buffer.advance(wire.OPTION_REPLY.size)
            data = self.buffer.take(length)
            try:
                result = self._option_reply(opt, rep, data)
            except (*options.ParseError, UnicodeDecodeError) as e:  # a reply unlike its type's layout
                raise RemoteProtocolError(f"malformed reply {rep:#x} to option {opt}: {e}") from None
            if result is not None:
                return result
        return None

    def _export_name_reply(self) -> OptionResult | None:
        need = wire.EXPORT_NAME_REPLY.size + (0 if self.server_flags & HandshakeFlag.NO_ZEROES else 124)
        if len(self.buffer) < need:
            return None
        size, flags = wire.EXPORT_NAME_REPLY.unpack(self.buffer.take(wire.EXPORT_NAME_REPLY.size))
        self.buffer.advance(need - wire.EXPORT_NAME_REPLY.size)
        self._pending = None
        info = _export_from_flags(self._pending_name, size, flags)
        return OptionResult(Opt.EXPORT_NAME, Rep.ACK, export=info, transmission_flags=flags)

    def _option_reply(self, opt: int, rep: int, data: bytes) -> OptionResult | None:
        if rep == Rep.SERVER:
            if len(data) < 4 or options.U32.parse(data) > len(data) - 4:
                raise RemoteProtocolError("export name longer than its SERVER reply")
            server = options.SERVER_REPLY.parse(data)
            self._exports.append((server.name.decode(), server.description.decode(errors="replace")))
            return None
        if rep == Rep.META_CONTEXT:
            ctx = options.META_CONTEXT_REPLY.parse(data)
            self._contexts.append((ctx.id, ctx.name.decode()))
            return None
        if rep == Rep.INFO:
            self._info_reply(data)
            return None
        if rep == Rep.ACK and opt in (Opt.GO, Opt.INFO) and not self._tflags:
            # The spec: NBD_INFO_EXPORT MUST come before the final ACK of INFO and GO.
            raise RemoteProtocolError("the server acknowledged INFO/GO without NBD_INFO_EXPORT")
        self._pending = None
        message = data.decode(errors="replace") if rep & (1 << 31) else ""
        return OptionResult(
            opt, rep, message, tuple(self._exports), tuple(self._contexts), self._export, self._tflags
        )

    def _info_reply(self, data: bytes) -> None:
        itype = options.INFO_TYPE.parse(data)
        cur = self._export or ExportInfo(name=self._pending_name, size=0)
        if itype == Info.EXPORT:
            export = options.INFO_EXPORT.parse(data)
            size, flags = export.size, export.flags
            if not flags & TransmissionFlag.HAS_FLAGS:
                raise RemoteProtocolError("transmission flags without HAS_FLAGS")
            self._tflags = flags
            base = _export_from_flags(cur.name, size, flags)
            cur = _replace(
                base,
                description=cur.description,
                min_block=cur.min_block,
                pref_block=cur.pref_block,
                max_block=cur.max_block,
            )
        elif itype == Info.NAME:
            cur = _replace(cur, name=options.INFO_TEXT.parse(data).text.decode())
        elif itype == Info.DESCRIPTION:
            cur = _replace(cur, description=options.INFO_TEXT.parse(data).text.decode(errors="replace"))
        elif itype == Info.BLOCK_SIZE:
            sizes = options.INFO_BLOCK_SIZE.parse(data)
            cur = _replace(cur, min_block=sizes.minimum, pref_block=sizes.preferred, max_block=sizes.maximum)
        self._export = cur


def _replace(info: ExportInfo, **kw: object) -> ExportInfo:
    import dataclasses

    return dataclasses.replace(info, **kw)  # type: ignore[arg-type]


def _export_from_flags(name: str, size: int, flags: int) -> ExportInfo:
    tf = TransmissionFlag
    return ExportInfo(
        name=name,
        size=size,
        read_only=bool(flags & tf.READ_ONLY),
        can_flush=bool(flags & tf.SEND_FLUSH),
        can_fua=bool(flags & tf.SEND_FUA),
        can_trim=bool(flags & tf.SEND_TRIM),
        can_zero=bool(flags & tf.SEND_WRITE_ZEROES),
        can_fast_zero=bool(flags & tf.SEND_FAST_ZERO),
        can_cache=bool(flags & tf.SEND_CACHE),
        can_multi_conn=bool(flags & tf.CAN_MULTI_CONN),
        can_df=bool(flags & tf.SEND_DF),
        rotational=bool(flags & tf.ROTATIONAL),
    )
