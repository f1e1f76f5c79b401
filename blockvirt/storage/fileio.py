"""File operations used by the copy-on-write layers, behind one small interface, so the crash
harness can swap in a recording implementation that loses unsynced writes on a "crash".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 2
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_DSYNC = getattr(os, "RWF_DSYNC", 0)
#: Buffered writes larger than this go to the page cache in pieces of this size. ext4 (6.x)
#: caches a write in a folio as large as the write, and a later small write into a large
#: folio walks every block buffer of it: a 4k write into pages a 1M write cached costs
#: about 1.7x one into pages 256k writes cached, and smaller pieces gain no more while each
#: 1M write pays for more calls (docs/performance.md, "Large writes in pieces").
WRITE_PIECE = 256 * 1024


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


#: cachestat(2) (Linux 6.5+; new system calls have one number on every architecture): how
#: many pages of a file range are in the page cache, without touching them.
_SYS_CACHESTAT = 451
_syscall = _libc.syscall
_syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
_syscall.restype = ctypes.c_long
#: Only view_nowait uses these, on the event loop's thread.
_CS_RANGE = _CachestatRange()
_CS = _Cachestat()
_CS_RANGE_P = ctypes.addressof(_CS_RANGE)
_CS_P = ctypes.addressof(_CS)
_PAGE = mmap.PAGESIZE
#: Views are worth a system call from this size on (below it, pread's copy is as cheap).
VIEW_MIN = 64 * 1024
#: Address space given to file mappings at most (sparse thin files are mapped whole).
_MAP_BUDGET = 32 << 40


class _Maps:
    """Read-only shared mappings of open data files, by file descriptor (process-wide, as
    descriptors are). A mapping is dropped when its file is closed or truncated through
    FileIO; views handed out keep it alive until they are released."""

    def __init__(self) -> None:
        self.by_fd: dict[int, mmap.mmap] = {}
        self.mapped = 0
        #: False once the kernel said it has no cachestat(2): views are never offered then.
        self.supported = True

    def get(self, fd: int, end: int) -> mmap.mmap | None:
        m = self.by_fd.get(fd)
        if m is not None and end <= len(m):
            return m
        size = os.fstat(fd).st_size
        if end > size:
            return None  # past the end: the mapping (if any) stays
        self.drop(fd)  # absent, or the file grew since it was mapped
        if self.mapped + size > _MAP_BUDGET:
            return None
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self.by_fd[fd] = m
        self.mapped += size
        return m

    def drop(self, fd: int) -> None:
        m = self.by_fd.pop(fd, None)
        if m is not None:
            self.mapped -= len(m)
            try:
                m.close()
            except BufferError:
                pass  # a view is still out: the mapping goes with the last one


MAPS = _Maps()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class FileIO:
    """The real thing: POSIX calls on file descriptors."""

    #: Whether blocking calls should leave the event loop (False for in-memory test doubles).
    blocking = True
    #: A fault injector (storage/faults.py): then ask `slow_writes` before writing inline.
    faulty = False

    def slow_writes(self, fd: int) -> bool:
        """Whether writes to fd are slowed on purpose (they must then leave the loop)."""
        return False

    def open(self, path: str, *, write: bool, create: bool = False) -> int:
        flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        return os.open(path, flags, 0o600)

    def close(self, fd: int) -> None:
        MAPS.drop(fd)
        os.close(fd)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def allocated(self, fd: int) -> int:
        return os.fstat(fd).st_blocks * 512

    def truncate(self, fd: int, size: int) -> None:
        MAPS.drop(fd)  # a mapping past the new end would fault (SIGBUS) where it is read
        os.ftruncate(fd, size)

    def preallocate(self, fd: int, size: int) -> None:
        os.posix_fallocate(fd, 0, size)

    def reserve(self, fd: int, offset: int, length: int) -> bool:
        """Allocate the file's blocks of a range ahead of writes into it (unwritten extents:
        they read as zeros, and the data already there stays). A hint: False if the file
        system would not (full, or no fallocate); the writes then allocate as they go.
        fallocate(2) itself, never glibc's posix_fallocate, which writes where the file system
        cannot allocate."""
        try:
            fallocate(fd, 0, offset, length)
        except OSError:
            return False
        return True

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        data = os.pread(fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def preadv_nowait(self, fd: int, buf: bytearray | memoryview, offset: int) -> bool:
        """Fill buf from the page cache without blocking; False if that is not possible."""
        try:
            n = os.preadv(fd, [buf], offset, _NOWAIT) if _NOWAIT else -1
        except OSError:
            return False
        if n == len(buf):
            return True
        # Short: past EOF of a shorter file reads as zeros; anything else is "not cached".
        if n >= 0 and offset + n >= self.size(fd):
            memoryview(buf)[n:] = bytes(len(buf) - n)
            return True
        return False

    def view_nowait(self, fd: int, offset: int, length: int) -> memoryview | None:
        """The range's bytes as a read-only view of the page cache (no copy), if every page
        of it is cached and inside the file; else None (read it with pread).

        The view is borrowed: it shows the file as it is when read, so the caller must hand
        it on (a socket send copies it) before it next yields to the event loop. Only pages
        the page cache holds are touched, so no read from the disk (nor its errors) happens
        through the mapping. For the event loop's thread only.
        """
        if not MAPS.supported:
            return None
        end = offset + length
        try:
            m = MAPS.get(fd, end)
        except (OSError, ValueError):
            return None
        if m is None:
            return None
        _CS_RANGE.off = offset
        _CS_RANGE.len = length
        if _syscall(_SYS_CACHESTAT, fd, _CS_RANGE_P, _CS_P, 0) != 0:
            if ctypes.get_errno() == errno.ENOSYS:
                MAPS.supported = False
            return None
        if _CS.nr_cache != (end + _PAGE - 1) // _PAGE - offset // _PAGE:
            return None
        return memoryview(m)[offset:end]

    def pwrite(
        self, fd: int, data: bytes | bytearray | memoryview, offset: int, *, dsync: bool = False
    ) -> None:
        if not dsync:
            if len(data) <= WRITE_PIECE:  # one call, nearly always: the loop below is for short writes
                n = os.pwrite(fd, data, offset)
                if n == len(data):
                    return
                data = memoryview(data)[n:]
                offset += n
            else:
                self._pwrite_pieces(fd, memoryview(data), offset)
                return
        view = memoryview(data)
        while view:
            n = os.pwritev(fd, [view], offset, _DSYNC) if dsync and _DSYNC else os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    @staticmethod
    def _pwrite_pieces(fd: int, view: memoryview, offset: int) -> None:
        """A large buffered write, WRITE_PIECE at a time (see WRITE_PIECE)."""
        end = len(view)
        done = 0
        while done < end:
            done += os.pwrite(fd, view[done : done + WRITE_PIECE], offset + done)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """Ask the kernel to start writing a range back now, without waiting (a bulk copy
        does this as it goes, so the fdatasync that ends it has little left to do)."""
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)

    def punch(self, fd: int, offset: int, length: int) -> None:
        """Deallocate (reads as zeros afterwards)."""
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.write_zeroes(fd, offset, length)

    def zero_allocated(self, fd: int, offset: int, length: int) -> None:
        """Zero and keep (or make) the range allocated."""
        try:
            fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.write_zeroes(fd, offset, length)

    def write_zeroes(self, fd: int, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.pwrite(fd, memoryview(chunk)[:n], offset)
            offset += n

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def write_file_atomic(self, path: str, data: bytes) -> None:
        """Replace `path` with `data`: temp file, fsync, rename, fsync the directory."""
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.fsync_dir(os.path.dirname(path))

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


REAL = FileIO()
