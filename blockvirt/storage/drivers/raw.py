"""Protocol driver: a raw file in a pool directory, thin (sparse) or thick (preallocated).

Page-cache reads are served inline with RWF_NOWAIT (about 1.7 us) and fall back to the thread
pool when the data is not cached. Small buffered writes go inline too (they only copy into the
page cache); large writes, FUA writes, syncs and fallocate calls go to the pool.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from blockvirt.storage import executor
from blockvirt.storage.fileio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)
from blockvirt.storage.node import (
    HOLE,
    SPARSE_READ_MIN,
    ZERO,
    BlockNode,
    Buffer,
    Capabilities,
    Segment,
    StorageError,
)

#: Writes up to this size are copied into the page cache inline on the loop.
INLINE_WRITE_MAX = 64 * 1024
#: At most this many hole/data segments in one READ reply (reads of SPARSE_READ_MIN or more
#: look for holes first so they can be sent as hole chunks).
MAX_READ_SEGMENTS = 64
#: At most this many extents per block-status answer (clients loop for the rest).
MAX_EXTENTS = 16384

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_DSYNC = getattr(os, "RWF_DSYNC", 0)


def _storage_error(e: OSError, what: str) -> StorageError:
    return StorageError(e.errno or errno.EIO, f"{what}: {e.strerror}")


class RawFileNode(BlockNode):
    def __init__(self, path: str, *, read_only: bool = False, thick: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.thick = thick
        self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        self._size = os.fstat(self.fd).st_size
        self._flusher = executor.FlushCoalescer(self._sync)
        self._punch_ok = True

    # ------------------------------------------------------------ creation
    @staticmethod
    def create(path: str, size: int, *, thick: bool = False) -> None:
        """Create the backing file: sparse, or fully allocated (reads as zeros)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            if thick and size:
                os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)

    @property
    def size(self) -> int:
        return self._size

    def capabilities(self) -> Capabilities:
        return Capabilities(writable=not self.read_only)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    # ------------------------------------------------------------ reads
    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        if not _NOWAIT:
            return None
        buf = bytearray(length)
        try:
            n = os.preadv(self.fd, [buf], offset, _NOWAIT)
        except BlockingIOError:
            return None
        except OSError:
            return None  # let the async path report it properly
        return buf if n == length else None

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # the file may be shorter than the volume (never past EOF here)
            data += bytes(length - len(data))
        return data

    async def read(self, offset: int, length: int) -> Buffer:
        try:
            return await executor.run(self._pread, offset, length)
        except OSError as e:
            raise _storage_error(e, "read") from e

    async def read_sparse(self, offset: int, length: int) -> Sequence[Segment]:
        if length < SPARSE_READ_MIN:
            return [(offset, length, await self.read(offset, length))]
        try:
            return await executor.run(self._read_sparse, offset, length)
        except OSError as e:
            raise _storage_error(e, "read") from e

    def read_sparse_nowait(self, offset: int, length: int) -> Sequence[Segment] | None:
        if length < SPARSE_READ_MIN:
            data = self.read_nowait(offset, length)
            return None if data is None else [(offset, length, data)]
        try:
            extents = self._extents(offset, length, MAX_READ_SEGMENTS)
        except OSError:
            return None
        out: list[Segment] = []
        pos = offset
        for ln, flags in extents:
            if flags & ZERO:
                out.append((pos, ln, None))
            else:
                data = self.read_nowait(pos, ln)
                if data is None:
                    return None
                out.append((pos, ln, data))
            pos += ln
        if pos < offset + length:  # more extents than we map at once: read the tail as data
            data = self.read_nowait(pos, offset + length - pos)
            if data is None:
                return None
            out.append((pos, offset + length - pos, data))
        return out

    def _read_sparse(self, offset: int, length: int) -> list[Segment]:
        out: list[Segment] = []
        pos = offset
        end = offset + length
        while pos < end:
            ext = self._extents(pos, end - pos, 1)
            ln, flags = ext[0]
            ln = min(ln, end - pos)
            out.append((pos, ln, None if flags & ZERO else self._pread(pos, ln)))
            pos += ln
        return out

    # ------------------------------------------------------------ writes
    def _pwrite(self, offset: int, data: Buffer, flags: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwritev(self.fd, [view], offset, flags) if flags else os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        if len(data) > INLINE_WRITE_MAX:
            return False
        try:
            self._pwrite(offset, data, 0)
        except OSError as e:
            raise _storage_error(e, "write") from e
        return True

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if not fua and self.write_nowait(offset, data):
            return
        try:
            await executor.run(self._pwrite, offset, data, _DSYNC if fua else 0)
        except OSError as e:
            raise _storage_error(e, "write") from e

    def _zero(self, offset: int, length: int, punch: bool) -> None:
        if punch and self._punch_ok:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._punch_ok = False
        if self.thick:
            # Preallocated: ZERO_RANGE keeps the blocks allocated (unwritten), and every block
            # of a thick file reports as data whatever SEEK_DATA says of unwritten ones.
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        # Thin and not punching (NO_HOLE): write real zeros. ZERO_RANGE would leave unwritten
        # extents, which SEEK_DATA skips: block status would call allocated blocks holes.
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self._pwrite(offset, chunk[:n], 0)
            offset += n

    async def zero(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        try:
            await executor.run(self._zero, offset, length, may_trim and not self.thick)
            if fua:
                await self.flush()
        except OSError as e:
            raise _storage_error(e, "write zeroes") from e

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # Thin: give the space back. Thick: keep it allocated, but zero it all the same,
        # so a trimmed range always reads as zeros.
        await self.zero(offset, length, may_trim=True, fua=fua)

    def _fdatasync(self) -> None:
        os.fdatasync(self.fd)

    async def _sync(self) -> None:
        await executor.run(self._fdatasync)

    async def flush(self) -> None:
        if self.read_only:
            return
        try:
            await self._flusher.flush()
        except OSError as e:
            raise _storage_error(e, "flush") from e

    def _extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        end = min(offset + length, self._size)
        pos = offset
        while pos < end and len(out) < limit:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = self._size
            if data > pos:
                stop = min(data, end)
                # Thick: the range is allocated (unwritten extents), so not a HOLE.
                out.append((stop - pos, ZERO if self.thick else HOLE | ZERO))
                pos = stop
                continue
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            stop = min(hole, end)
            out.append((stop - pos, 0))
            pos = stop
        return out

    async def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        try:
            return await executor.run(self._extents, offset, length, MAX_EXTENTS)
        except OSError as e:
            raise _storage_error(e, "block status") from e

    async def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
