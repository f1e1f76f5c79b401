"""Wire constants of the NBD protocol (fixed newstyle), as named in the upstream spec.

protocol/spec.md is the prose twin of this file; tests/unit/test_spec_tables.py checks they agree.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: Longest name or description we accept or send (spec: MUST be <= 4096 bytes).
MAX_STRING = 4096
#: Option payloads above this are treated as a denial-of-service attempt (connection closed).
MAX_OPTION_LENGTH = 64 * 1024
#: Largest payload we advertise in NBD_INFO_BLOCK_SIZE (the spec's 32 MiB default).
MAX_PAYLOAD_ADVERTISED = 32 * 1024 * 1024
#: Largest READ/WRITE we actually serve: generous, since nbd-tester-client sends ~48 MiB.
MAX_PAYLOAD_SERVED = 64 * 1024 * 1024


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9
    ERR_EXT_HEADER_REQD = _ERR + 10

    @property
    def is_error(self) -> bool:
        return bool(self & _ERR)


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


#: Which command flags are meaningful on which command (FUA is accepted everywhere, per spec).
ALLOWED_CMD_FLAGS: dict[Cmd, CmdFlag] = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}


class ReplyFlag(IntFlag):
    DONE = 1 << 0


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Errno(IntEnum):
    """The only error values allowed on the wire."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class BlockState(IntFlag):
    """Flags of the base:allocation metadata context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"
QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
#: qemu's registered namespace: `qemu:dirty-bitmap:NAME` contexts (we name them after snapshots).
QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"


class DirtyState(IntFlag):
    """Flags of a qemu:dirty-bitmap:NAME metadata context (qemu's docs/interop/nbd.rst)."""

    DIRTY = 1 << 0
