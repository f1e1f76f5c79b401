#!/usr/bin/env python3
"""Generate the golden byte exchanges in protocol/vectors/ from protocol/spec.md.

Every byte is packed by hand from the layouts written in the spec, with the numeric values read
from the spec's constant tables. Nothing from `blockvirt` is imported: the vectors check our
codec and server against the spec, not against themselves.

    python tools/gen_vectors.py           # (re)write protocol/vectors/**/*.json
    python tools/gen_vectors.py --check   # exit 1 if a committed vector is stale or missing
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "protocol" / "spec.md"
VECTORS = ROOT / "protocol" / "vectors"

KiB = 1024
MiB = 1024 * KiB


# ============================================================ constants, read from the spec


def spec_tables(text: str) -> dict[str, int]:
    """Every `| Name | Value | ... |` row of spec.md, as one flat name -> value map."""
    values: dict[str, int] = {}
    in_table = False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| Name | Value |"):
            in_table = True
            continue
        if not in_table or not line.startswith("|"):
            in_table = False
            continue
        if set(cells[0]) <= {"-", ":"}:
            continue
        name = cells[0].strip("`")
        if name in values:
            raise SystemExit(f"spec.md: {name} appears in two constant tables")
        values[name] = int(cells[1], 0)
    return values


V = spec_tables(SPEC.read_text(encoding="utf-8"))


def v(name: str) -> int:
    return V[name]


def not_found(name: str) -> str:
    """spec §3.4: the reply to a name that is unknown, or that the client may not open."""
    return f"no export named {pyrepr(name)} for this client"


NBDMAGIC = v("NBDMAGIC")
IHAVEOPT = v("IHAVEOPT")
OPT_REPLY_MAGIC = v("NBD_OPT_REPLY_MAGIC")
REQUEST_MAGIC = v("NBD_REQUEST_MAGIC")
SIMPLE_MAGIC = v("NBD_SIMPLE_REPLY_MAGIC")
STRUCTURED_MAGIC = v("NBD_STRUCTURED_REPLY_MAGIC")
DONE = v("NBD_REPLY_FLAG_DONE")
HOLE, ZERO = v("NBD_STATE_HOLE"), v("NBD_STATE_ZERO")
BLOCK_SIZES = (v("minimum"), v("preferred"), v("maximum"))
MAX_OPTION_LENGTH = v("MAX_OPTION_LENGTH")
MAX_PAYLOAD_SERVED = v("MAX_PAYLOAD_SERVED")
MAX_PAYLOAD_ADVERTISED = v("MAX_PAYLOAD_ADVERTISED")
BASE_ALLOCATION = "base:allocation"
CONTEXT_ID = {BASE_ALLOCATION: v(BASE_ALLOCATION)}

# Harness rules (protocol/README.md): the test's memory node has 4 KiB blocks, and a node
# marked "sparse_reads" reports holes for reads of at least 256 KiB.
BLOCK = 4 * KiB
SPARSE_READ_MIN = 256 * KiB


def opt(name: str) -> int:
    return v(f"NBD_OPT_{name}")


def rep(name: str) -> int:
    return v(f"NBD_REP_{name}")


def info(name: str) -> int:
    return v(f"NBD_INFO_{name}")


def cmd(name: str) -> int:
    return v(f"NBD_CMD_{name}")


def cflag(name: str) -> int:
    return v(f"NBD_CMD_FLAG_{name}")


def tflag(name: str) -> int:
    return v(f"NBD_FLAG_{name}")


def err(name: str) -> int:
    return v(f"NBD_{name}")


def reply_type(name: str) -> int:
    return v(f"NBD_REPLY_TYPE_{name}")


# ============================================================ wire layouts (spec §2-§5)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def greeting() -> bytes:
    return u64(NBDMAGIC) + u64(IHAVEOPT) + u16(v("NBD_FLAG_FIXED_NEWSTYLE") | v("NBD_FLAG_NO_ZEROES"))


def option(number: int, data: bytes = b"") -> bytes:
    return u64(IHAVEOPT) + u32(number) + u32(len(data)) + data


def option_reply(number: int, rtype: int, data: bytes = b"") -> bytes:
    return u64(OPT_REPLY_MAGIC) + u32(number) + u32(rtype) + u32(len(data)) + data


def info_request(name: str, infos: Iterable[int]) -> bytes:
    items = list(infos)
    raw = name.encode()
    return u32(len(raw)) + raw + u16(len(items)) + b"".join(u16(i) for i in items)


def meta_request(name: str, queries: Iterable[str]) -> bytes:
    qs = [q.encode() for q in queries]
    raw = name.encode()
    return u32(len(raw)) + raw + u32(len(qs)) + b"".join(u32(len(q)) + q for q in qs)


def request(
    command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0, magic: int = REQUEST_MAGIC
) -> bytes:
    return u32(magic) + u16(flags) + u16(command) + u64(cookie) + u64(offset) + u32(length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return u32(SIMPLE_MAGIC) + u32(error) + u64(cookie)


def chunk(cookie: int, rtype: int, payload: bytes, done: bool) -> bytes:
    return (
        u32(STRUCTURED_MAGIC)
        + u16(DONE if done else 0)
        + u16(rtype)
        + u64(cookie)
        + u32(len(payload))
        + payload
    )


def pattern(n: int, seed: int = 0) -> bytes:
    """Recognisable non-zero test data."""
    return bytes(1 + (seed + i) % 251 for i in range(n))


def pyrepr(s: str) -> str:
    """How the server quotes an export name in messages (spec §3.4): Python's repr."""
    return repr(s)


# ============================================================ the exports of a vector


@dataclass
class Export:
    name: str
    size: int
    description: str = ""
    read_only: bool = False
    fast_zero: bool = True  # FAST_ZERO requests can be served (else ENOTSUP)
    sparse_reads: bool = False  # large reads report unallocated blocks as holes
    data: list[tuple[int, bytes]] = field(default_factory=list)
    access: str = "full"  # what this client's access rules grant: full, read-only or denied (§3.7)

    def flags(self, structured: bool) -> int:
        """Spec §3.5, for a node that can do everything (our memory and raw nodes)."""
        f = tflag("HAS_FLAGS") | tflag("SEND_FLUSH") | tflag("SEND_FUA") | tflag("CAN_MULTI_CONN")
        f |= tflag("SEND_CACHE")
        if self.read_only or self.access == "read-only":
            f |= tflag("READ_ONLY")
        else:
            f |= tflag("SEND_TRIM") | tflag("SEND_WRITE_ZEROES") | tflag("SEND_FAST_ZERO")
        if structured:
            f |= tflag("SEND_DF")
        return f

    def allocated(self) -> set[int]:
        blocks: set[int] = set()
        for off, raw in self.data:
            blocks.update(range(off // BLOCK, (off + len(raw) + BLOCK - 1) // BLOCK))
        return blocks

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "size": self.size}
        if self.description:
            out["description"] = self.description
        if self.read_only:
            out["read_only"] = True
        if not self.fast_zero:
            out["fast_zero"] = False
        if self.sparse_reads:
            out["sparse_reads"] = True
        if self.access != "full":
            out["access"] = self.access
        if self.data:
            out["data"] = [{"offset": off, "hex": raw.hex()} for off, raw in self.data]
        return out


def disk(**kw: Any) -> Export:
    return Export("disk", 1 * MiB, "test disk", **kw)


def ro() -> Export:
    return Export("ro", 1 * MiB, read_only=True)


def big() -> Export:
    """Larger than MAX_PAYLOAD_SERVED, so a too-large request is still inside the export."""
    return Export("big", MAX_PAYLOAD_SERVED + 1 * MiB, "larger than the largest request")


# ============================================================ one vector, built like a client


class Vector:
    def __init__(self, group: str, name: str, description: str, exports: Sequence[Export]) -> None:
        self.group, self.name, self.description = group, name, description
        self.exports = {e.name: e for e in exports}
        self.steps: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.closed = False
        self.flushes: dict[str, int] = {}
        self.contents: list[dict[str, Any]] = []
        # client-visible negotiation state, as the spec says the server tracks it
        self.structured = False
        self.meta_export: str | None = None
        self.meta: dict[int, str] = {}
        self.no_zeroes = False
        self.export: Export | None = None

    # ---------------------------------------------------------------- raw steps
    def c2s(self, data: bytes, note: str) -> None:
        self.steps.append({"dir": "c2s", "note": note, "hex": data.hex()})

    def c2s_zeros(self, n: int, note: str) -> None:
        self.steps.append({"dir": "c2s", "note": note, "zeros": n})

    def s2c(self, data: bytes, note: str) -> None:
        self.steps.append({"dir": "s2c", "note": note, "hex": data.hex()})

    def s2c_zeros(self, n: int, note: str) -> None:
        self.steps.append({"dir": "s2c", "note": note, "zeros": n})

    def event(self, kind: str, **fields: Any) -> None:
        self.events.append({"event": kind, **fields})

    # ---------------------------------------------------------------- handshake
    def hello(self, cflags: int | None = None) -> None:
        self.s2c(greeting(), "greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES")
        if cflags is None:
            cflags = v("NBD_FLAG_C_FIXED_NEWSTYLE") | v("NBD_FLAG_C_NO_ZEROES")
        self.no_zeroes = bool(cflags & v("NBD_FLAG_C_NO_ZEROES"))
        self.c2s(u32(cflags), f"client flags {cflags:#x}")

    def denied(self, number: int, export: str, note: str) -> None:
        # The same bytes as for a name that does not exist (§3.7): nothing to probe.
        message = not_found(export)
        self.s2c(
            option_reply(number, rep("ERR_UNKNOWN"), message.encode()), f"{note}: ERR_UNKNOWN {message!r}"
        )
        self.event("access_denied", option=number, export=export)

    def refused(self, number: int, rtype: str, message: str, note: str) -> None:
        self.s2c(option_reply(number, rep(rtype), message.encode()), f"{note}: {rtype} {message!r}")
        self.event("option_refused", option=number, reply=rep(rtype))

    def structured_reply(self) -> None:
        self.c2s(option(opt("STRUCTURED_REPLY")), "NBD_OPT_STRUCTURED_REPLY")
        self.s2c(option_reply(opt("STRUCTURED_REPLY"), rep("ACK")), "ACK")
        self.structured = True

    def info_replies(self, number: int, e: Export, infos: Sequence[int]) -> None:
        name = "GO" if number == opt("GO") else "INFO"
        self.s2c(
            option_reply(
                number, rep("INFO"), u16(info("EXPORT")) + u64(e.size) + u16(e.flags(self.structured))
            ),
            f"{name} reply: INFO_EXPORT size {e.size} flags {e.flags(self.structured):#06x}",
        )
        if info("NAME") in infos:
            self.s2c(
                option_reply(number, rep("INFO"), u16(info("NAME")) + e.name.encode()),
                f"{name} reply: INFO_NAME (asked for)",
            )
        if info("DESCRIPTION") in infos and e.description:
            self.s2c(
                option_reply(number, rep("INFO"), u16(info("DESCRIPTION")) + e.description.encode()),
                f"{name} reply: INFO_DESCRIPTION (asked for)",
            )
        mn, pref, mx = BLOCK_SIZES
        self.s2c(
            option_reply(number, rep("INFO"), u16(info("BLOCK_SIZE")) + u32(mn) + u32(pref) + u32(mx)),
            f"{name} reply: INFO_BLOCK_SIZE {mn}/{pref}/{mx} (always sent)",
        )
        self.s2c(option_reply(number, rep("ACK")), f"{name} reply: ACK")

    def info(self, export: str, infos: Sequence[int] = ()) -> None:
        infos = list(infos) or [info("BLOCK_SIZE")]
        self.c2s(option(opt("INFO"), info_request(export, infos)), f"NBD_OPT_INFO {export!r} infos {infos}")
        self.info_replies(opt("INFO"), self.exports[export], infos)

    def go(self, export: str = "disk", infos: Sequence[int] | None = None) -> None:
        infos = [info("BLOCK_SIZE")] if infos is None else list(infos)
        self.c2s(option(opt("GO"), info_request(export, infos)), f"NBD_OPT_GO {export!r} infos {infos}")
        e = self.exports[export]
        self.info_replies(opt("GO"), e, infos)
        self.selected(e)

    def export_name(self, export: str) -> None:
        self.c2s(option(opt("EXPORT_NAME"), export.encode()), f"NBD_OPT_EXPORT_NAME {export!r}")
        e = self.exports[export]
        pad = b"" if self.no_zeroes else bytes(124)
        self.s2c(
            u64(e.size) + u16(e.flags(self.structured)) + pad,
            f"size, flags {e.flags(self.structured):#06x}" + ("" if self.no_zeroes else ", 124 zero bytes"),
        )
        self.selected(e)

    def selected(self, e: Export) -> None:
        contexts = self.meta if self.meta_export == e.name and self.structured else {}
        self.export = e
        self.event(
            "negotiated",
            export=e.name,
            size=e.size,
            transmission_flags=e.flags(self.structured),
            structured=self.structured,
            contexts={str(k): n for k, n in contexts.items()},
        )

    def set_meta(self, export: str, queries: Sequence[str], selects: Sequence[str]) -> None:
        self.c2s(
            option(opt("SET_META_CONTEXT"), meta_request(export, queries)),
            f"NBD_OPT_SET_META_CONTEXT {export!r} {list(queries)}",
        )
        self.meta_export, self.meta = export, {}
        for name in selects:
            cid = CONTEXT_ID[name]
            self.s2c(
                option_reply(opt("SET_META_CONTEXT"), rep("META_CONTEXT"), u32(cid) + name.encode()),
                f"META_CONTEXT id {cid} {name}",
            )
            self.meta[cid] = name
        self.s2c(option_reply(opt("SET_META_CONTEXT"), rep("ACK")), "ACK")

    def list_meta(self, export: str, queries: Sequence[str], lists: Sequence[str]) -> None:
        self.c2s(
            option(opt("LIST_META_CONTEXT"), meta_request(export, queries)),
            f"NBD_OPT_LIST_META_CONTEXT {export!r} {list(queries)}",
        )
        for name in lists:
            self.s2c(
                option_reply(opt("LIST_META_CONTEXT"), rep("META_CONTEXT"), u32(0) + name.encode()),
                f"META_CONTEXT id 0 (listing) {name}",
            )
        self.s2c(option_reply(opt("LIST_META_CONTEXT"), rep("ACK")), "ACK")

    # ---------------------------------------------------------------- transmission
    def send(
        self,
        name: str,
        cookie: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes | None = None,
        note: str = "",
    ) -> None:
        number = cmd(name)
        data = request(number, cookie, offset, length, flags) + (payload or b"")
        self.c2s(data, note or f"{name} cookie {cookie} offset {offset} length {length} flags {flags:#x}")
        self.command(name, cookie, offset, length, flags)

    def command(self, name: str, cookie: int, offset: int, length: int, flags: int) -> None:
        self.event("command", command=name, cookie=cookie, flags=flags, offset=offset, length=length)

    def ok(self, cookie: int, note: str = "") -> None:
        """Success of a command without data: a simple reply, also under structured replies."""
        self.s2c(simple_reply(cookie), note or f"simple reply cookie {cookie}: ok")

    def fail(self, cookie: int, errno: str, message: str) -> None:
        if self.structured:
            msg = message.encode()
            self.s2c(
                chunk(cookie, reply_type("ERROR"), u32(err(errno)) + u16(len(msg)) + msg, True),
                f"ERROR chunk cookie {cookie} DONE: {errno} {message!r}",
            )
        else:
            self.s2c(simple_reply(cookie, err(errno)), f"simple reply cookie {cookie}: {errno}")

    def read_reply(self, cookie: int, offset: int, data: bytes) -> None:
        if self.structured:
            self.s2c(
                chunk(cookie, reply_type("OFFSET_DATA"), u64(offset) + data, True),
                f"OFFSET_DATA chunk cookie {cookie} DONE offset {offset} length {len(data)}",
            )
        else:
            self.s2c(simple_reply(cookie), f"simple reply cookie {cookie}: ok")
            self.s2c(data, f"{len(data)} data bytes")

    def block_status_reply(self, cookie: int, extents: Sequence[tuple[int, int]]) -> None:
        for i, (cid, _name) in enumerate(self.meta.items()):
            payload = u32(cid) + b"".join(u32(ln) + u32(fl) for ln, fl in extents)
            self.s2c(
                chunk(cookie, reply_type("BLOCK_STATUS"), payload, i == len(self.meta) - 1),
                f"BLOCK_STATUS chunk cookie {cookie} context {cid}: {list(extents)}",
            )

    def disc(self, cookie: int, flush: bool) -> None:
        self.send("DISC", cookie, note="DISC: no reply; the server flushes if needed and closes")
        self.closed = True
        assert self.export is not None
        self.flushes[self.export.name] = self.flushes.get(self.export.name, 0) + int(flush)

    def expect_flushes(self, export: str, n: int) -> None:
        self.flushes[export] = n

    def expect_data(self, export: str, offset: int, data: bytes) -> None:
        self.contents.append({"export": export, "offset": offset, "hex": data.hex()})

    # ---------------------------------------------------------------- output
    def to_json(self) -> dict[str, Any]:
        expect: dict[str, Any] = {"events": self.events, "closed": self.closed}
        if self.flushes:
            expect["flushes"] = self.flushes
        if self.contents:
            expect["data"] = self.contents
        return {
            "description": self.description,
            "role": "server",
            "exports": [e.to_json() for e in self.exports.values()],
            "steps": self.steps,
            "expect": expect,
        }


# ============================================================ the vectors

Builder = Callable[[], Vector]
BUILDERS: list[Builder] = []


def vector(fn: Builder) -> Builder:
    BUILDERS.append(fn)
    return fn


def handshake(name: str, description: str, *exports: Export) -> Vector:
    return Vector("handshake", name, description, exports or (disk(),))


def transmission(name: str, description: str, *exports: Export) -> Vector:
    return Vector("transmission", name, description, exports or (disk(),))


def errors(name: str, description: str, *exports: Export) -> Vector:
    return Vector("errors", name, description, exports or (disk(),))


# ---------------------------------------------------------------- handshake


@vector
def greeting_only() -> Vector:
    t = handshake("greeting", "The server speaks first: 18 bytes, fixed newstyle with NO_ZEROES (spec §2.1).")
    t.s2c(greeting(), "greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES")
    return t


@vector
def client_flags() -> Vector:
    t = handshake(
        "client_flags", "Both known client flags are accepted and nothing is sent back (spec §2.2)."
    )
    t.hello()
    return t


@vector
def go() -> Vector:
    t = handshake(
        "go", "GO asking for block sizes: INFO_EXPORT, INFO_BLOCK_SIZE, ACK, then transmission (spec §3.4)."
    )
    t.hello()
    t.go("disk")
    return t


@vector
def go_no_info_requests() -> Vector:
    t = handshake(
        "go_no_info_requests",
        "GO with an empty info list, as nbd-client does: INFO_EXPORT and INFO_BLOCK_SIZE are sent anyway.",
    )
    t.hello()
    t.go("disk", infos=[])
    return t


@vector
def go_name_description() -> Vector:
    t = handshake(
        "go_name_description",
        "NAME and DESCRIPTION are sent when asked; an empty description is not; unknown info types "
        "are ignored (spec §3.4).",
        disk(),
        ro(),
    )
    t.hello()
    t.info("ro", [info("DESCRIPTION"), info("NAME")])
    t.go("disk", [info("BLOCK_SIZE"), info("NAME"), info("DESCRIPTION"), 0x4242])
    return t


@vector
def info_then_go() -> Vector:
    t = handshake(
        "info_then_go", "INFO leaves haggling open; the GO that follows gets the same replies (spec §3.4)."
    )
    t.hello()
    t.info("disk")
    t.go("disk")
    return t


@vector
def list_exports() -> Vector:
    t = handshake(
        "list",
        "LIST: one SERVER reply per export (name, then description), then ACK (spec §3.2).",
        disk(),
        ro(),
    )
    t.hello()
    t.c2s(option(opt("LIST")), "NBD_OPT_LIST")
    for e in t.exports.values():
        if e.access == "denied":
            continue
        raw = e.name.encode()
        t.s2c(
            option_reply(opt("LIST"), rep("SERVER"), u32(len(raw)) + raw + e.description.encode()),
            f"SERVER {e.name!r} {e.description!r}",
        )
    t.s2c(option_reply(opt("LIST"), rep("ACK")), "ACK")
    return t


@vector
def abort() -> Vector:
    t = handshake("abort", "ABORT is acknowledged, its data ignored, and the server closes (spec §3.2).")
    t.hello()
    t.c2s(option(opt("ABORT"), b"bye"), "NBD_OPT_ABORT with 3 stray bytes")
    t.s2c(option_reply(opt("ABORT"), rep("ACK")), "ACK")
    t.event("aborted")
    t.closed = True
    return t


@vector
def export_name() -> Vector:
    t = handshake(
        "export_name", "EXPORT_NAME without C_NO_ZEROES: size, flags and 124 zero bytes (spec §3.3)."
    )
    t.hello(cflags=v("NBD_FLAG_C_FIXED_NEWSTYLE"))
    t.export_name("disk")
    return t


@vector
def export_name_no_zeroes() -> Vector:
    t = handshake("export_name_no_zeroes", "EXPORT_NAME with C_NO_ZEROES: just size and flags (spec §3.3).")
    t.hello()
    t.export_name("disk")
    return t


@vector
def export_name_structured() -> Vector:
    t = handshake(
        "export_name_structured",
        "Structured replies and the meta context chosen before EXPORT_NAME stay in force (spec §3.3).",
    )
    t.hello()
    t.structured_reply()
    t.set_meta("disk", [BASE_ALLOCATION], [BASE_ALLOCATION])
    t.export_name("disk")
    return t


@vector
def unknown_options() -> Vector:
    t = handshake(
        "unknown_options",
        "Unknown, withdrawn and experimental options get ERR_UNSUP and parsing goes on (spec §3.2).",
    )
    t.hello()
    for number, data in ((0x1234, b"abc"), (opt("PEEK_EXPORT"), b""), (opt("EXTENDED_HEADERS"), b"")):
        t.c2s(option(number, data), f"option {number} with {len(data)} data bytes")
        t.refused(number, "ERR_UNSUP", f"option {number} is not supported", f"option {number}")
    t.go("disk")
    return t


@vector
def starttls_unsupported() -> Vector:
    t = handshake("starttls_unsupported", "Without TLS configured, STARTTLS gets ERR_UNSUP (spec §1, §3.2).")
    t.hello()
    t.c2s(option(opt("STARTTLS")), "NBD_OPT_STARTTLS")
    t.refused(opt("STARTTLS"), "ERR_UNSUP", "TLS is not configured on this server", "STARTTLS")
    t.go("disk")
    return t


@vector
def structured_reply() -> Vector:
    t = handshake(
        "structured_reply",
        "STRUCTURED_REPLY is acknowledged, also when repeated; GO then advertises SEND_DF (spec §3.2, §3.5).",
    )
    t.hello()
    t.structured_reply()
    t.structured_reply()
    t.go("disk")
    return t


@vector
def meta_context() -> Vector:
    t = handshake(
        "meta_context",
        "LIST_META_CONTEXT lists base:allocation with id 0 (all, or by 'base:'); SET_META_CONTEXT "
        "ignores 'base:' and unknown names and selects base:allocation as id 1 (spec §3.6).",
    )
    t.hello()
    t.structured_reply()
    t.list_meta("disk", [], [BASE_ALLOCATION])
    t.list_meta("disk", ["base:"], [BASE_ALLOCATION])
    t.list_meta("disk", ["x-nope:"], [])
    t.set_meta("disk", ["base:", "x-nope:foo", "base:nope", BASE_ALLOCATION], [BASE_ALLOCATION])
    t.go("disk")
    return t


# ---------------------------------------------------------------- transmission


def start(t: Vector, export: str = "disk", structured: bool = False, meta: bool = False) -> None:
    t.hello()
    if structured:
        t.structured_reply()
    if meta:
        t.set_meta(export, [BASE_ALLOCATION], [BASE_ALLOCATION])
    t.go(export)


@vector
def read_simple() -> Vector:
    data = pattern(1024)
    t = transmission(
        "read_simple",
        "READ with simple replies: header then the data; FUA on READ is accepted (spec §4.2, §5.1).",
        disk(data=[(0, data)]),
    )
    start(t)
    t.send("READ", 1, 0, 512)
    t.read_reply(1, 0, data[:512])
    t.send("READ", 0xFEDCBA9876543210, 512, 512, cflag("FUA"))
    t.read_reply(0xFEDCBA9876543210, 512, data[512:])
    return t


@vector
def read_structured() -> Vector:
    data = pattern(1024, 7)
    t = transmission(
        "read_structured",
        "READ with structured replies: one OFFSET_DATA chunk marked DONE (spec §4.3).",
        disk(data=[(0, data)]),
    )
    start(t, structured=True)
    t.send("READ", 1, 256, 512)
    t.read_reply(1, 256, data[256:768])
    return t


@vector
def read_zero_length_simple() -> Vector:
    t = transmission("read_zero_length_simple", "A READ of length 0 succeeds with no data (spec §5.2).")
    start(t)
    t.send("READ", 1, 4096, 0)
    t.ok(1)
    return t


@vector
def read_zero_length_structured() -> Vector:
    t = transmission(
        "read_zero_length_structured",
        "A READ of length 0 under structured replies is one NONE chunk with DONE (spec §4.3).",
    )
    start(t, structured=True)
    t.send("READ", 1, 4096, 0)
    t.s2c(chunk(1, reply_type("NONE"), b"", True), "NONE chunk cookie 1 DONE")
    return t


@vector
def read_df() -> Vector:
    data = pattern(4096, 3)
    t = transmission(
        "read_df",
        "A DF read is one OFFSET_DATA chunk; holes inside it are sent as zero bytes (spec §4.3).",
        disk(data=[(0, data)]),
    )
    start(t, structured=True)
    t.send("READ", 1, 2048, 8192, cflag("DF"))
    t.read_reply(1, 2048, data[2048:] + bytes(6144))
    return t


@vector
def read_sparse_holes() -> Vector:
    data = pattern(4096, 5)
    length = 2 * SPARSE_READ_MIN
    t = transmission(
        "read_sparse_holes",
        "A large structured READ over a mostly unallocated range: an OFFSET_DATA chunk for the "
        "allocated block, then an OFFSET_HOLE chunk marked DONE (spec §4.3).",
        disk(sparse_reads=True, data=[(0, data)]),
    )
    start(t, structured=True)
    t.send("READ", 1, 0, length)
    t.s2c(
        chunk(1, reply_type("OFFSET_DATA"), u64(0) + data, False),
        "OFFSET_DATA chunk cookie 1 offset 0 length 4096",
    )
    t.s2c(
        chunk(1, reply_type("OFFSET_HOLE"), u64(4096) + u32(length - 4096), True),
        f"OFFSET_HOLE chunk cookie 1 DONE offset 4096 size {length - 4096}",
    )
    return t


@vector
def read_large_split() -> Vector:
    length = MAX_PAYLOAD_ADVERTISED + 4096
    t = transmission(
        "read_large_split",
        "A structured READ longer than the advertised maximum payload is split so that no chunk "
        "carries more than 32 MiB of data (spec §4.3).",
        big(),
    )
    start(t, "big", structured=True)
    t.send("READ", 1, 0, length)
    first = MAX_PAYLOAD_ADVERTISED
    t.s2c(
        u32(STRUCTURED_MAGIC) + u16(0) + u16(reply_type("OFFSET_DATA")) + u64(1) + u32(8 + first) + u64(0),
        f"OFFSET_DATA chunk cookie 1 offset 0 length {first} (header and offset)",
    )
    t.s2c_zeros(first, f"{first} data bytes")
    t.s2c(
        chunk(1, reply_type("OFFSET_DATA"), u64(first) + bytes(4096), True),
        f"OFFSET_DATA chunk cookie 1 DONE offset {first} length 4096",
    )
    return t


@vector
def write() -> Vector:
    data = pattern(512, 11)
    t = transmission(
        "write",
        "WRITE then READ back; DISC flushes the unflushed write and closes without a reply "
        "(spec §5.3, §5.4, §6.2).",
    )
    start(t)
    t.send("WRITE", 1, 4096, 512, payload=data)
    t.ok(1)
    t.send("READ", 2, 4096, 512)
    t.read_reply(2, 4096, data)
    t.disc(3, flush=True)
    t.expect_data("disk", 4096, data)
    return t


@vector
def write_fua() -> Vector:
    data = pattern(4096, 13)
    t = transmission(
        "write_fua", "A FUA write is durable on reply, so DISC has nothing to flush (spec §6.1, §6.2)."
    )
    start(t)
    t.send("WRITE", 1, 0, 4096, cflag("FUA"), payload=data)
    t.ok(1)
    t.disc(2, flush=False)
    t.expect_data("disk", 0, data)
    return t


@vector
def write_then_fua_write() -> Vector:
    first, second = pattern(512, 37), pattern(512, 41)
    t = transmission(
        "write_then_fua_write",
        "A FUA write makes only its own data durable: an earlier plain write still needs the flush at "
        "DISC (spec §6.1, §6.2).",
    )
    start(t)
    t.send("WRITE", 1, 0, 512, payload=first)
    t.ok(1)
    t.send("WRITE", 2, 4096, 512, cflag("FUA"), payload=second)
    t.ok(2)
    t.disc(3, flush=True)
    t.expect_data("disk", 0, first)
    t.expect_data("disk", 4096, second)
    return t


@vector
def flush() -> Vector:
    data = pattern(512, 17)
    t = transmission(
        "flush", "FLUSH after a write flushes the node once; DISC then has nothing left to flush (spec §5.5)."
    )
    start(t, structured=True)
    t.send("WRITE", 1, 0, 512, payload=data)
    t.ok(1)
    t.send("FLUSH", 2)
    t.ok(2)
    t.disc(3, flush=False)
    t.expect_flushes("disk", 1)
    t.expect_data("disk", 0, data)
    return t


@vector
def trim() -> Vector:
    data = pattern(8192, 19)
    t = transmission(
        "trim",
        "TRIM deallocates the block: block status shows a hole and it reads back as zeros (spec §5.6, §5.9).",
        disk(data=[(0, data)]),
    )
    start(t, structured=True, meta=True)
    t.send("TRIM", 1, 0, 4096)
    t.ok(1)
    t.send("BLOCK_STATUS", 2, 0, 8192)
    t.block_status_reply(2, [(4096, HOLE | ZERO), (4096, 0)])
    t.send("READ", 3, 0, 512)
    t.read_reply(3, 0, bytes(512))
    t.expect_data("disk", 0, bytes(4096) + data[4096:])
    return t


@vector
def write_zeroes() -> Vector:
    data = pattern(3 * 4096, 23)
    t = transmission(
        "write_zeroes",
        "WRITE_ZEROES with NO_HOLE keeps the block allocated; without it the block may become a "
        "hole; FAST_ZERO succeeds on a node that zeroes fast (spec §5.8).",
        disk(data=[(0, data)]),
    )
    start(t, structured=True, meta=True)
    t.send("WRITE_ZEROES", 1, 0, 4096, cflag("NO_HOLE"))
    t.ok(1)
    t.send("WRITE_ZEROES", 2, 4096, 4096)
    t.ok(2)
    t.send("WRITE_ZEROES", 3, 8192, 4096, cflag("FAST_ZERO") | cflag("FUA"))
    t.ok(3)
    t.send("BLOCK_STATUS", 4, 0, 16384)
    t.block_status_reply(4, [(4096, 0), (12288, HOLE | ZERO)])
    t.expect_data("disk", 0, bytes(3 * 4096))
    return t


@vector
def block_status() -> Vector:
    t = transmission(
        "block_status",
        "BLOCK_STATUS for base:allocation: contiguous extents from the offset, clipped to the "
        "request; REQ_ONE gives exactly one (spec §5.9).",
        disk(data=[(0, pattern(4096)), (8192, pattern(4096, 1))]),
    )
    start(t, structured=True, meta=True)
    t.send("BLOCK_STATUS", 1, 0, 65536)
    t.block_status_reply(1, [(4096, 0), (4096, HOLE | ZERO), (4096, 0), (53248, HOLE | ZERO)])
    t.send("BLOCK_STATUS", 2, 0, 65536, cflag("REQ_ONE"))
    t.block_status_reply(2, [(4096, 0)])
    t.send("BLOCK_STATUS", 3, 4096, 65536, cflag("REQ_ONE"))
    t.block_status_reply(3, [(4096, HOLE | ZERO)])
    t.send("BLOCK_STATUS", 4, 100, 200)
    t.block_status_reply(4, [(200, 0)])
    t.send("BLOCK_STATUS", 5, 1 * MiB - 8192, 8192)
    t.block_status_reply(5, [(8192, HOLE | ZERO)])
    return t


@vector
def cache() -> Vector:
    t = transmission("cache", "CACHE is a hint that succeeds inside the export (spec §5.7).")
    start(t)
    t.send("CACHE", 1, 0, 65536)
    t.ok(1)
    return t


@vector
def disc() -> Vector:
    t = transmission("disc", "DISC with nothing written: no reply, no flush, the server closes (spec §5.4).")
    start(t)
    t.disc(1, flush=False)
    return t


@vector
def pipelined() -> Vector:
    """Several requests in one segment, answered in order by the (sequential) harness."""
    data = pattern(512, 29)
    t = transmission(
        "pipelined", "Requests that arrive together are each answered with their own cookie (spec §4)."
    )
    start(t)
    batch = (
        request(cmd("WRITE"), 10, 0, 512)
        + data
        + request(cmd("READ"), 11, 0, 512)
        + request(cmd("FLUSH"), 12)
    )
    t.c2s(batch, "WRITE cookie 10, READ cookie 11, FLUSH cookie 12 in one segment")
    t.command("WRITE", 10, 0, 512, 0)
    t.command("READ", 11, 0, 512, 0)
    t.command("FLUSH", 12, 0, 0, 0)
    t.ok(10)
    t.read_reply(11, 0, data)
    t.ok(12)
    t.expect_flushes("disk", 1)
    return t


# ---------------------------------------------------------------- errors: handshake


@vector
def bad_client_flags() -> Vector:
    t = errors("bad_client_flags", "An unknown client flag bit: the server closes (spec §2.2).")
    t.s2c(greeting(), "greeting")
    t.c2s(u32(0x4 | v("NBD_FLAG_C_FIXED_NEWSTYLE")), "client flags 0x5 (bit 2 unknown)")
    t.closed = True
    return t


@vector
def bad_option_magic() -> Vector:
    t = errors(
        "bad_option_magic", "An option that does not start with IHAVEOPT: the server closes (spec §3.1)."
    )
    t.hello()
    t.c2s(u64(NBDMAGIC) + u32(opt("LIST")) + u32(0), "option header with NBDMAGIC instead of IHAVEOPT")
    t.closed = True
    return t


@vector
def option_too_long() -> Vector:
    t = errors(
        "option_too_long",
        "An option announcing more than 64 KiB of data: the server closes on the header (spec §3.1).",
    )
    t.hello()
    t.c2s(u64(IHAVEOPT) + u32(opt("INFO")) + u32(MAX_OPTION_LENGTH + 1), "NBD_OPT_INFO header, length 65537")
    t.closed = True
    return t


@vector
def export_name_unknown() -> Vector:
    t = errors(
        "export_name_unknown", "EXPORT_NAME for an unknown export: the server closes silently (spec §3.3)."
    )
    t.hello()
    t.c2s(option(opt("EXPORT_NAME"), b"nope"), "NBD_OPT_EXPORT_NAME 'nope'")
    t.event("aborted")
    t.closed = True
    return t


@vector
def access_denied() -> Vector:
    secret = Export("secret", 1 * MiB, "not for this client", access="denied")
    t = errors(
        "access_denied",
        "An export this client's access rules refuse: LIST leaves it out; INFO, GO and "
        "SET_META_CONTEXT get ERR_UNKNOWN, as an unknown name would, and haggling goes on; an open "
        "export still works (spec §3.7).",
        secret,
        disk(),
    )
    t.hello()
    t.c2s(option(opt("LIST")), "NBD_OPT_LIST")
    raw = b"disk"
    t.s2c(
        option_reply(opt("LIST"), rep("SERVER"), u32(len(raw)) + raw + b"test disk"),
        "SERVER 'disk' only: 'secret' is not shown to this client",
    )
    t.s2c(option_reply(opt("LIST"), rep("ACK")), "ACK")
    t.c2s(option(opt("INFO"), info_request("secret", [info("BLOCK_SIZE")])), "NBD_OPT_INFO 'secret'")
    t.denied(opt("INFO"), "secret", "INFO")
    t.structured_reply()
    t.c2s(
        option(opt("SET_META_CONTEXT"), meta_request("secret", [BASE_ALLOCATION])),
        "NBD_OPT_SET_META_CONTEXT 'secret'",
    )
    t.denied(opt("SET_META_CONTEXT"), "secret", "SET_META_CONTEXT")
    t.c2s(option(opt("GO"), info_request("secret", [info("BLOCK_SIZE")])), "NBD_OPT_GO 'secret'")
    t.denied(opt("GO"), "secret", "GO")
    t.go("disk")
    return t


@vector
def access_denied_export_name() -> Vector:
    t = errors(
        "access_denied_export_name",
        "EXPORT_NAME for an export this client may not open: the server closes silently (spec §3.3, §3.7).",
        Export("secret", 1 * MiB, access="denied"),
    )
    t.hello()
    t.c2s(option(opt("EXPORT_NAME"), b"secret"), "NBD_OPT_EXPORT_NAME 'secret'")
    t.event("access_denied", option=opt("EXPORT_NAME"), export="secret")
    t.closed = True
    return t


@vector
def read_only_grant() -> Vector:
    data = pattern(512, 29)
    t = errors(
        "read_only_grant",
        "A writable export that this client's rules open read-only: READ_ONLY is advertised, no "
        "TRIM or WRITE_ZEROES, reads work and writes get EPERM (spec §3.5, §3.7, §5.1).",
        Export("disk", 1 * MiB, "test disk", access="read-only", data=[(0, data)]),
    )
    start(t, structured=True)
    t.send("READ", 1, 0, 512)
    t.read_reply(1, 0, data)
    t.send("WRITE", 2, 0, 512, payload=bytes(512))
    t.fail(2, "EPERM", "export is read-only")
    t.send("WRITE_ZEROES", 3, 0, 512)
    t.fail(3, "EPERM", "export is read-only")
    t.expect_data("disk", 0, data)
    return t


@vector
def unknown_export() -> Vector:
    t = errors(
        "unknown_export",
        "INFO and GO for an unknown or empty name get ERR_UNKNOWN; a later GO works (spec §3.4).",
    )
    t.hello()
    for number, name in ((opt("GO"), "nope"), (opt("INFO"), ""), (opt("GO"), "")):
        label = "GO" if number == opt("GO") else "INFO"
        t.c2s(option(number, info_request(name, [info("BLOCK_SIZE")])), f"NBD_OPT_{label} {name!r}")
        t.refused(number, "ERR_UNKNOWN", not_found(name), label)
    t.go("disk")
    return t


@vector
def info_malformed() -> Vector:
    t = errors(
        "info_malformed",
        "Malformed INFO/GO data gets ERR_INVALID with a message, and haggling goes on (spec §3.4).",
    )
    t.hello()
    name = b"disk"
    cases = [
        (opt("INFO"), u32(0), "option payload too short"),
        (opt("INFO"), u32(3) + b"d" + u16(0), "name length exceeds option length"),
        (
            opt("GO"),
            u32(len(name)) + name + u16(2) + u16(info("BLOCK_SIZE")),
            "information request count mismatch",
        ),
        (opt("GO"), u32(2) + b"\xff\xfe" + u16(0), "export name is not valid UTF-8 text"),
    ]
    for number, data, message in cases:
        label = "GO" if number == opt("GO") else "INFO"
        t.c2s(option(number, data), f"NBD_OPT_{label} with bad data ({message})")
        t.refused(number, "ERR_INVALID", message, label)
    t.go("disk")
    return t


@vector
def list_with_data() -> Vector:
    t = errors("list_with_data", "LIST with data gets ERR_INVALID (spec §3.2).")
    t.hello()
    t.c2s(option(opt("LIST"), b"x"), "NBD_OPT_LIST with one data byte")
    t.refused(opt("LIST"), "ERR_INVALID", "LIST takes no payload", "LIST")
    return t


@vector
def structured_reply_with_data() -> Vector:
    t = errors(
        "structured_reply_with_data",
        "STRUCTURED_REPLY with data gets ERR_INVALID and is not enabled (spec §3.2).",
    )
    t.hello()
    t.c2s(option(opt("STRUCTURED_REPLY"), b"\0\0"), "NBD_OPT_STRUCTURED_REPLY with two data bytes")
    t.refused(opt("STRUCTURED_REPLY"), "ERR_INVALID", "STRUCTURED_REPLY takes no payload", "STRUCTURED_REPLY")
    t.go("disk")
    return t


@vector
def meta_before_structured() -> Vector:
    t = errors(
        "meta_before_structured",
        "SET_META_CONTEXT and LIST_META_CONTEXT before STRUCTURED_REPLY get ERR_INVALID (spec §3.6).",
    )
    t.hello()
    for label in ("SET_META_CONTEXT", "LIST_META_CONTEXT"):
        t.c2s(
            option(opt(label), meta_request("disk", [BASE_ALLOCATION])),
            f"NBD_OPT_{label} before structured replies",
        )
        t.refused(opt(label), "ERR_INVALID", "structured replies were not negotiated", label)
    t.go("disk")
    return t


@vector
def meta_malformed() -> Vector:
    t = errors(
        "meta_malformed",
        "Malformed meta-context requests get ERR_INVALID, an unknown export ERR_UNKNOWN (spec §3.6).",
    )
    t.hello()
    t.structured_reply()
    good = meta_request("disk", [BASE_ALLOCATION])
    cases = [
        (u32(0) + b"\0\0", "ERR_INVALID", "option payload too short"),
        (u32(9) + b"disk" + u32(0), "ERR_INVALID", "name length exceeds option length"),
        (u32(4) + b"disk" + u32(1) + u32(100) + b"base:", "ERR_INVALID", "truncated meta context query"),
        (good + b"\0", "ERR_INVALID", "trailing bytes after meta context queries"),
        (meta_request("nope", [BASE_ALLOCATION]), "ERR_UNKNOWN", not_found("nope")),
    ]
    for data, rtype, message in cases:
        t.c2s(option(opt("SET_META_CONTEXT"), data), f"NBD_OPT_SET_META_CONTEXT ({message})")
        t.refused(opt("SET_META_CONTEXT"), rtype, message, "SET_META_CONTEXT")
    t.go("disk")
    return t


# ---------------------------------------------------------------- errors: transmission


def range_message(offset: int, length: int, size: int) -> str:
    return f"request [{offset}, {offset + length}) beyond export size {size}"


@vector
def read_out_of_range_simple() -> Vector:
    t = errors(
        "read_out_of_range_simple", "A READ past the end: EINVAL in a simple reply, no data (spec §5.1)."
    )
    start(t)
    t.send("READ", 1, 1 * MiB - 512, 1024)
    t.fail(1, "EINVAL", "")
    t.send("READ", 2, 1 * MiB, 1)
    t.fail(2, "EINVAL", "")
    return t


@vector
def read_out_of_range_structured() -> Vector:
    t = errors(
        "read_out_of_range_structured",
        "A READ past the end under structured replies: an ERROR chunk with the message (spec §4.3, §5.1).",
    )
    start(t, structured=True)
    t.send("READ", 1, 1 * MiB - 512, 1024)
    t.fail(1, "EINVAL", range_message(1 * MiB - 512, 1024, 1 * MiB))
    return t


@vector
def write_past_end_simple() -> Vector:
    t = errors(
        "write_past_end_simple",
        "A WRITE past the end: its data is consumed, the reply is ENOSPC, and the next request is "
        "read correctly (spec §4.1, §5.1).",
    )
    start(t)
    t.send("WRITE", 1, 1 * MiB - 512, 1024, payload=pattern(1024))
    t.fail(1, "ENOSPC", "")
    t.send("READ", 2, 0, 512)
    t.read_reply(2, 0, bytes(512))
    return t


@vector
def write_past_end_structured() -> Vector:
    t = errors(
        "write_past_end_structured", "WRITE and WRITE_ZEROES past the end: ENOSPC ERROR chunks (spec §5.1)."
    )
    start(t, structured=True)
    t.send("WRITE", 1, 1 * MiB - 512, 1024, payload=pattern(1024))
    t.fail(1, "ENOSPC", range_message(1 * MiB - 512, 1024, 1 * MiB))
    t.send("WRITE_ZEROES", 2, 1 * MiB, 4096)
    t.fail(2, "ENOSPC", range_message(1 * MiB, 4096, 1 * MiB))
    return t


@vector
def range_errors_structured() -> Vector:
    t = errors("range_errors_structured", "TRIM, CACHE and BLOCK_STATUS past the end: EINVAL (spec §5.1).")
    start(t, structured=True, meta=True)
    for cookie, name in enumerate(("TRIM", "CACHE", "BLOCK_STATUS"), 1):
        t.send(name, cookie, 1 * MiB - 4096, 8192)
        t.fail(cookie, "EINVAL", range_message(1 * MiB - 4096, 8192, 1 * MiB))
    return t


@vector
def read_only() -> Vector:
    t = errors(
        "read_only",
        "On a read-only export WRITE, TRIM and WRITE_ZEROES get EPERM; READ and FLUSH work "
        "(spec §3.5, §5.1).",
        ro(),
    )
    start(t, "ro")
    t.send("WRITE", 1, 0, 512, payload=pattern(512))
    t.fail(1, "EPERM", "")
    t.send("TRIM", 2, 0, 4096)
    t.fail(2, "EPERM", "")
    t.send("WRITE_ZEROES", 3, 0, 4096)
    t.fail(3, "EPERM", "")
    t.send("READ", 4, 0, 512)
    t.read_reply(4, 0, bytes(512))
    t.send("FLUSH", 5)
    t.ok(5)
    t.expect_data("ro", 0, bytes(512))
    return t


@vector
def unknown_command() -> Vector:
    t = errors("unknown_command", "Unknown command types, RESIZE among them, get EINVAL (spec §5.1).")
    start(t, structured=True)
    t.c2s(request(42, 1, 0, 512), "command type 42")
    t.event("command", command="UNKNOWN", type=42, cookie=1, flags=0, offset=0, length=512)
    t.fail(1, "EINVAL", "unknown command 42")
    t.c2s(request(8, 2, 2 * MiB), "command type 8 (RESIZE, experimental upstream)")
    t.event("command", command="UNKNOWN", type=8, cookie=2, flags=0, offset=2 * MiB, length=0)
    t.fail(2, "EINVAL", "unknown command 8")
    return t


@vector
def bad_command_flags() -> Vector:
    t = errors(
        "bad_command_flags",
        "A flag not allowed on the command gets EINVAL, even on READ under structured "
        "replies; a WRITE's data is still consumed (spec §5.1).",
    )
    start(t, structured=True)
    cases = [
        ("READ", cflag("REQ_ONE"), None),
        ("READ", 0x80, None),
        ("WRITE", cflag("FAST_ZERO"), pattern(512)),
        ("BLOCK_STATUS", cflag("DF"), None),
        ("FLUSH", cflag("NO_HOLE"), None),
    ]
    for cookie, (name, flags, payload) in enumerate(cases, 1):
        length = 512 if name != "FLUSH" else 0
        t.send(name, cookie, 0, length, flags, payload=payload)
        t.fail(cookie, "EINVAL", f"flags {flags:#x} not valid for this command")
    t.send("READ", 6, 0, 512, cflag("FUA") | cflag("DF"))
    t.read_reply(6, 0, bytes(512))
    return t


@vector
def df_without_structured() -> Vector:
    t = errors(
        "df_without_structured",
        "DF is not advertised without structured replies, so it gets EINVAL (spec §3.5, §5.1).",
    )
    start(t)
    t.send("READ", 1, 0, 512, cflag("DF"))
    t.fail(1, "EINVAL", "")
    return t


@vector
def fast_zero_not_fast() -> Vector:
    data = pattern(4096, 31)
    t = errors(
        "fast_zero_not_fast",
        "FAST_ZERO on a node that cannot zero fast: ENOTSUP and nothing changes; the "
        "same request without FAST_ZERO succeeds (spec §5.8).",
        disk(fast_zero=False, data=[(0, data)]),
    )
    start(t, structured=True)
    t.send("WRITE_ZEROES", 1, 0, 4096, cflag("FAST_ZERO"))
    t.fail(1, "ENOTSUP", "zeroing this range is not faster than writing")
    t.send("READ", 2, 0, 4096)
    t.read_reply(2, 0, data)
    t.send("WRITE_ZEROES", 3, 0, 4096)
    t.ok(3)
    t.expect_data("disk", 0, bytes(4096))
    return t


@vector
def read_too_large() -> Vector:
    length = MAX_PAYLOAD_SERVED + 512
    t = errors("read_too_large", "A READ longer than 64 MiB inside the export: EINVAL (spec §5.1).", big())
    start(t, "big", structured=True)
    t.send("READ", 1, 0, length)
    t.fail(1, "EINVAL", f"read larger than {MAX_PAYLOAD_SERVED} bytes")
    return t


@vector
def write_too_large() -> Vector:
    length = MAX_PAYLOAD_SERVED + 512
    t = errors(
        "write_too_large",
        "A WRITE longer than 64 MiB inside the export: its data is read and discarded, "
        "then EINVAL; the next request is read correctly (spec §5.1, §5.3).",
        big(),
    )
    start(t, "big")
    t.c2s(request(cmd("WRITE"), 1, 0, length), f"WRITE cookie 1 offset 0 length {length} (header)")
    t.c2s_zeros(length, f"{length} data bytes")
    t.command("WRITE", 1, 0, length, 0)
    t.fail(1, "EINVAL", "")
    t.send("READ", 2, 0, 512)
    t.read_reply(2, 0, bytes(512))
    return t


@vector
def block_status_no_context() -> Vector:
    t = errors(
        "block_status_no_context", "BLOCK_STATUS without a selected context: EINVAL (spec §3.6, §5.1)."
    )
    start(t, structured=True)
    t.send("BLOCK_STATUS", 1, 0, 4096)
    t.fail(1, "EINVAL", "no metadata context was negotiated")
    return t


@vector
def block_status_other_export() -> Vector:
    t = errors(
        "block_status_other_export",
        "A context selected for another export does not carry over to the one GO picks (spec §3.6).",
        disk(),
        ro(),
    )
    t.hello()
    t.structured_reply()
    t.set_meta("ro", [BASE_ALLOCATION], [BASE_ALLOCATION])
    t.go("disk")
    t.send("BLOCK_STATUS", 1, 0, 4096)
    t.fail(1, "EINVAL", "no metadata context was negotiated")
    return t


@vector
def block_status_simple() -> Vector:
    t = errors(
        "block_status_simple",
        "BLOCK_STATUS without structured replies: EINVAL in a simple reply (spec §5.9).",
    )
    start(t)
    t.send("BLOCK_STATUS", 1, 0, 4096)
    t.fail(1, "EINVAL", "")
    return t


@vector
def block_status_zero_length() -> Vector:
    t = errors("block_status_zero_length", "BLOCK_STATUS of length 0: EINVAL (spec §5.1).")
    start(t, structured=True, meta=True)
    t.send("BLOCK_STATUS", 1, 4096, 0)
    t.fail(1, "EINVAL", "block status of an empty range")
    return t


@vector
def bad_request_magic() -> Vector:
    t = errors(
        "bad_request_magic", "A request with a wrong magic: the server closes without replying (spec §4.1)."
    )
    start(t)
    t.c2s(request(cmd("READ"), 1, 0, 512, magic=0x12560953), "READ with the historic magic 0x12560953")
    t.closed = True
    return t


# ============================================================ output


def render(t: Vector) -> str:
    return json.dumps(t.to_json(), indent=2, ensure_ascii=False) + "\n"


def generate() -> dict[Path, str]:
    out: dict[Path, str] = {}
    for build in BUILDERS:
        t = build()
        path = VECTORS / t.group / f"{t.name}.json"
        if path in out:
            raise SystemExit(f"two vectors named {t.group}/{t.name}")
        out[path] = render(t)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare with the committed files")
    args = ap.parse_args(argv)
    files = generate()
    existing = {p for p in VECTORS.glob("*/*.json")}
    stale = sorted(
        str(p.relative_to(ROOT))
        for p, text in files.items()
        if not p.exists() or p.read_text(encoding="utf-8") != text
    )
    extra = sorted(str(p.relative_to(ROOT)) for p in existing - files.keys())
    if args.check:
        for name in stale:
            print(f"stale or missing: {name}")
        for name in extra:
            print(f"not generated: {name}")
        return 1 if stale or extra else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for name in extra:
        (ROOT / name).unlink()
    print(f"{len(files)} vectors written ({len(stale)} changed, {len(extra)} removed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
