"""Option haggling, both roles, as pure state machines (bytes in, events and bytes out).

Every state change goes through `_TRANSITIONS`; a move that is not in the table is a bug or a
peer violation and raises. The server asks an `ExportCatalog` (a synchronous lookup, no I/O)
what it serves, so the whole negotiation, including every error answer, lives here.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from blockvirt.nbd import wire
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

    def lookup(self, name: str) -> ExportInfo | ExportDenied | None:
        """The export as this client may use it (read-only if that is all it is granted),
        `ExportDenied` if it exists but this client may not open it, None if unknown."""
        ...

    def exports(self) -> Iterable[ExportInfo]:
        """What LIST shows: only the exports this client may open."""
        ...


ServerHandshakeEvent = StartTLS | Negotiated | Aborted | AccessDenied | OptionRefused


def _denied_message(name: str) -> str:
    # The rule that refused, and who the server thinks the client is, stay in the server log.
    return f"access to export {name!r} is denied"


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
    """INFO/GO payload: u32 namelen, name, u16 n, n x u16."""
    if len(data) < 6:
        return _Parsed(error=Rep.ERR_INVALID, message="option payload too short")
    (namelen,) = wire.U32.unpack_from(data, 0)
    if namelen > len(data) - 6:
        return _Parsed(error=Rep.ERR_INVALID, message="name length exceeds option length")
    name = _decode_name(data[4 : 4 + namelen])
    if name is None:
        return _Parsed(error=Rep.ERR_INVALID, message="export name is not valid UTF-8 text")
    (n,) = wire.U16.unpack_from(data, 4 + namelen)
    if len(data) != 6 + namelen + 2 * n:
        return _Parsed(error=Rep.ERR_INVALID, message="information request count mismatch")
    infos = tuple(wire.U16.unpack_from(data, 6 + namelen + 2 * i)[0] for i in range(n))
    return _Parsed(name=name, infos=infos)


def _parse_meta(data: bytes) -> _Parsed:
    """*_META_CONTEXT payload: u32 namelen, name, u32 nq, nq x (u32 len, query)."""
    if len(data) < 8:
        return _Parsed(error=Rep.ERR_INVALID, message="option payload too short")
    (namelen,) = wire.U32.unpack_from(data, 0)
    if namelen > len(data) - 8:
        return _Parsed(error=Rep.ERR_INVALID, message="name length exceeds option length")
    name = _decode_name(data[4 : 4 + namelen])
    if name is None:
        return _Parsed(error=Rep.ERR_INVALID, message="export name is not valid UTF-8 text")
    pos = 4 + namelen
    (nq,) = wire.U32.unpack_from(data, pos)
    pos += 4
    if nq > MAX_META_QUERIES:
        return _Parsed(error=Rep.ERR_TOO_BIG, message="too many meta context queries")
    queries: list[str] = []
    for _ in range(nq):
        if pos + 4 > len(data):
            return _Parsed(error=Rep.ERR_INVALID, message="truncated meta context query")
        (qlen,) = wire.U32.unpack_from(data, pos)
        pos += 4
        if qlen > len(data) - pos:
            return _Parsed(error=Rep.ERR_INVALID, message="truncated meta context query")
        q = _decode_name(data[pos : pos + qlen])
        if q is None:
            return _Parsed(error=Rep.ERR_INVALID, message="meta context query is not valid text")
        queries.append(q)
        pos += qlen
    if pos != len(data):
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
    ) -> None:
        self.catalog = catalog
        self.tls_mode = tls
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
        """Process buffered input; returns an event, or None when more data is needed."""
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
        self._reply(opt, Rep.ERR_POLICY, wire.utf8_prefix(_denied_message(denied.name), MAX_STRING))
        return AccessDenied(opt, denied.name, denied.reason)

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
            for exp in self.catalog.exports():
                self._reply(opt, Rep.SERVER, wire.lp_string(exp.name) + exp.description.encode())
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
            return AccessDenied(Opt.EXPORT_NAME, export.name, export.reason, closed=True)
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
        if export is None:
            return self._refuse(opt, Rep.ERR_UNKNOWN, f"no export named {p.name!r}")
        flags = transmission_flags(export, self.structured)
        self._reply(opt, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, export.size, flags))
        if Info.NAME in p.infos:
            self._reply(opt, Rep.INFO, wire.U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in p.infos and export.description:
            self._reply(opt, Rep.INFO, wire.U16.pack(Info.DESCRIPTION) + export.description.encode())
        # Always sent: it is cheap and tells well-behaved clients our limits.
        self._reply(
            opt,
            Rep.INFO,
            wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, export.min_block, export.pref_block, export.max_block),
        )
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
        if export is None:
            return self._refuse(opt, Rep.ERR_UNKNOWN, f"no export named {p.name!r}")
        chosen = _match_contexts(export.contexts, p.queries, listing=not setting)
        selected: dict[int, str] = {}
        for name in chosen:
            cid = _context_id(name, selected) if setting else 0
            selected[cid] = name
            self._reply(opt, Rep.META_CONTEXT, wire.U32.pack(cid) + name.encode())
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
        raw = name.encode()
        infos = (Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION)
        payload = wire.U32.pack(len(raw)) + raw + wire.U16.pack(len(infos))
        payload += b"".join(wire.U16.pack(i) for i in infos)
        self.send_option(Opt.INFO if info else Opt.GO, payload, name=name)

    def meta_context(self, name: str, queries: Iterable[str], *, list_only: bool = False) -> None:
        qs = list(queries)
        raw = name.encode()
        payload = wire.U32.pack(len(raw)) + raw + wire.U32.pack(len(qs))
        payload += b"".join(wire.lp_string(q) for q in qs)
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
            except (struct.error, UnicodeDecodeError) as e:  # a reply shorter than its type needs
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
            (n,) = wire.U32.unpack_from(data, 0)
            if n > len(data) - 4:
                raise RemoteProtocolError("export name longer than its SERVER reply")
            name = data[4 : 4 + n].decode()
            self._exports.append((name, data[4 + n :].decode(errors="replace")))
            return None
        if rep == Rep.META_CONTEXT:
            (cid,) = wire.U32.unpack_from(data, 0)
            self._contexts.append((cid, data[4:].decode()))
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
        (itype,) = wire.U16.unpack_from(data, 0)
        cur = self._export or ExportInfo(name=self._pending_name, size=0)
        if itype == Info.EXPORT:
            _, size, flags = wire.INFO_EXPORT.unpack(data)
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
            cur = _replace(cur, name=data[2:].decode())
        elif itype == Info.DESCRIPTION:
            cur = _replace(cur, description=data[2:].decode(errors="replace"))
        elif itype == Info.BLOCK_SIZE:
            _, mn, pref, mx = wire.INFO_BLOCK_SIZE.unpack(data)
            cur = _replace(cur, min_block=mn, pref_block=pref, max_block=mx)
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
