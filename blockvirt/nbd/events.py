"""Typed events the codec produces: one dataclass per message kind.

Server role: handshake outcomes and transmission commands. Client role: option results and
completed replies.

Every event is frozen except the transmission commands, which are made once per request:
a frozen dataclass's `__init__` sets each field through `object.__setattr__`, and that cost
about 4k instructions per request, a tenth of a QD16 read (`tools/bench/instr.py`). Nothing
changes a command after the codec made it; nothing hashes one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ---------------------------------------------------------------- export description


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server knows about an export at negotiation time (asked afresh each time)."""

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_multi_conn: bool = True
    can_df: bool = True
    rotational: bool = False
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 32 * 1024 * 1024
    #: Metadata contexts this export can answer BLOCK_STATUS for.
    contexts: tuple[str, ...] = ("base:allocation",)


@dataclass(frozen=True, slots=True)
class ExportDenied:
    """An `ExportCatalog`'s answer for an export that exists but this client may not open.

    `reason` is for the server's log only; the client is told nothing but "access denied".
    With `elsewhere` (the export is served by another node of a cluster, not refused), the
    client is told that message instead: where to go."""

    name: str
    reason: str = ""
    elsewhere: str | None = None


@dataclass(frozen=True, slots=True)
class ExportUnavailable:
    """An `ExportCatalog`'s answer for an export this client may open but that cannot be
    opened now (its storage is damaged). `reason` is told to the client, so it names no
    server path; the details go to the server's log."""

    name: str
    reason: str


# ---------------------------------------------------------------- server role: handshake


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The client asked for STARTTLS and we acked it: upgrade the transport now."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Handshake done: transmission starts on `export`."""

    export: ExportInfo
    transmission_flags: int
    structured: bool
    #: context id -> context name, as selected by the last SET_META_CONTEXT for this export.
    contexts: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Aborted:
    """The client sent NBD_OPT_ABORT (or an EXPORT_NAME we cannot serve): close."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class AccessDenied:
    """The catalog refused this client the export an option named (for logs and metrics).

    After INFO, GO or a META_CONTEXT option the client was answered NBD_REP_ERR_UNKNOWN, the
    same reply as for a name that does not exist, and
    haggling goes on. After EXPORT_NAME, which has no error reply, `closed` is set: the
    handshake is over and the adapter must drop the connection."""

    option: int
    export: str
    reason: str
    closed: bool = False
    #: Not a refusal but a redirection: another node serves the export (the message says).
    elsewhere: str | None = None


@dataclass(frozen=True, slots=True)
class OptionRefused:
    """An option was answered with an error; informational (for logs and metrics)."""

    option: int
    reply: int
    message: str


# ---------------------------------------------------------------- server role: transmission


@dataclass(slots=True)
class Command:
    cookie: int
    flags: int  # CmdFlag bits; kept a plain int on the hot path
    offset: int
    length: int


@dataclass(slots=True)
class ReadCmd(Command):
    pass


@dataclass(slots=True)
class WriteCmd(Command):
    #: The payload; None when it was too large to buffer and was skipped (reply EINVAL).
    data: bytes | bytearray | memoryview | None


@dataclass(slots=True)
class FlushCmd(Command):
    pass


@dataclass(slots=True)
class TrimCmd(Command):
    pass


@dataclass(slots=True)
class CacheCmd(Command):
    pass


@dataclass(slots=True)
class WriteZeroesCmd(Command):
    pass


@dataclass(slots=True)
class BlockStatusCmd(Command):
    pass


@dataclass(slots=True)
class DiscCmd(Command):
    pass


@dataclass(slots=True)
class UnknownCmd(Command):
    type: int


# ---------------------------------------------------------------- client role


@dataclass(frozen=True, slots=True)
class OptionResult:
    """Everything the server said to one option, up to and including the final reply."""

    option: int
    reply: int  # final reply type (Rep.ACK or an error)
    message: str = ""
    exports: tuple[tuple[str, str], ...] = ()  # LIST: (name, description)
    contexts: tuple[tuple[int, str], ...] = ()  # *_META_CONTEXT: (id, name)
    export: ExportInfo | None = None  # INFO/GO/EXPORT_NAME
    transmission_flags: int = 0


@dataclass(frozen=True, slots=True)
class Extent:
    length: int
    flags: int


@dataclass(frozen=True, slots=True)
class Reply:
    """A completed reply to one request (all chunks gathered)."""

    cookie: int
    error: int = 0
    message: str = ""
    data: bytes | None = None  # READ
    extents: dict[int, tuple[Extent, ...]] | None = None  # BLOCK_STATUS: ctx id -> extents
    #: READ via structured replies: the chunk kinds received ('data'/'hole'), for tests.
    chunks: tuple[tuple[str, int, int], ...] = ()
