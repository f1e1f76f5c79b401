"""AsyncImage: one open RBD image, for asyncio.

Data path: read, write, discard, write_zeroes and flush go through librbd's aio calls; at
most `queue_depth` are in flight, further callers wait. Ops are submitted on the caller's
thread (CephConnection sets rbd_non_blocking_aio=false: one thread hop less per op); that
does not block the loop because the owning node takes the image's exclusive lock in managed
mode when it claims the volume (ownership.py), so no submission waits on a lock
transition. Completions come back through an eventfd the loop watches (native.py), or, if
that cannot be set up for an image or `CephConfig.native_aio` is off, through python3-rbd's
callbacks (bridge.py).

Control plane (open, close, resize, snapshots, locks, metadata, diff_iterate, flatten) is
synchronous in the bindings and runs on the connection's control threads.

Semantics worth knowing:
- librbd clips I/O at the end of the image without an error, so ranges are checked here
  against the size this object knows (refresh_size() after another client resized).
- discard is advisory, as NBD's TRIM: librbd skips pieces smaller than
  rbd_discard_granularity_bytes (64 KiB), which keep their data. write_zeroes always reads
  back as zeros and frees whole objects it covers.
- FUA: librbd has no FUA flag. With the client cache off (the default of CephConnection) a
  completed write is already on the OSDs; with it on, a FUA write is followed by a flush.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import rbd

from blockvirt.storage import executor
from blockvirt.storage.backends.rbd import native
from blockvirt.storage.backends.rbd.bridge import completion
from blockvirt.storage.backends.rbd.cluster import CephConnection, Session, keep_for_good
from blockvirt.storage.backends.rbd.errors import CephError, RbdError, from_exception, rbd_error
from blockvirt.storage.backends.rbd.native import NativeIo
from blockvirt.storage.node import HOLE, ZERO, Buffer, StorageError

T = TypeVar("T")

log = logging.getLogger("blockvirt.rbd")

_warned = False


def _warn_no_handle(name: str) -> None:
    """Once per process: the eventfd path was asked for and cannot be used."""
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "%s: librbd's C API or the image handle behind python3-rbd's Image was not found: "
            "RBD I/O completes through the binding's callbacks (slower)",
            name,
        )


#: How an op starts on each path: on the eventfd path (native.NativeIo, settled) -> future;
#: on python3-rbd's, (its callback) -> None.
NativeSubmit = Callable[[native.NativeIo, Callable[[int], None]], "asyncio.Future[Any]"]
BindingSubmit = Callable[[Callable[..., None]], Any]

#: (length, HOLE|ZERO flags), as BlockNode.block_status returns them.
Extent = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Snapshot:
    id: int
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class LockOwner:
    """A holder of an image's managed lock; `owner` is its client address."""

    exclusive: bool
    owner: str


@dataclass(frozen=True, slots=True)
class DiffExtent:
    """A range changed since a snapshot; `exists` False means it now reads as zeros."""

    offset: int
    length: int
    exists: bool


class AsyncImage:
    """An open RBD image. Create with `await AsyncImage.open(conn, name)`; close with close()."""

    def __init__(
        self,
        conn: CephConnection,
        session: Session,
        image: Any,
        name: str,
        *,
        size: int,
        cache: bool,
        read_only: bool,
        queue_depth: int,
        handle: int | None = None,
    ) -> None:
        self._conn = conn
        self._session = session
        self._image = image
        self.name = name
        self.read_only = read_only
        self._size = size
        self._cache = cache
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(queue_depth)
        self.queue_depth = queue_depth
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._closed = False
        #: The close, once begun (see _retire).
        self._closer: asyncio.Task[None] | None = None
        #: A control call never returned (see _stuck): the image is never closed.
        self._stuck_open = False
        #: The eventfd-completed data path, or None for python3-rbd's callbacks.
        self._native: native.NativeIo | None = None
        if handle is not None:
            try:
                self._native = native.NativeIo(handle, self._loop, rbd_error, name)
            except OSError as e:
                log.warning("%s: completions through python3-rbd's callbacks: %s", name, e)
        session.users.add(self)

    @classmethod
    async def open(
        cls,
        conn: CephConnection,
        name: str,
        *,
        snapshot: str | None = None,
        read_only: bool = False,
        queue_depth: int = 64,
    ) -> AsyncImage:
        """Open image `name` (at `snapshot`, read-only, if given) in the connection's pool."""
        session = conn.session
        read_only = read_only or snapshot is not None

        def do_open() -> tuple[Any, int, bool, int | None]:
            image = rbd.Image(session.ioctx, name, snapshot=snapshot, read_only=read_only)
            try:
                size = int(image.size())
                cache = any(c["name"] == "rbd_cache" and c["value"] == "true" for c in image.config_list())
                handle = native.image_handle(image, session.ioctx, name) if conn.config.native_aio else None
            except BaseException:
                image.close()
                raise
            return image, size, cache, handle

        session.begin()  # until the image is registered with the session (its teardown closes it)
        try:
            try:
                image, size, cache, handle = await session.run(do_open)
                if handle is None and conn.config.native_aio:
                    _warn_no_handle(name)
            except (StorageError, CephError):
                raise
            except Exception as e:
                err = from_exception(e, f"open {name}")
                conn.note_error(session, err.errno)
                raise err from e
            return cls(
                conn, session, image, name,
                size=size, cache=cache, read_only=read_only, queue_depth=queue_depth, handle=handle,
            )  # fmt: skip
        finally:
            session.end()

    # ------------------------------------------------------------------ bookkeeping

    @property
    def size(self) -> int:
        """The size as of open, the last resize() or refresh_size()."""
        return self._size

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def session(self) -> Session:
        """The client instance the image was opened on."""
        return self._session

    @property
    def inflight(self) -> int:
        """Ops submitted and not yet completed (data path and control calls)."""
        return self._inflight

    def _check_open(self) -> None:
        if self._closing:
            # Our own doing, not Ceph's: no ceph_errno, or it would read as EBLOCKLISTED (the
            # same number) and a handoff's close would look like this node being fenced.
            raise RbdError(errno.ESHUTDOWN, f"{self.name}: image is closed", 0)

    def _begin(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def _end(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    def _failed(self, code: int) -> None:
        if code < 0:
            self._conn.note_error(self._session, code)

    def _check_range(self, offset: int, length: int, *, write: bool) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            code = errno.ENOSPC if write else errno.EINVAL
            raise RbdError(
                code, f"{self.name}: {offset}+{length} is beyond the image size {self._size}", code
            )

    # ------------------------------------------------------------------ data path

    @property
    def native(self) -> bool:
        """Whether completions come through the eventfd (native.py)."""
        return self._native is not None

    async def _aio(self, what: str, fast: NativeSubmit, slow: BindingSubmit) -> Any:
        self._check_open()
        await self._slots.acquire()
        if self._closing:  # closed while we waited for a slot
            self._slots.release()
            self._check_open()
        self._op_begins()
        settled = self._give_slot
        nio = self._native
        if nio is not None:
            return await fast(nio, settled)
        fut, callback = completion(self._loop, f"{self.name}: {what}", settled)
        try:
            slow(callback)
        except Exception as e:
            settled(0)
            err = from_exception(e, f"{self.name}: {what}")
            self._failed(-err.errno)
            raise err from e
        return await fut

    # Submitted ops (the NBD path's reads and writes; see BlockNode.read_submit): started now
    # on the eventfd path if a slot is free, else refused (False) and the caller awaits the
    # methods below instead. Range and mode errors are left to those methods to report.
    def _take_slot(self, offset: int, length: int) -> NativeIo | None:
        nio = self._native
        if nio is None or self._closing or offset < 0 or offset + length > self._size:
            return None
        slots = self._slots
        if slots.locked():
            return None
        slots._value -= 1  # what acquire() does when it need not wait
        self._op_begins()
        return nio

    def _op_begins(self) -> None:
        """An op holding a slot starts: counted in flight until _give_slot."""
        self._begin()
        # The loop does not spin while it is in flight (server/polling.py): an op takes
        # hundreds of microseconds, longer than any spin, and librbd's threads need the CPU
        # to complete it (and, on the binding's path, the interpreter lock).
        executor.begin_offload()

    def _give_slot(self, rv: int) -> None:
        """An op ended with return value `rv` (0 if it never started)."""
        executor.end_offload()
        self._slots.release()
        self._end()
        self._failed(rv)

    def read_submit(
        self, offset: int, length: int, done: Callable[[Buffer | None, RbdError | None], None]
    ) -> bool:
        if not length:
            return False
        nio = self._take_slot(offset, length)
        if nio is None:
            return False
        data = bytearray(length)

        def settled(rv: int) -> None:
            self._give_slot(rv)
            if rv == length:
                done(data, None)
            elif rv < 0:
                done(None, rbd_error(rv, f"{self.name}: read"))
            else:
                what = f"{self.name}: short read ({rv} of {length} bytes)"
                done(None, RbdError(errno.EIO, what, errno.EIO))

        return self._started(lambda: nio.read_cb(offset, data, settled))

    def write_submit(self, data: Buffer, offset: int, done: Callable[[RbdError | None], None]) -> bool:
        if self.read_only or not data:
            return False
        nio = self._take_slot(offset, len(data))
        if nio is None:
            return False
        payload = data if isinstance(data, bytes | bytearray) else bytes(data)

        def settled(rv: int) -> None:
            self._give_slot(rv)
            done(None if rv >= 0 else rbd_error(rv, f"{self.name}: write"))

        return self._started(lambda: nio.write_cb(offset, payload, settled))

    def _started(self, start: Callable[[], None]) -> bool:
        """Start a submitted op that holds a slot; False (slot given back) if it did not start:
        the awaited path then reports why."""
        try:
            start()
        except Exception:
            self._give_slot(0)
            return False
        return True

    async def read(self, offset: int, length: int) -> Buffer:
        self._check_range(offset, length, write=False)
        if length == 0:
            return b""
        data = await self._aio(
            "read",
            lambda nio, settled: nio.read(offset, length, settled),
            lambda cb: self._image.aio_read(offset, length, cb),
        )
        if data is None or len(data) != length:
            got = 0 if data is None else len(data)
            raise RbdError(errno.EIO, f"{self.name}: short read ({got} of {length} bytes)", errno.EIO)
        return data if isinstance(data, bytearray) else bytes(data)

    async def write(self, data: Buffer, offset: int, fua: bool = False) -> None:
        if self.read_only:
            raise RbdError(errno.EROFS, f"{self.name}: opened read-only", errno.EROFS)
        self._check_range(offset, len(data), write=True)
        if not data:
            return
        payload = data if isinstance(data, bytes | bytearray) else bytes(data)
        await self._aio(
            "write",
            lambda nio, settled: nio.write(offset, payload, settled),
            lambda cb: self._image.aio_write(payload, offset, cb),
        )
        if fua and self._cache:
            await self.flush()

    async def discard(self, offset: int, length: int) -> None:
        """Give space back (advisory: small or unaligned pieces may keep their data)."""
        self._check_range(offset, length, write=True)
        if length:
            await self._aio(
                "discard",
                lambda nio, settled: nio.discard(offset, length, settled),
                lambda cb: self._image.aio_discard(offset, length, cb),
            )

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros; objects it covers entirely are freed."""
        self._check_range(offset, length, write=True)
        if length:
            await self._aio(
                "write_zeroes",
                lambda nio, settled: nio.write_zeroes(offset, length, settled),
                lambda cb: self._image.aio_write_zeroes(offset, length, cb),
            )

    async def flush(self) -> None:
        await self._aio(
            "flush", lambda nio, settled: nio.flush(settled), lambda cb: self._image.aio_flush(cb)
        )

    # ------------------------------------------------------------------ control plane

    async def _control(self, what: str, fn: Callable[..., T], *args: Any, bounded: bool = False) -> T:
        """Run a blocking librbd call on the control threads; counted as in flight until the
        thread returns (even if the caller is cancelled), so close() never races it.

        `bounded`: a call that should end within librados' timeouts but can wait for ever
        (a snapshot's create or removal waits on the mon, and librbd lost such a request to a
        mon restart: it never returned) fails after `stuck_after()`; see _stuck."""
        self._check_open()
        self._begin()
        what = f"{self.name}: {what}"

        def call() -> T:
            try:
                return fn(*args)
            except StorageError:
                raise
            except Exception as e:
                raise from_exception(e, what) from e

        try:
            cf = self._session.executor.submit(call)
        except RuntimeError as e:
            self._end()
            raise RbdError(errno.ESHUTDOWN, f"{what}: connection closed", 0) from e
        cf.add_done_callback(lambda _f: self._loop.call_soon_threadsafe(self._end))
        fut = asyncio.wrap_future(cf)
        limit = self.stuck_after() if bounded else 0.0
        if limit > 0:
            try:
                await asyncio.wait({fut}, timeout=limit)
            except asyncio.CancelledError:
                fut.cancel()  # as awaiting it would: a call not started yet never starts
                raise
            if not fut.done():
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # heard by nobody
                self._stuck(what, limit)
        try:
            return await fut
        except RbdError as e:
            self._failed(-e.ceph_errno)
            raise

    def stuck_after(self) -> float:
        """How long a bounded control call may take: three OSD op timeouts (0: no bound)."""
        return 3 * self._conn.config.osd_op_timeout

    def _stuck(self, what: str, limit: float) -> NoReturn:
        """A control call did not return: its thread is still inside librbd with this image,
        so the image must not be closed (a use-after-free), nor its client shut down. Both
        are left open for the life of the process (I/O through the image goes on); the
        caller hears ETIMEDOUT."""
        log.error("%s: librbd did not return within %g s; the image stays open", what, limit)
        self._stuck_open = True
        self._session.stuck = True
        keep_for_good(self._image)  # its finalizer would close it under that call
        raise RbdError(
            errno.ETIMEDOUT,
            f"{what}: no answer from the cluster within {limit:g} s (it may still happen there)",
            errno.ETIMEDOUT,
        )

    async def refresh_size(self) -> int:
        """Read the size again (another client may have resized the image)."""
        self._size = int(await self._control("size", self._image.size))
        return self._size

    async def resize(self, size: int, *, allow_shrink: bool = False) -> None:
        await self._control("resize", self._image.resize, size, allow_shrink)
        self._size = size

    async def stat(self) -> dict[str, Any]:
        """size, obj_size, num_objs, order, block_name_prefix, plus id and features."""

        def do() -> dict[str, Any]:
            info = dict(self._image.stat())
            info["id"] = self._image.id()
            info["features"] = self._image.features()
            return info

        return await self._control("stat", do)

    async def parent(self) -> tuple[str, str, str] | None:
        """(pool, image, snapshot) this clone reads through to, or None."""

        def do() -> tuple[str, str, str] | None:
            try:
                spec = self._image.get_parent_image_spec()
            except rbd.ImageNotFound:
                return None
            return (str(spec["pool_name"]), str(spec["image_name"]), str(spec["snap_name"]))

        return await self._control("parent", do)

    # allocation ------------------------------------------------------

    def _extents(
        self,
        offset: int,
        length: int,
        from_snap: str | None,
        whole_object: bool,
        include_parent: bool = True,
    ) -> list[DiffExtent]:
        found: list[DiffExtent] = []

        def cb(off: int, ln: int, exists: bool) -> int:
            found.append(DiffExtent(int(off), int(ln), bool(exists)))
            return 0

        self._image.diff_iterate(
            offset, length, from_snap, cb, include_parent=include_parent, whole_object=whole_object
        )
        return found

    def _allocated(self, offset: int, length: int) -> list[DiffExtent]:
        """Exact data extents in two passes. Asked for exact extents over a whole range,
        librbd asks the OSDs about every object in it, present or not (about 13 ms per GiB
        here); the object map (whole_object) answers from memory which objects hold data,
        so only those runs get the exact pass."""
        found: list[DiffExtent] = []
        for run in _merge(self._extents(offset, length, None, True)):
            found.extend(self._extents(run.offset, run.length, None, False))
        return found

    async def allocation(self, offset: int, length: int) -> list[Extent]:
        """(length, flags) extents covering [offset, offset+length): unallocated ranges are
        HOLE|ZERO, allocated ones 0. Parent data of a clone counts as allocated.

        An object's data is reported from the object's start to its highest written byte:
        RADOS knows an object's size, not its sparseness. Never short, sometimes generous.
        """
        self._check_range(offset, length, write=False)
        found = await self._control("allocation", self._allocated, offset, length)
        out: list[Extent] = []
        pos, end = offset, offset + length

        def add(ln: int, flags: int) -> None:
            if ln <= 0:
                return
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + ln, flags)
            else:
                out.append((ln, flags))

        for ext in sorted(found, key=lambda e: e.offset):
            start, stop = max(ext.offset, pos), min(ext.offset + ext.length, end)
            if stop <= start:
                continue
            add(start - pos, HOLE | ZERO)
            add(stop - start, 0)
            pos = stop
        add(end - pos, HOLE | ZERO)
        return out

    async def allocated_bytes(self) -> int:
        """Bytes that hold data in this image (or its parent), as `rbd du` counts with fast-diff
        off: exact extents, not whole objects."""
        found = await self._control("du", self._allocated, 0, self._size)
        return sum(e.length for e in found if e.exists)

    async def diff(
        self,
        from_snap: str | None,
        offset: int = 0,
        length: int | None = None,
        *,
        whole_object: bool = False,
        include_parent: bool = True,
    ) -> list[DiffExtent]:
        """Ranges changed since snapshot `from_snap` (None: since the image was created).

        whole_object=True uses the fast-diff object map: whole objects, much cheaper.
        include_parent=False leaves out what a clone reads from its parent."""
        span = self._size - offset if length is None else length
        return await self._control(
            "diff", self._extents, offset, span, from_snap, whole_object, include_parent
        )

    # snapshots -------------------------------------------------------

    async def snapshot_create(self, name: str) -> None:
        await self._control(f"snapshot {name}", self._image.create_snap, name, bounded=True)

    async def snapshot_remove(self, name: str) -> None:
        """Remove a snapshot. With clone v2, one that clones still use moves to the trash."""
        await self._control(f"remove snapshot {name}", self._image.remove_snap, name, bounded=True)

    async def snapshot_rename(self, old: str, new: str) -> None:
        await self._control(f"rename snapshot {old}", self._image.rename_snap, old, new)

    async def snapshots(self) -> list[Snapshot]:
        """User snapshots, oldest first (trashed ones that clones still use are left out)."""

        def do() -> list[Snapshot]:
            return [
                Snapshot(int(s["id"]), str(s["name"]), int(s["size"]))
                for s in self._image.list_snaps()
                if s.get("namespace", rbd.RBD_SNAP_NAMESPACE_TYPE_USER) == rbd.RBD_SNAP_NAMESPACE_TYPE_USER
            ]

        return await self._control("list snapshots", do)

    async def snapshot_protect(self, name: str) -> None:
        await self._control(f"protect {name}", self._image.protect_snap, name)

    async def snapshot_unprotect(self, name: str) -> None:
        await self._control(f"unprotect {name}", self._image.unprotect_snap, name)

    async def snapshot_is_protected(self, name: str) -> bool:
        return bool(await self._control(f"is_protected {name}", self._image.is_protected_snap, name))

    async def snapshot_rollback(self, name: str) -> None:
        """Make the image's data that of snapshot `name` (the caller stops I/O meanwhile)."""
        await self._control(f"rollback to {name}", self._image.rollback_to_snap, name)

    async def flatten(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Copy the parent's data in so the clone stands alone. `progress(done, total)` runs
        on the loop, in object units, ending with (total, total). Cancelling the caller (or
        closing the image) stops the copy at the next object; the clone stays a clone."""
        loop = self._loop
        stop = False
        total_seen = 0

        def on_progress(done: int, total: int) -> int:  # on a control thread
            nonlocal total_seen
            if stop or self._closing:
                return -errno.ECANCELED
            total_seen = int(total)
            if progress is not None:
                loop.call_soon_threadsafe(progress, int(done), int(total))
            return 0

        try:
            await self._control("flatten", self._image.flatten, on_progress)
        except asyncio.CancelledError:
            stop = True
            raise
        # librbd's last call reports the last object started (total - 1): finish the count.
        if progress is not None and total_seen:
            progress(total_seen, total_seen)

    # metadata --------------------------------------------------------

    async def metadata_get(self, key: str) -> str | None:
        def do() -> str | None:
            try:
                return str(self._image.metadata_get(key))
            except KeyError:
                return None

        return await self._control(f"metadata_get {key}", do)

    async def metadata_set(self, key: str, value: str) -> None:
        await self._control(f"metadata_set {key}", self._image.metadata_set, key, value)

    async def metadata_remove(self, key: str) -> None:
        def do() -> None:
            try:
                self._image.metadata_remove(key)
            except KeyError:
                pass

        await self._control(f"metadata_remove {key}", do)

    async def metadata(self) -> dict[str, str]:
        def do() -> dict[str, str]:
            return {str(k): str(v) for k, v in self._image.metadata_list()}

        return await self._control("metadata_list", do)

    # locks -----------------------------------------------------------

    async def lock_acquire(self, exclusive: bool = True) -> None:
        """Take the managed lock. Unlike librbd's default cooperative lock, it is not handed
        over when another client writes: theirs fail with EROFS until lock_break()."""
        mode = rbd.RBD_LOCK_MODE_EXCLUSIVE if exclusive else rbd.RBD_LOCK_MODE_SHARED
        await self._control("lock_acquire", self._image.lock_acquire, mode)

    async def lock_release(self) -> None:
        await self._control("lock_release", self._image.lock_release)

    async def lock_owners(self) -> list[LockOwner]:
        def do() -> list[LockOwner]:
            return [
                LockOwner(o["mode"] == rbd.RBD_LOCK_MODE_EXCLUSIVE, str(o["owner"]))
                for o in self._image.lock_get_owners()
            ]

        return await self._control("lock_get_owners", do)

    async def is_lock_owner(self) -> bool:
        return bool(await self._control("is_exclusive_lock_owner", self._image.is_exclusive_lock_owner))

    async def lock_break(self, owner: LockOwner | None = None) -> list[LockOwner]:
        """Fence the lock's holder(s): librbd blocklists the owner's client address
        (rbd_blocklist_on_break_lock) and drops the lock. Then waits for the newest OSD map,
        so no OSD still accepts the old owner's ops once we write. Returns who was broken."""

        def do() -> list[LockOwner]:
            owners = (
                [owner]
                if owner is not None
                else [
                    LockOwner(o["mode"] == rbd.RBD_LOCK_MODE_EXCLUSIVE, str(o["owner"]))
                    for o in self._image.lock_get_owners()
                ]
            )
            for o in owners:
                mode = rbd.RBD_LOCK_MODE_EXCLUSIVE if o.exclusive else rbd.RBD_LOCK_MODE_SHARED
                self._image.lock_break(mode, o.owner)
            return owners

        broken = await self._control("lock_break", do)
        await self._conn.wait_for_latest_osdmap()
        return broken

    async def release_orphaned_lock(self) -> int:
        """Release the exclusive lock that this very client holds through a handle that is
        gone. An image closed while its OSDs were away keeps its lock (and, for a while, its
        watch). librbd would break such a lock, and breaking blocklists the holder's
        address: here our own, fencing this client and every volume it serves; blockvirt's
        own take-over refuses it as held by a live node, this one. So it is released the way
        its holder would release it: a RADOS unlock as the same client entity. Only when no
        handle of this client still has the image open for writing (the caller's to know).
        Returns how many locks were released."""
        session = self._session

        def do() -> int:
            if self._image.is_exclusive_lock_owner():
                return 0
            info = self._image.list_lockers()  # a fresh handle's view: the header's lockers
            if not isinstance(info, dict):
                return 0
            me = f"client.{session.rados.get_instance_id()}"
            header = f"rbd_header.{self._image.id()}"
            released = 0
            for client, cookie, _addr in info.get("lockers", []):
                if str(client) == me:
                    session.ioctx.unlock(header, "rbd_lock", str(cookie))
                    released += 1
            return released

        released = await self._control("release orphaned lock", do)
        if released:
            log.warning(
                "%s: released %d lock(s) left by a handle of this client that is gone", self.name, released
            )
        return released

    # close -----------------------------------------------------------

    async def close(self) -> None:
        """Wait for in-flight ops, then close the image (releasing its lock). Idempotent."""
        if self._stuck_open:
            return
        await self._retire()

    async def _retire(self) -> None:
        """Close the image, or wait for the close under way. The close runs as a task of its
        own, which a cancelled caller does not stop: a close abandoned half-way would go on
        in its thread while the client it uses is shut down. The image stays among its
        session's users until the close has returned, so the session's teardown (which
        retires every user first) never shuts the client down under it."""
        if self._closer is None:
            self._closing = True
            self._closer = asyncio.ensure_future(self._close_now())
        await asyncio.shield(self._closer)

    async def _close_now(self) -> None:
        try:
            if self._stuck_open:
                return  # a call is inside librbd with it for good (see _stuck)
            # Every in-flight op ends: librados fails it within the op timeout at worst.
            await self._idle.wait()
            if self._closed:
                return
            self._closed = True
            self._begin()
            if self._native is not None:  # nothing is in flight: no completion is to come
                self._native.stop_watching()  # the loop must not poll the image while it closes
            try:
                await self._loop.run_in_executor(self._session.executor, self._close_blocking)
            except RuntimeError:  # the executor is gone; the handle goes with the client
                pass
            finally:
                if self._native is not None:
                    self._native.close()
                self._end()
        finally:
            self._session.users.discard(self)

    def _close_blocking(self) -> None:
        try:
            self._image.close()
        except Exception:  # fenced clients may fail to release the lock; the image is closed
            pass

    def __repr__(self) -> str:
        return f"<AsyncImage {self.name} size={self._size}{' closed' if self._closing else ''}>"


def _merge(extents: list[DiffExtent]) -> list[DiffExtent]:
    """Adjacent or overlapping extents joined (diff_iterate reports them in order)."""
    out: list[DiffExtent] = []
    for e in sorted(extents, key=lambda e: e.offset):
        if out and e.offset <= out[-1].offset + out[-1].length:
            last = out[-1]
            end = max(last.offset + last.length, e.offset + e.length)
            out[-1] = DiffExtent(last.offset, end - last.offset, True)
        else:
            out.append(DiffExtent(e.offset, e.length, True))
    return out
