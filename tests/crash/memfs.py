"""An in-memory FileIO with a volatile write cache, for the crash harness.

Every file (an inode) has *durable* contents, what a power cut leaves, and a list of
*pending* operations done since its last fsync/fdatasync. Reads see durable + pending.
fsync/fdatasync make the file's pending operations durable; a write with `dsync=True`
(RWF_DSYNC) makes the 4 KiB pages it touches durable, as they are then;
`write_file_atomic` replaces a file durably and atomically (the new contents are synced
before the rename). Name-space operations
(create, unlink, the rename) are durable at once: the layers only rely on the rename being
atomic and on fsyncs of the files they create.

`crash_image(rng)` is what a power cut at this instant could leave: for every file, the
durable contents plus a random subset of its pending operations, applied in order, some
torn at 512-byte granularity (each sector of a torn write lands or does not). A harness
can take images at any instant (for example from `before_durable`, called just before
every durable operation: an image taken then is a crash *during* that operation) and keep
running, or set `crash_at = N` to raise `PowerCut` instead of doing the N-th durable
operation.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from blockvirt.storage.fileio import FileIO

SECTOR = 512
PAGE = 4096


class PowerCut(Exception):
    """Raised instead of the durable operation the harness chose to crash on."""


@dataclass(slots=True)
class Pending:
    """One operation not yet known to be durable."""

    kind: str  # "write" | "zero" | "size"
    offset: int = 0
    data: bytes = b""
    length: int = 0  # "zero": bytes zeroed; "size": the new file size
    sticky: bool = False  # a dsync write: durable whatever else is lost


def _apply(buf: bytearray, op: Pending, sectors: set[int] | None = None) -> None:
    """Apply `op` to `buf`; `sectors` (absolute sector numbers) limits it to a torn subset."""
    if op.kind == "size":
        if op.length < len(buf):
            del buf[op.length :]
        else:
            buf.extend(bytes(op.length - len(buf)))
        return
    if op.kind == "write":
        data = op.data
        n = len(data)
    else:
        data = b""
        n = op.length
    if not n:
        return
    start, end = op.offset, op.offset + n
    if sectors is None:
        pieces = [(start, end)]
    else:
        pieces = [(max(start, s * SECTOR), min(end, (s + 1) * SECTOR)) for s in sorted(sectors)]
    for a, b in pieces:
        if b > len(buf):
            buf.extend(bytes(b - len(buf)))
        buf[a:b] = data[a - start : b - start] if op.kind == "write" else bytes(b - a)


@dataclass(slots=True)
class Inode:
    durable: bytes = b""
    #: What reads see; None until first needed (then a copy of `durable`).
    cur: bytearray | None = None
    pending: list[Pending] = field(default_factory=list)

    @property
    def current(self) -> bytearray:
        if self.cur is None:
            self.cur = bytearray(self.durable)
        return self.cur

    @property
    def view(self) -> bytes | bytearray:
        """What reads see, without a copy."""
        return self.durable if self.cur is None else self.cur

    def do(self, op: Pending) -> None:
        _apply(self.current, op)
        self.pending.append(op)

    def sync(self) -> None:
        if self.pending:
            self.durable = bytes(self.current)
            self.pending.clear()

    def crash(self, rng: random.Random, mode: str) -> bytes:
        """Contents after a power cut. mode: "lose" (every pending op lost), "keep" (all
        land), "random" (each lands, is lost, or is torn at sector granularity), "tear"
        (each lands torn: a random part of its sectors, never all nor none if it has two
        or more)."""
        if not self.pending:
            return self.durable
        assert self.cur is not None
        if mode == "keep":
            return bytes(self.current)
        buf = bytearray(self.durable)
        for op in self.pending:
            if op.sticky:
                _apply(buf, op)
                continue
            if mode == "lose":
                continue
            r = 0.5 if mode == "tear" else rng.random()
            if r < 0.35:
                _apply(buf, op)
            elif r < 0.65 and op.kind != "size":
                n = len(op.data) if op.kind == "write" else op.length
                if not n:
                    continue
                sectors = list(range(op.offset // SECTOR, (op.offset + n - 1) // SECTOR + 1))
                if mode == "tear" and len(sectors) > 1:
                    part = set(rng.sample(sectors, rng.randrange(1, len(sectors))))
                else:
                    part = {s for s in sectors if rng.random() < 0.5}
                _apply(buf, op, part)
            # else: lost
        return bytes(buf)


class MemFileIO(FileIO):
    """FileIO on in-memory inodes with a volatile cache (see the module docstring)."""

    blocking = False

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.names: dict[str, Inode] = {}
        self.fds: dict[int, tuple[Inode, bool]] = {}
        self._next_fd = itertools.count(3)
        #: Called (with the operation's name) just before every durable operation.
        self.before_durable: Callable[[str], None] | None = None
        #: Raise PowerCut instead of the durable operation with this (1-based) number.
        self.crash_at: int | None = None
        self.durable_ops = 0
        #: Every operation, in order: (name, path or "", offset, length).
        self.log: list[tuple[str, str, int, int]] = []
        for path, data in (files or {}).items():
            self.names[path] = Inode(bytes(data))

    # ------------------------------------------------------------ crash control
    def _durable(self, what: str) -> None:
        self.durable_ops += 1
        if self.crash_at is not None and self.durable_ops >= self.crash_at:
            raise PowerCut(f"power cut at durable operation {self.durable_ops} ({what})")
        if self.before_durable is not None:
            self.before_durable(what)

    def crash_image(self, rng: random.Random, mode: str = "random") -> dict[str, bytes]:
        """What a power cut now could leave, file by file."""
        return {path: ino.crash(rng, mode) for path, ino in self.names.items()}

    def pending_ops(self) -> int:
        return sum(len(ino.pending) for ino in self.names.values())

    def _path_of(self, ino: Inode) -> str:
        return next((p for p, i in self.names.items() if i is ino), "<unlinked>")

    def _ino(self, fd: int, *, write: bool = False) -> Inode:
        ino, writable = self.fds[fd]
        if write and not writable:
            raise OSError(9, "file not open for writing")
        return ino

    # ------------------------------------------------------------ FileIO
    def open(self, path: str, *, write: bool, create: bool = False) -> int:
        ino = self.names.get(path)
        if create:
            if ino is not None:
                raise FileExistsError(17, "File exists", path)
            ino = self.names[path] = Inode()
        elif ino is None:
            raise FileNotFoundError(2, "No such file or directory", path)
        fd = next(self._next_fd)
        self.fds[fd] = (ino, write)
        return fd

    def close(self, fd: int) -> None:
        del self.fds[fd]

    def size(self, fd: int) -> int:
        return len(self._ino(fd).view)

    def allocated(self, fd: int) -> int:
        return len(self._ino(fd).view)

    def truncate(self, fd: int, size: int) -> None:
        self.log.append(("truncate", "", size, 0))
        self._ino(fd, write=True).do(Pending("size", length=size))

    def preallocate(self, fd: int, size: int) -> None:
        self.log.append(("preallocate", "", 0, size))
        ino = self._ino(fd, write=True)
        if size > len(ino.current):
            ino.do(Pending("size", length=size))

    def reserve(self, fd: int, offset: int, length: int) -> bool:
        self.log.append(("reserve", "", offset, length))
        return True  # allocation is not modelled: contents and durability do not change

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        cur = self._ino(fd).view
        data = bytes(cur[offset : offset + length])
        return data + bytes(length - len(data))

    def preadv_nowait(self, fd: int, buf: bytearray | memoryview, offset: int) -> bool:
        buf[:] = self.pread(fd, len(buf), offset)
        return True

    def view_nowait(self, fd: int, offset: int, length: int) -> memoryview | None:
        return memoryview(self.pread(fd, length, offset))  # a copy: these inodes are not files

    def pwrite(
        self, fd: int, data: bytes | bytearray | memoryview, offset: int, *, dsync: bool = False
    ) -> None:
        ino = self._ino(fd, write=True)
        self.log.append(("pwrite", self._path_of(ino), offset, len(data)))
        if not dsync:
            ino.do(Pending("write", offset, bytes(data)))
            return
        self._durable("pwrite-dsync")
        ino.do(Pending("write", offset, bytes(data)))
        # RWF_DSYNC writes back the whole pages the write touched (with whatever earlier
        # writes put in them): those pages' current contents are durable from now on.
        start = offset // PAGE * PAGE
        end = min(len(ino.current), -(-(offset + len(data)) // PAGE) * PAGE)
        ino.pending.append(Pending("write", start, bytes(ino.current[start:end]), sticky=True))

    def fdatasync(self, fd: int) -> None:
        ino = self._ino(fd)
        self.log.append(("fdatasync", self._path_of(ino), 0, 0))
        self._durable("fdatasync")
        ino.sync()

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """A hint: durability still comes only from the syncs."""

    def fsync(self, fd: int) -> None:
        ino = self._ino(fd)
        self.log.append(("fsync", self._path_of(ino), 0, 0))
        self._durable("fsync")
        ino.sync()

    def punch(self, fd: int, offset: int, length: int) -> None:
        ino = self._ino(fd, write=True)
        self.log.append(("punch", self._path_of(ino), offset, length))
        ino.do(Pending("zero", offset, length=min(length, max(0, len(ino.current) - offset))))

    def zero_allocated(self, fd: int, offset: int, length: int) -> None:
        ino = self._ino(fd, write=True)
        self.log.append(("zero", self._path_of(ino), offset, length))
        ino.do(Pending("zero", offset, length=min(length, max(0, len(ino.current) - offset))))

    def write_zeroes(self, fd: int, offset: int, length: int) -> None:
        self.pwrite(fd, bytes(length), offset)

    def read_file(self, path: str) -> bytes:
        ino = self.names.get(path)
        if ino is None:
            raise FileNotFoundError(2, "No such file or directory", path)
        return ino.durable if ino.cur is None else bytes(ino.cur)

    def write_file_atomic(self, path: str, data: bytes) -> None:
        self.log.append(("write_file_atomic", path, 0, len(data)))
        self._durable("write_file_atomic")
        self.names[path] = Inode(bytes(data))

    def fsync_dir(self, path: str) -> None:
        self.log.append(("fsync_dir", path, 0, 0))

    def exists(self, path: str) -> bool:
        return path in self.names

    def unlink(self, path: str) -> None:
        self.log.append(("unlink", path, 0, 0))
        self.names.pop(path, None)
