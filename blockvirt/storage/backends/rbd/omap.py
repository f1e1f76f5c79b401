"""OmapDocument: a small durable key-value document on one RADOS object.

Keys are strings, values anything JSON can hold; they live in the object's omap, next to a
version key. Every update is one atomic RADOS write op that checks the version first
(omap_cmp), so two nodes updating at once cannot both win: the loser gets VersionConflict
and re-reads. Watchers of the object are told about changes with notify().

This is meant for catalogs shared by several blockvirt nodes (an RBD pool's volumes and
their settings), in the manner of ceph-nvmeof's state object: a few thousand keys at most.

    doc = OmapDocument(conn, "blockvirt.catalog")
    v = await doc.update(set={"vol/a": {"size": 1 << 30}})            # retried on conflict
    await doc.update(remove=["vol/a"], expect_version=v)              # or VersionConflict
    watch = await doc.watch(lambda msg: print("changed", msg))
    await doc.notify("vol/a")
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import rados

from blockvirt.storage.backends.rbd.bridge import completion
from blockvirt.storage.backends.rbd.cluster import CephConnection, Session, keep_for_good
from blockvirt.storage.backends.rbd.errors import RbdError, from_exception

log = logging.getLogger(__name__)

#: The document's version (decimal). '@' keeps it out of the way of ordinary keys.
VERSION_KEY = "@version"
RESERVED_PREFIX = "@"


class VersionConflict(Exception):
    """The document changed since the version the caller based its update on."""

    def __init__(self, expected: int, actual: int | None) -> None:
        super().__init__(f"document is at version {actual}, not {expected}")
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True, slots=True)
class Document:
    """A consistent read: every item at one version (0: the document does not exist)."""

    version: int
    items: dict[str, Any]


class OmapWatch:
    """A registered watch; close() it. When the connection is reset or closed it is closed
    for you and `on_error(ESHUTDOWN)` is called: re-read the document and watch again."""

    def __init__(
        self, doc: OmapDocument, session: Session, handle: Any, on_error: Callable[[int], None] | None
    ) -> None:
        self._doc = doc
        self._session = session
        self._handle = handle
        self._on_error = on_error
        self._closed = False
        self._closer: asyncio.Task[None] | None = None
        session.users.add(self)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        self._on_error = None  # the caller's own close is no error
        await self._retire()

    async def _retire(self) -> None:
        """Unregister, or wait for the unregistering under way: in a task of its own that a
        cancelled caller does not stop, and among the session's users until it is done, so
        the client is never shut down while it runs (as for AsyncImage._retire)."""
        if self._closer is None:
            self._closed = True
            self._closer = asyncio.ensure_future(self._unwatch())
        await asyncio.shield(self._closer)

    async def _unwatch(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._session.executor, self._handle.close)
        except Exception as e:  # a fenced client cannot unregister; the OSD times the watch out
            log.debug("closing watch on %s: %s", self._doc.oid, e)
            # The binding's finalizer would try again wherever the last reference drops (on
            # the loop, blocking it; or after the client's shutdown, printing an exception).
            keep_for_good(self._handle)
        finally:
            self._session.users.discard(self)
        if self._on_error is not None:
            self._on_error(errno.ESHUTDOWN)


class OmapDocument:
    """A versioned key-value document stored in the omap of RADOS object `oid`."""

    def __init__(self, conn: CephConnection, oid: str, *, page_size: int = 1000) -> None:
        self.conn = conn
        self.oid = oid
        self.page_size = page_size

    # ------------------------------------------------------------------ helpers

    async def _op(self, what: str, fn: Callable[[Any], Any]) -> Any:
        session = self.conn.session

        def call() -> Any:
            try:
                return fn(session.ioctx)
            except Exception as e:
                raise from_exception(e, f"{self.oid}: {what}") from e

        try:
            return await session.run(call)
        except RbdError as e:
            self.conn.note_error(session, e.ceph_errno)
            raise

    @staticmethod
    def _decode(items: Iterable[tuple[str, bytes]]) -> tuple[int, dict[str, Any]]:
        version = 0
        out: dict[str, Any] = {}
        for key, raw in items:
            if key == VERSION_KEY:
                version = int(raw)
            elif not key.startswith(RESERVED_PREFIX):
                out[key] = json.loads(raw)
        return version, out

    # ------------------------------------------------------------------ reads

    async def read(self, prefix: str = "") -> Document:
        """Every item whose key starts with `prefix`, at one version.

        Large documents are read in pages; each page also reads the version, and a change
        between pages starts the read again."""
        while True:
            doc: Document | None = await self._op("read", lambda io: self._read_pages(io, prefix))
            if doc is not None:
                return doc

    def _read_pages(self, ioctx: Any, prefix: str) -> Document | None:
        items: dict[str, Any] = {}
        start_after = ""
        version: int | None = None
        while True:
            op = ioctx.create_read_op()
            try:
                vals, _ = ioctx.get_omap_vals(op, start_after, prefix, self.page_size)
                ver, _ = ioctx.get_omap_vals_by_keys(op, (VERSION_KEY,))
                try:
                    ioctx.operate_read_op(op, self.oid)
                except rados.ObjectNotFound:
                    return Document(0, {})
                page = list(vals)
                page_version = next((int(v) for k, v in ver if k == VERSION_KEY), 0)
            finally:
                ioctx.release_read_op(op)
            if version is None:
                version = page_version
            elif page_version != version:
                return None  # changed under us: read again
            items.update(self._decode(page)[1])
            if len(page) < self.page_size:
                return Document(version, items)
            start_after = page[-1][0]

    async def version(self) -> int:
        """The current version (0: no document)."""

        def do(io: Any) -> int:
            op = io.create_read_op()
            try:
                ver, _ = io.get_omap_vals_by_keys(op, (VERSION_KEY,))
                try:
                    io.operate_read_op(op, self.oid)
                except rados.ObjectNotFound:
                    return 0
                return next((int(v) for k, v in ver if k == VERSION_KEY), 0)
            finally:
                io.release_read_op(op)

        return int(await self._op("version", do))

    async def get(self, key: str, default: Any = None) -> Any:
        def do(io: Any) -> Any:
            op = io.create_read_op()
            try:
                vals, _ = io.get_omap_vals_by_keys(op, (key,))
                try:
                    io.operate_read_op(op, self.oid)
                except rados.ObjectNotFound:
                    return default
                found = dict(vals)
                return json.loads(found[key]) if key in found else default
            finally:
                io.release_read_op(op)

        return await self._op(f"get {key}", do)

    async def items(self, prefix: str = "") -> dict[str, Any]:
        return (await self.read(prefix)).items

    # ------------------------------------------------------------------ writes

    async def update(
        self,
        set: Mapping[str, Any] | None = None,
        remove: Iterable[str] = (),
        *,
        expect_version: int | None = None,
        retries: int = 20,
    ) -> int:
        """Set and remove keys in one atomic step; return the new version.

        With expect_version, the update applies only if the document is still at that version
        (0: it does not exist yet), else VersionConflict. Without it the update applies on top
        of whatever is current, retried on conflict (up to `retries` times)."""
        values = {
            k: json.dumps(v, separators=(",", ":"), sort_keys=True).encode() for k, v in (set or {}).items()
        }
        removed = tuple(remove)
        for key in (*values, *removed):
            if key.startswith(RESERVED_PREFIX):
                raise ValueError(f"keys starting with {RESERVED_PREFIX!r} are reserved: {key!r}")
        attempts = 1 if expect_version is not None else retries
        for _ in range(attempts):
            base = expect_version if expect_version is not None else await self.version()
            if await self._cas(base, values, removed):
                return base + 1
        actual = await self.version()
        raise VersionConflict(base, actual)

    async def _cas(self, base: int, values: dict[str, bytes], removed: tuple[str, ...]) -> bool:
        session = self.conn.session
        loop = asyncio.get_running_loop()
        # Counted as running until the op completes and is released: the client must not be
        # shut down under it (Session.begin).
        session.begin()
        ioctx = session.ioctx
        op = ioctx.create_write_op()

        def settled(rv: int) -> None:  # on the loop, once, when the op is done
            ioctx.release_write_op(op)
            session.end()

        try:
            # Creating is idempotent, so one op shape serves both cases: on a new object the
            # version key is absent and compares equal to "" (base 0); a deleted document
            # fails the compare and the whole op, creation included, is undone.
            op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
            op.omap_cmp(VERSION_KEY, str(base) if base else "", rados.LIBRADOS_CMPXATTR_OP_EQ)
            keys = (VERSION_KEY, *values)
            ioctx.set_omap(op, keys, (str(base + 1).encode(), *values.values()))
            if removed:
                ioctx.remove_omap_keys(op, removed)
            fut, callback = completion(loop, f"{self.oid}: update", settled)
            ioctx.operate_aio_write_op(op, self.oid, callback)
        except BaseException:
            settled(0)
            raise
        try:
            await fut
        except RbdError as e:
            if e.ceph_errno == errno.ECANCELED:
                return False
            self.conn.note_error(session, e.ceph_errno)
            raise
        return True

    async def delete(self, *, expect_version: int | None = None) -> None:
        """Remove the whole document (checked against expect_version if given)."""

        def do(io: Any) -> bool:
            op = io.create_write_op()
            try:
                if expect_version is not None:
                    op.omap_cmp(
                        VERSION_KEY,
                        str(expect_version) if expect_version else "",
                        rados.LIBRADOS_CMPXATTR_OP_EQ,
                    )
                op.remove()
                try:
                    io.operate_write_op(op, self.oid)
                except rados.ObjectNotFound:
                    return expect_version in (None, 0)
                except rados.OSError as e:
                    if e.errno == errno.ECANCELED:
                        return False
                    raise
                return True
            finally:
                io.release_write_op(op)

        if not await self._op("delete", do):
            raise VersionConflict(expect_version or 0, await self.version())

    # ------------------------------------------------------------------ watch / notify

    async def watch(
        self,
        on_change: Callable[[str], None],
        on_error: Callable[[int], None] | None = None,
        *,
        watch_timeout: int = 30,
    ) -> OmapWatch:
        """Call `on_change(message)` on the loop whenever someone notify()s this document.

        The document is created (empty) if missing: a watch needs an object. `on_error(errno)`
        means the watch was lost (connection reset, this client fenced, the OSD saw no ping
        for `watch_timeout` s): changes may have been missed."""
        loop = asyncio.get_running_loop()
        session = self.conn.session

        def deliver(notify_id: int, notifier_id: int, watch_id: int, data: bytes) -> None:  # Ceph thread
            message = bytes(data or b"").decode(errors="replace")
            try:
                loop.call_soon_threadsafe(on_change, message)
            except RuntimeError:
                pass

        def failed(*args: Any) -> None:  # Ceph thread
            # python3-rados passes (watch id, error), though its docstring says (error): with
            # one parameter, every lost watch was a TypeError in Ceph's thread, never seen.
            code = abs(int(args[-1]))
            try:
                loop.call_soon_threadsafe(self._watch_failed, session, code, on_error)
            except RuntimeError:
                pass

        def do(io: Any) -> Any:
            op = io.create_write_op()
            try:
                op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
                io.operate_write_op(op, self.oid)
            finally:
                io.release_write_op(op)
            return io.watch(self.oid, deliver, failed, watch_timeout)

        session.begin()  # until the watch is registered with the session (its teardown closes it)
        try:
            handle = await self._op("watch", do)
            return OmapWatch(self, session, handle, on_error)
        finally:
            session.end()

    def _watch_failed(self, session: Session, code: int, on_error: Callable[[int], None] | None) -> None:
        self.conn.note_error(session, -code)
        log.info("watch on %s lost: %s", self.oid, errno.errorcode.get(code, code))
        if on_error is not None:
            on_error(code)

    async def notify(self, message: str = "", *, wait: float = 5.0) -> int:
        """Tell every watcher; returns how many acknowledged within `wait` seconds."""
        session = self.conn.session
        loop = asyncio.get_running_loop()
        session.begin()
        fut, callback = completion(loop, f"{self.oid}: notify", lambda rv: session.end())
        try:
            session.ioctx.aio_notify(self.oid, callback, message, int(wait * 1000))
        except Exception as e:
            session.end()
            raise from_exception(e, f"{self.oid}: notify") from e
        try:
            result = await fut
        except RbdError as e:
            if e.ceph_errno == errno.ETIMEDOUT:  # some watcher did not answer in time
                return 0
            self.conn.note_error(session, e.ceph_errno)
            raise
        # aio_notify's callback gets (completion, return value, acks, timeouts).
        acks = result[1] if isinstance(result, tuple) and len(result) > 1 else []
        return len(acks or [])
