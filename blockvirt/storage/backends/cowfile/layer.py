"""A copy-on-write layer: its two files, its block map and its journal.

A layer is two files in its pool: `<id>.data`, sparse, holding block b at offset b*4096
(the host file system allocates space as blocks are written), and `<id>.map`, the journal of
block states (see layout.py).

Durability is that of a disk with a volatile cache: a write's data goes to the data file
before any metadata that points at it, and metadata reaches the journal only on FLUSH (or
FUA), after an fdatasync of the data. A crash loses at most unflushed writes, and every block
then reads its old or its new contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import time
from collections.abc import Callable, Iterator

from blockvirt.storage import executor
from blockvirt.storage.backends.cowfile import layout
from blockvirt.storage.backends.cowfile.layer_map import BLOCK, CLUSTER_BLOCKS, LayerMap
from blockvirt.storage.fileio import FileIO
from blockvirt.storage.node import Buffer, StorageError

#: Rewrite the journal as one compact batch once it is this large and mostly superseded.
COMPACT_AT = 8 * 1024 * 1024
#: A commit reads this many changed clusters' states per loop turn (about a millisecond at
#: worst, one cluster per page) ...
STATES_PER_TURN = 512
#: ... and, before compacting the journal, this many pages' states.
PAGES_PER_TURN = 32
#: A commit's journal append this small may run on the loop with its data sync (see SyncGuard).
SMALL_APPEND = 64 * 1024
#: Layer files (and their temp files) in a pool directory: the only files blockvirt removes.
LAYER_FILE_RE = re.compile(r"[0-9a-f]{32}\.(?:data|map)(?:\.tmp)?")


def layer_paths(pool_dir: str, layer_id: str) -> tuple[str, str]:
    return os.path.join(pool_dir, f"{layer_id}.data"), os.path.join(pool_dir, f"{layer_id}.map")


def remove_layer_files(io: FileIO, pool_dir: str, layer_id: str) -> None:
    """Remove a layer's files in one pool directory, and any temp file a write left (blocking;
    missing files are fine)."""
    for path in layer_paths(pool_dir, layer_id):
        io.unlink(path)
        io.unlink(path + ".tmp")


class _Slots:
    """Small integer ids for open layers (the merged index stores these, 2 bytes each)."""

    def __init__(self) -> None:
        self._next = 1
        self._free: list[int] = []

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next > 0xFFFF:
            raise StorageError(errno.EMFILE, "too many open layers")
        self._next += 1
        return self._next - 1

    def give(self, slot: int) -> None:
        self._free.append(slot)


SLOTS = _Slots()


def oserror(e: OSError, what: str) -> StorageError:
    return StorageError(e.errno or errno.EIO, f"{what}: {e.strerror or e}")


class Layer:
    """One layer: its data file descriptor, its block map and (if writable) its journal."""

    def __init__(
        self,
        layer_id: str,
        pool_dir: str,
        size: int,
        lmap: LayerMap,
        fd: int,
        map_fd: int | None,
        map_end: int,
        seq: int,
        io: FileIO,
    ) -> None:
        self.id = layer_id
        self.pool_dir = pool_dir
        self.size = size
        self.map = lmap
        self.fd = fd
        self.map_fd = map_fd
        self.map_end = map_end
        self.seq = seq
        self.io = io
        self.slot = SLOTS.take()
        self.refs = 0  # chains using this layer (the registry closes it at zero)
        self._flusher = executor.FlushCoalescer(self._commit)
        self._committing = False  # a commit's entries are taken but not yet journaled
        self._commits = 0  # commit() calls under way: close() waits for them (see close)
        #: close() was called while commits were under way: the last one to end closes.
        self.close_pending = False
        #: (first, count) block ranges guest writes are filling: a stream leaves them alone.
        self.filling: list[tuple[int, int]] = []
        #: Whether the file holds so little dirty data that a sync of it is quick: set by the
        #: chain whose head this is (true while only FUA writes are unsynced; see _sync_inline).
        self.small_sync: Callable[[], bool] = no_small_sync
        self.sync_guard = SyncGuard()
        #: The data file grows by aligned units of this many bytes (0: by the file system's
        #: blocks): set by the chain whose thin base layer this is (see reserve).
        self.unit = 0
        self._reserved = bytearray()  # one bit per unit reserved since the layer was opened

    @property
    def writable(self) -> bool:
        return self.map_fd is not None

    # ------------------------------------------------------------ files
    @staticmethod
    def create(io: FileIO, pool_dir: str, layer_id: str, size: int, *, thick: bool = False) -> None:
        """Create an empty layer (blocking). Thick layers preallocate and hold every block."""
        data_path, map_path = layer_paths(pool_dir, layer_id)
        fd = io.open(data_path, write=True, create=True)
        try:
            io.truncate(fd, size)
            if thick and size:
                io.preallocate(fd, size)
            io.fsync(fd)
        finally:
            io.close(fd)
        flags = layout.FLAG_ALL_DATA if thick else 0
        header = layout.Header(flags, BLOCK, bytes.fromhex(layer_id)[:16].ljust(16, b"\0"))
        io.write_file_atomic(map_path, layout.encode_header(header))

    @classmethod
    def open(cls, io: FileIO, pool_dir: str, layer_id: str, size: int, *, writable: bool) -> Layer:
        """Open and replay the journal (blocking). A torn tail is cut off when writable."""
        data_path, map_path = layer_paths(pool_dir, layer_id)
        raw = io.read_file(map_path)
        header = layout.decode_header(raw)
        nblocks = -(-size // BLOCK)
        lmap = LayerMap(nblocks, all_data=header.all_data)
        replay = layout.decode_journal(raw)
        for cluster, data, zero in replay.entries:
            lmap.apply_cluster(cluster, data, zero)
        lmap.clip()
        lmap.dirty.clear()
        # The data file is always opened read-write: a merge may stream into an immutable
        # layer; whether the layer takes guest writes is the chain's business.
        fd = io.open(data_path, write=True)
        map_fd = None
        if writable:
            map_fd = io.open(map_path, write=True)
            if replay.torn:
                io.truncate(map_fd, replay.valid_end)
                io.fsync(map_fd)
        return cls(layer_id, pool_dir, size, lmap, fd, map_fd, replay.valid_end, replay.next_seq, io)

    def close(self) -> None:
        """Close the files, or, while a commit is under way, as soon as the last one ends.

        A FLUSH passes an export's drain (a drain must not wait for an fdatasync), so a
        migration's switchover can retire the source layers while a FLUSH still commits
        there; its thread uses these descriptors, which must not be closed (or reused by
        another open) under it. The commit ends normally, on files that are garbage now."""
        if self._commits:
            self.close_pending = True
            return
        self._close_now()

    def _close_now(self) -> None:
        self.close_pending = False
        if self.fd >= 0:
            self.io.close(self.fd)
            self.fd = -1
        if self.map_fd is not None:
            self.io.close(self.map_fd)
            self.map_fd = None
        SLOTS.give(self.slot)

    def revive(self) -> None:
        """Keep a layer whose close is pending open after all (opened again meanwhile)."""
        self.close_pending = False

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close_journal(self) -> None:
        """Stop appending (a copy that is complete and committed stays read-only)."""
        if self.map_fd is not None:
            self.io.close(self.map_fd)
            self.map_fd = None

    def open_journal(self) -> None:
        """Start appending to the journal (a merge writing into an immutable layer)."""
        if self.map_fd is None:
            _, map_path = layer_paths(self.pool_dir, self.id)
            self.map_fd = self.io.open(map_path, write=True)

    def allocated_bytes(self) -> int:
        return self.io.allocated(self.fd) if self.fd >= 0 else 0

    def resize_file(self, size: int) -> None:
        """Set the data file's size (blocking): growing keeps it sparse, or preallocates the
        new range for a thick layer; shrinking frees everything past the end."""
        old = self.io.size(self.fd)
        if size > old and self.map.all_data:
            self.io.preallocate(self.fd, size)
        self.io.truncate(self.fd, size)
        self.size = size
        self._reserved = bytearray()  # a shrink freed units; a grow punches the new range

    def reserve(self, offset: int, length: int) -> None:
        """Before a small write into blocks this layer does not hold: have the file system
        allocate the aligned units the write falls in, once per unit while the layer is open
        (blocking, one quick fallocate). A 4 KiB write into a hole costs ext4 its delayed
        allocation, about 2 µs more than a write into allocated blocks; random first writes
        into a reserved unit cost what writes into a thick file do. The space is taken a unit
        at a time (as a thin VMFS disk grows by 1 MiB blocks). A refused fallocate (a full
        file system) is not retried for that unit: the write itself then says what is wrong."""
        unit = self.unit
        marks = self._reserved
        first, last = offset // unit, (offset + length - 1) // unit
        if first == last and first >> 3 < len(marks) and marks[first >> 3] >> (first & 7) & 1:
            return  # the common case: one unit, reserved already
        for u in range(first, last + 1):
            byte, bit = u >> 3, 1 << (u & 7)
            if byte >= len(marks):
                marks.extend(bytes(byte + 1 - len(marks)))
            elif marks[byte] & bit:
                continue
            marks[byte] |= bit
            start = u * unit
            end = min(start + unit, self.size)  # never past the end: fallocate would grow the file
            if start < end:
                self.io.reserve(self.fd, start, end - start)

    @contextlib.contextmanager
    def fill(self, first: int, count: int) -> Iterator[None]:
        """Around a guest write's pwrite and state change, when it may await in between:
        a stream copying into this layer must not write these blocks meanwhile (its older
        data could land after the guest's)."""
        span = (first, count)
        self.filling.append(span)
        try:
            yield
        finally:
            self.filling.remove(span)

    def states_durable(self, first: int, count: int) -> bool:
        """Whether the journal already holds the states of these blocks (none changed since
        the last commit, and no commit is still writing them)."""
        if self._committing:
            return False
        dirty = self.map.dirty
        return not dirty or not any(
            c in dirty for c in range(first // CLUSTER_BLOCKS, (first + count - 1) // CLUSTER_BLOCKS + 1)
        )

    # ------------------------------------------------------------ commit
    async def commit(self) -> None:
        """Make every completed write durable: data first, then the journal (group commit).

        A cancelled caller (a stopped job, a shutdown) does not cancel the commit: it has
        taken the changed block states, which would be lost, and its file I/O goes on in a
        thread anyway. It runs to the end; the next commit waits for it."""
        await asyncio.shield(self._counted_commit())

    async def _counted_commit(self) -> None:
        self._commits += 1
        try:
            await self._flusher.flush()
        finally:
            self._commits -= 1
            if self.close_pending and not self._commits:
                self._close_now()

    def commit_nowait(self) -> bool:
        """commit() on the loop, when it is one short fdatasync: no block state to journal,
        no commit under way, and syncs inline allowed (_sync_inline). True if done."""
        if self.map_fd is None or self._committing or self.map.dirty or self._flusher.busy:
            return False
        if not self._sync_inline():
            return False
        try:
            self._timed(self.io.fdatasync, self.fd)
        except OSError as e:
            raise oserror(e, "commit") from e
        return True

    async def _commit(self) -> None:
        if self.map_fd is None:
            return
        self._committing = True
        taken: dict[int, None] = {}
        try:
            # States are read before the data sync, on the loop: each one read shows only
            # writes whose data was written before it was read, which the sync below covers.
            # Many clusters take milliseconds, so they are read a slice per loop turn and
            # requests go on in between (a state read later is just as covered; a cluster
            # changed after it was read is dirty again, for the next commit).
            taken = self.map.swap_dirty()
            clusters = list(taken)
            # Encoded here too, a slice at a time: a thread doing per-entry Python work would
            # hold the interpreter against the loop (whose every system call gives it away).
            body: list[bytes] = []
            for i in range(0, len(clusters), STATES_PER_TURN):
                if i:
                    await asyncio.sleep(0)
                body.append(layout.encode_entries(self.map.states(clusters[i : i + STATES_PER_TURN])))
            compact = None
            if clusters and self.map_end > COMPACT_AT:
                pages = list(self.map.pages)
                live: list[bytes] = []
                for i in range(0, len(pages), PAGES_PER_TURN):
                    await asyncio.sleep(0)
                    live.append(layout.encode_entries(self.map.live_states(pages[i : i + PAGES_PER_TURN])))
                if sum(map(len, live)) * 4 < self.map_end:
                    compact = b"".join(live)
            inline = self._sync_inline()
            if inline:
                self._timed(self.io.fdatasync, self.fd)
            else:
                await self._run(self.io.fdatasync, self.fd)
            if compact is not None:
                await self._run(self._compact, compact)
            elif clusters:
                entries = b"".join(body)
                if inline and len(entries) <= SMALL_APPEND:
                    self._timed(self._append, entries)
                else:
                    await self._run(self._append, entries)
        except BaseException as e:
            # Not journaled (failed, or cancelled at shutdown): the clusters stay dirty, so
            # the next commit journals them.
            self.map.dirty.update(taken)
            if isinstance(e, OSError):
                raise oserror(e, "commit") from e
            raise
        finally:
            self._committing = False

    def _sync_inline(self) -> bool:
        """Whether this commit's syncs run on the loop rather than in a thread.

        A thread costs two cross-CPU wake-ups and two hand-overs of the interpreter lock,
        about 200 µs here, against ~60 µs for the fdatasync of a few FUA writes' pages: a
        FUA write at QD1 took 4x nbdkit's time. So a commit whose file holds nothing dirty
        but FUA writes syncs inline while such syncs stay quick (SyncGuard); a FLUSH after
        buffered writes, and any sync once one was slow, go to a thread as before."""
        io = self.io
        return (
            io.blocking
            and self.small_sync()
            and self.sync_guard.inline(time.monotonic())
            and not (io.faulty and io.slow_writes(self.fd))
        )

    def _timed(self, fn: Callable[..., None], *args: object) -> None:
        t0 = time.monotonic()
        try:
            fn(*args)
        finally:
            now = time.monotonic()
            self.sync_guard.note(now - t0, now)

    async def _run(self, fn: object, *args: object) -> None:
        if self.io.blocking:
            await executor.run_in(self.pool_dir, fn, *args)  # type: ignore[arg-type]
        else:
            fn(*args)  # type: ignore[operator]

    def _append(self, body: bytes) -> None:
        assert self.map_fd is not None
        raw, seq = layout.frame_batches(self.seq, body)
        self.io.pwrite(self.map_fd, raw, self.map_end)
        self.io.fdatasync(self.map_fd)
        self.map_end += len(raw)
        self.seq = seq

    def _compact(self, body: bytes) -> None:
        """Replace the journal by one batch of the current state (atomic rename)."""
        assert self.map_fd is not None
        _, map_path = layer_paths(self.pool_dir, self.id)
        header = layout.decode_header(self.io.read_file(map_path)[: layout.HEADER_SIZE])
        raw, seq = layout.frame_batches(self.seq, body)
        self.io.write_file_atomic(map_path, layout.encode_header(header) + raw)
        self.io.close(self.map_fd)
        self.map_fd = self.io.open(map_path, write=True)
        self.map_end = layout.HEADER_SIZE + len(raw)
        self.seq = seq


class WriteGuard:
    """Decides whether buffered writes may run inline on the event loop.

    A page-cache write normally takes microseconds, but the kernel can stall a writer (dirty
    page throttling, a slow disk). Writes slower than STALL send every write of this node to
    the thread pool, where only that volume waits; inline writes resume once the pool has seen
    FAST_STREAK quick writes in a row.

    An inline write is judged by `note_inline`: on a loaded machine one write in a few
    thousand looks slow only because the loop's thread was preempted in the middle of it,
    and sending the next 256 writes to threads for that costs far more than the stall would.
    The kernel throttles a dirtying writer again and again (every few dozen pages), so an
    inline stall counts once a second one follows within CONFIRM_WITHIN inline writes.
    """

    STALL = 0.005
    QUICK = 0.001
    FAST_STREAK = 256
    CONFIRM_WITHIN = 256

    __slots__ = ("inline", "stalls", "streak", "suspect")

    def __init__(self) -> None:
        self.inline = True
        self.streak = 0
        self.stalls = 0
        #: Inline writes left during which a second stall confirms the first (0: none seen).
        self.suspect = 0

    def note(self, seconds: float) -> None:
        if seconds > self.STALL:
            if self.inline:
                self.stalls += 1
            self.inline = False
            self.streak = 0
        elif not self.inline and seconds < self.QUICK:
            self.streak += 1
            if self.streak >= self.FAST_STREAK:
                self.inline = True

    def note_inline(self, seconds: float) -> None:
        """An inline write took `seconds` (callers may skip quick writes while no stall is
        suspected: then nothing changes)."""
        if seconds > self.STALL:
            if self.suspect:
                self.suspect = 0
                self.note(seconds)
            else:
                self.suspect = self.CONFIRM_WITHIN
        elif self.suspect:
            self.suspect -= 1


class SyncGuard:
    """Whether small commits may sync on the event loop: while their syncs are quick.

    A device flush is usually tens of microseconds on an SSD with a protected cache or a
    virtual disk (50-150 µs here), but milliseconds on others. Now and then one is slow on
    any device: here one in several thousand took 5-7 ms, about every five seconds (the
    file system's journal commit). Sending every sync to threads after such a one made a
    FUA write 4x slower for the next BACKOFF seconds, which under steady FUA load was most
    of the time. So a slow sync counts only when another one confirms it within CONFIRM
    seconds, or when it alone is SEVERE; then this layer's syncs go to threads for BACKOFF
    seconds. A device that is slow for good stalls the loop twice per BACKOFF at most, for
    SEVERE at most each (pure: time is an argument)."""

    SLOW = WriteGuard.STALL
    SEVERE = 0.050
    CONFIRM = 2.0
    BACKOFF = 10.0

    __slots__ = ("slow_until", "suspect_until")

    def __init__(self) -> None:
        self.slow_until = 0.0
        #: Until when a slow sync seen alone waits for a second one to confirm it.
        self.suspect_until = 0.0

    def inline(self, now: float) -> bool:
        return now >= self.slow_until

    def note(self, seconds: float, now: float) -> None:
        if seconds <= self.SLOW:
            return
        if seconds > self.SEVERE or now < self.suspect_until:
            self.slow_until = now + self.BACKOFF
            self.suspect_until = 0.0
        else:
            self.suspect_until = now + self.CONFIRM


def no_small_sync() -> bool:
    """A layer that is no writable chain's head: how much of it is dirty is not known."""
    return False


def timed_pwrite(io: FileIO, fd: int, data: Buffer, offset: int, dsync: bool) -> float:
    t0 = time.perf_counter()
    io.pwrite(fd, data, offset, dsync=dsync)
    return time.perf_counter() - t0
