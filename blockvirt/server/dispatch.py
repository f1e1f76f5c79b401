"""Commands -> block node calls. Peer input is validated here, once; storage errors become
NBD error replies. Nothing here touches a socket: replies are returned as buffers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any

from blockvirt.nbd.constants import (
    ALLOWED_CMD_FLAGS,
    BASE_ALLOCATION,
    MAX_PAYLOAD_ADVERTISED,
    MAX_PAYLOAD_SERVED,
    QEMU_ALLOCATION_DEPTH,
    Cmd,
    CmdFlag,
    Errno,
    TransmissionFlag,
)
from blockvirt.nbd.events import (
    BlockStatusCmd,
    CacheCmd,
    Command,
    FlushCmd,
    ReadCmd,
    TrimCmd,
    UnknownCmd,
    WriteCmd,
    WriteZeroesCmd,
)
from blockvirt.nbd.exceptions import CommandError, nbd_errno
from blockvirt.nbd.transmission import ServerTransmission, merge_extents
from blockvirt.storage.node import SPARSE_READ_MIN, BlockNode, Buffer, StorageError
from blockvirt.storage.stats import LATENCY_BOUNDS, Latency, VolumeStats

if TYPE_CHECKING:
    from blockvirt.qos.manager import VolumeQos
    from blockvirt.server.bitmaps import SessionBitmaps

log = logging.getLogger("blockvirt.dispatch")

Out = list[bytes | bytearray | memoryview]
#: serve_inline's answer for a request started by submission: its reply goes to `deliver`.
SUBMITTED: Out = []
#: Where a submitted request's reply goes: (reply, the request).
Deliver = Callable[[Out, Command], None]

_FIRST_BOUND = LATENCY_BOUNDS[0]
_FUA = int(CmdFlag.FUA)
_DF = int(CmdFlag.DF)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_ALLOWED = {
    ReadCmd: int(ALLOWED_CMD_FLAGS[Cmd.READ]),
    WriteCmd: int(ALLOWED_CMD_FLAGS[Cmd.WRITE]),
    FlushCmd: int(ALLOWED_CMD_FLAGS[Cmd.FLUSH]),
    TrimCmd: int(ALLOWED_CMD_FLAGS[Cmd.TRIM]),
    CacheCmd: int(ALLOWED_CMD_FLAGS[Cmd.CACHE]),
    WriteZeroesCmd: int(ALLOWED_CMD_FLAGS[Cmd.WRITE_ZEROES]),
    BlockStatusCmd: int(ALLOWED_CMD_FLAGS[Cmd.BLOCK_STATUS]),
}
_OP_NAMES = {
    ReadCmd: "read",
    WriteCmd: "write",
    FlushCmd: "flush",
    TrimCmd: "trim",
    CacheCmd: "cache",
    WriteZeroesCmd: "write_zeroes",
    BlockStatusCmd: "block_status",
}
#: Commands that change data (read-only exports refuse them with EPERM).
_MUTATING = (WriteCmd, TrimCmd, WriteZeroesCmd)


class Dispatcher:
    """Validates and executes one session's commands against its export's node."""

    def __init__(
        self,
        node: BlockNode,
        size: int,
        tflags: int,
        tx: ServerTransmission,
        contexts: dict[int, str],
        stats: VolumeStats | None = None,
        qos: VolumeQos | None = None,
        bitmaps: SessionBitmaps | None = None,
    ) -> None:
        self.node = node
        #: The qemu:dirty-bitmap contexts among `contexts` (None: none selected).
        self.bitmaps = bitmaps
        #: Storage I/O control of the volume (None: no QoS at all).
        self.qos = qos
        #: Cookies admitted by QoS in try_now that then went the slow way (not charged twice).
        self._prepaid: dict[int, bool] = {}
        #: Tasks waiting for QoS admission: a client that goes away cancels them.
        self.waiting: set[asyncio.Task[Any]] = set()
        self.stats = stats if stats is not None else VolumeStats()
        #: False under `serve --no-metrics`: no per-request accounting, no clock reads
        #: (errors, which are rare, are still counted). Requests are counted when answered.
        self.metered = self.stats.enabled
        #: The size this session negotiated. NBD cannot announce a change, but a volume can
        #: grow under a connected client: a client that learns the new size (NBD_OPT_INFO on
        #: the side, or a netlink reconfigure) may use it, so ranges are checked against the
        #: larger of this and the node's size now. (Shrinking is refused while connected.)
        self.size = size
        self.read_only = bool(tflags & TransmissionFlag.READ_ONLY)
        #: Inline replies are sent (or copied) before the session yields to the loop, so
        #: large reads may answer with views of the page cache (see read_view_nowait). The
        #: session sets this when its transport copies what it cannot send at once.
        self.borrow = False
        # The fast path's histograms, at hand (they exist from the first session on).
        metered = self.metered
        self._read_lat = self.stats.latency_of("read") if metered else Latency()
        self._write_lat = self.stats.latency_of("write") if metered and not self.read_only else Latency()
        self._t0 = perf_counter()  # see begin()
        self.tx = tx
        self.contexts = contexts
        allowed = dict(_ALLOWED)
        if not tflags & TransmissionFlag.SEND_DF:
            allowed[ReadCmd] &= ~_DF
        if not tflags & TransmissionFlag.SEND_FAST_ZERO:
            allowed[WriteZeroesCmd] &= ~_FAST_ZERO
        self._allowed = allowed
        #: Writes completed since the last flush by this session (flushed on disconnect).
        self.unflushed = False
        #: Bumped by every completed non-FUA write: a FLUSH only clears `unflushed` if no
        #: write completed while it ran (such a write need not be covered by it).
        self._dirtied = 0
        #: Set by the session: replies of requests that the node started by submission
        #: (BlockNode.read_submit/write_submit) go here when they end. None: no submission.
        self.deliver: Deliver | None = None
        #: FUA writes written inline and not answered yet: (cookie, start time). One sync
        #: covers them all when the session has taken the requests at hand (settle_fua).
        self.fua_pending: list[tuple[int, float]] = []

    # ------------------------------------------------------------ validation
    def check(self, cmd: Command) -> CommandError | None:
        """Why `cmd` must fail before touching storage, or None if it may run."""
        err = self._check(cmd)
        if err is not None:
            self.stats.errors += 1
        return err

    def _check(self, cmd: Command) -> CommandError | None:
        t = type(cmd)
        allowed = self._allowed.get(t)
        if allowed is None:
            assert isinstance(cmd, UnknownCmd), t
            return CommandError(Errno.EINVAL, f"unknown command {cmd.type}")
        if cmd.flags & ~allowed:
            return CommandError(Errno.EINVAL, f"flags {cmd.flags:#x} not valid for this command")
        if t is FlushCmd:
            return None
        if self.read_only and t in _MUTATING:
            return CommandError(Errno.EPERM, "export is read-only")
        end = cmd.offset + cmd.length
        if end > self.size and end > self.node.size:
            # Spec: writing past the end SHOULD be ENOSPC, every other range error EINVAL.
            errno = Errno.ENOSPC if t is WriteCmd or t is WriteZeroesCmd else Errno.EINVAL
            return CommandError(errno, f"request [{cmd.offset}, {end}) beyond export size {self.size}")
        if t is WriteCmd:
            if cmd.data is None:  # type: ignore[attr-defined]
                return CommandError(Errno.EINVAL, f"write payload larger than {MAX_PAYLOAD_SERVED} bytes")
        elif t is ReadCmd:
            if cmd.length > MAX_PAYLOAD_SERVED:
                return CommandError(Errno.EINVAL, f"read larger than {MAX_PAYLOAD_SERVED} bytes")
            if cmd.flags & _DF and cmd.length > MAX_PAYLOAD_ADVERTISED:
                # DF forbids splitting, and no chunk may exceed the advertised maximum.
                return CommandError(Errno.EOVERFLOW, f"DF read larger than {MAX_PAYLOAD_ADVERTISED} bytes")
        elif t is BlockStatusCmd:
            if not self.contexts:
                return CommandError(Errno.EINVAL, "no metadata context was negotiated")
            if cmd.length == 0:
                return CommandError(Errno.EINVAL, "block status of an empty range")
        return None

    # ------------------------------------------------------------ the session's entry
    def serve_inline(self, cmd: Command) -> Out | None:
        """Validate `cmd` and complete it if it can finish without awaiting: its reply (an
        error reply if it is invalid or storage failed), or None: run it as a task (`run`).

        The common READ and WRITE (no flags, inside the size negotiated, and a READ shorter
        than SPARSE_READ_MIN) need no other validation, and take a short path to the node;
        everything else goes through check() and try_now().

        A FUA WRITE the node can take inline is written and answered by an empty list: its
        reply waits in `fua_pending` for the sync that the session asks for (settle_fua)
        once it has taken the requests at hand, so a burst of FUA writes shares one sync.
        """
        t = type(cmd)
        if t is ReadCmd:
            length = cmd.length
            if not cmd.flags and 0 < length < SPARSE_READ_MIN and cmd.offset + length <= self.size:
                try:
                    return self._read_now(cmd)
                except StorageError as e:
                    return self.error_reply(cmd, e)
        elif (
            t is WriteCmd
            and not self.read_only
            and cmd.offset + cmd.length <= self.size
            and cmd.data is not None  # type: ignore[attr-defined]  # None: too large, check() says
        ):
            flags = cmd.flags
            if not flags:
                try:
                    return self._write_now(cmd)
                except StorageError as e:
                    return self.error_reply(cmd, e)
            if flags == _FUA and cmd.length:
                try:
                    return self._fua_write_now(cmd)
                except StorageError as e:
                    return self.error_reply(cmd, e)
        err = self.check(cmd)
        if err is not None:
            return self.error_reply(cmd, err)
        try:
            return self.try_now(cmd)
        except StorageError as e:
            return self.error_reply(cmd, e)

    def _read_now(self, cmd: Command) -> Out | None:
        """A valid small READ without flags (see serve_inline): one chunk of data."""
        offset, length = cmd.offset, cmd.length
        qos = self.qos
        admitted = 0
        if qos is not None and qos.active:
            admitted = qos.try_admit(length)
            if not admitted:
                return self._not_now()
        # Below SPARSE_READ_MIN a sparse read is this very read (see storage.node).
        data = self.node.read_nowait(offset, length)
        if data is None:
            if self.deliver is not None and self._read_submit(cmd, admitted):
                return SUBMITTED
            return self._prepay(cmd, admitted) if admitted else self._not_now()
        if admitted == 2:
            qos.finished(None)  # type: ignore[union-attr]
        if self.metered:
            # Latency.observe written out for its common case (a page-cache hit lands in the
            # first bucket): this runs for every inline request.
            now = perf_counter()
            seconds = now - self._t0
            self._t0 = now
            lat = self._read_lat
            if seconds <= _FIRST_BOUND:
                lat.counts[0] += 1
                lat.total += seconds
            else:
                lat.observe(seconds)
            self.stats.read_bytes += length
        return self.tx.read_data(cmd.cookie, offset, data)

    def _write_now(self, cmd: Command) -> Out | None:
        """A valid small WRITE without flags (see serve_inline)."""
        qos = self.qos
        admitted = 0
        if qos is not None and qos.active:
            admitted = qos.try_admit(cmd.length)
            if not admitted:
                return self._not_now()
        if not self.node.write_nowait(cmd.offset, cmd.data):  # type: ignore[attr-defined]
            if self.deliver is not None and self._write_submit(cmd, admitted):
                return SUBMITTED
            return self._prepay(cmd, admitted) if admitted else self._not_now()
        if admitted == 2:
            qos.finished(None)  # type: ignore[union-attr]
        if self.metered:  # as in _read_now
            now = perf_counter()
            seconds = now - self._t0
            self._t0 = now
            lat = self._write_lat
            if seconds <= _FIRST_BOUND:
                lat.counts[0] += 1
                lat.total += seconds
            else:
                lat.observe(seconds)
            self.stats.write_bytes += cmd.length
        self.unflushed = True
        self._dirtied += 1
        return [self.tx.ok(cmd.cookie)]

    def _fua_write_now(self, cmd: Command) -> Out | None:
        """A valid FUA WRITE (see serve_inline): written now, answered by settle_fua."""
        qos = self.qos
        admitted = 0
        if qos is not None and qos.active:
            admitted = qos.try_admit(cmd.length)
            if not admitted:
                return self._not_now()
        if not self.node.write_fua_nowait(cmd.offset, cmd.data):  # type: ignore[attr-defined]
            return self._prepay(cmd, admitted) if admitted else self._not_now()
        if admitted == 2:
            qos.finished(None)  # type: ignore[union-attr]
        if self.metered:
            now = perf_counter()
            self.fua_pending.append((cmd.cookie, self._t0))
            self._t0 = now
            self.stats.write_bytes += cmd.length
        else:
            self.fua_pending.append((cmd.cookie, 0.0))
        return []

    def _read_submit(self, cmd: Command, admitted: int) -> bool:
        """Start a small READ on a node that completes elsewhere (see BlockNode.read_submit);
        its reply goes to `deliver` when it ends. False: not started."""
        cookie, offset, length = cmd.cookie, cmd.offset, cmd.length
        t0, deliver = self._t0, self.deliver
        assert deliver is not None

        def done(data: Buffer | None, err: StorageError | None) -> None:
            if err is None:
                out = self.tx.read_data(cookie, offset, data)  # type: ignore[arg-type]
                if self.metered:
                    self._read_lat.observe(perf_counter() - t0)
                    self.stats.read_bytes += length
            else:
                out = self._submit_failed(cmd, err)
            self._submit_ended(admitted, t0, err)
            deliver(out, cmd)

        if not self.node.read_submit(offset, length, done):
            return False
        if self.metered:
            self._t0 = perf_counter()
        return True

    def _write_submit(self, cmd: Command, admitted: int) -> bool:
        """As _read_submit, for a WRITE without flags."""
        cookie, length = cmd.cookie, cmd.length
        t0, deliver = self._t0, self.deliver
        assert deliver is not None

        def done(err: StorageError | None) -> None:
            if err is None:
                self.unflushed = True
                self._dirtied += 1
                out: Out = [self.tx.ok(cookie)]
                if self.metered:
                    self._write_lat.observe(perf_counter() - t0)
                    self.stats.write_bytes += length
            else:
                out = self._submit_failed(cmd, err)
            self._submit_ended(admitted, t0, err)
            deliver(out, cmd)

        if not self.node.write_submit(cmd.offset, cmd.data, done):  # type: ignore[attr-defined]
            return False
        if self.metered:
            self._t0 = perf_counter()
        return True

    def _submit_ended(self, admitted: int, t0: float, err: StorageError | None) -> None:
        if admitted == 2:  # counted in the pool's latency window (see run)
            self.qos.finished(None if err is not None else perf_counter() - t0)  # type: ignore[union-attr]

    def _submit_failed(self, cmd: Command, err: StorageError) -> Out:
        self._failed(cmd)
        log.warning("%s failed: %s", type(cmd).__name__, err)
        return [self.tx.error(cmd.cookie, nbd_errno(err.errno), str(err))]

    def settle_fua(self) -> Out | None:
        """Make the pending FUA writes durable without awaiting if the node can: their
        replies (errors if the sync failed). None: the node must await it; the caller takes
        `fua_pending` over and awaits settle_fua_later with it."""
        pending = self.fua_pending
        try:
            done = self.node.sync_nowait()
        except StorageError as e:
            self.fua_pending = []
            return self._fua_failed(pending, e)
        if not done:
            return None
        self.fua_pending = []
        return self._fua_done(pending)

    async def settle_fua_later(self, pending: list[tuple[int, float]]) -> Out:
        """The pending FUA writes made durable by an awaited sync (see settle_fua)."""
        try:
            await self.node.sync()
        except (StorageError, OSError) as e:
            log.warning("FUA write's sync failed: %s", e)
            return self._fua_failed(pending, e)
        return self._fua_done(pending)

    def _fua_done(self, pending: list[tuple[int, float]]) -> Out:
        tx = self.tx
        if self.metered:
            now = perf_counter()
            lat = self._write_lat
            for _, t0 in pending:
                lat.observe(now - t0)
        return [tx.ok(cookie) for cookie, _ in pending]

    def _fua_failed(self, pending: list[tuple[int, float]], e: StorageError | OSError) -> Out:
        errno = nbd_errno(e.errno)
        out: Out = []
        for cookie, _ in pending:
            if self.metered:
                self.stats.fail("write")
            else:
                self.stats.errors += 1
            out.append(self.tx.error(cookie, errno, str(e)))
        return out

    # ------------------------------------------------------------ fast path
    def begin(self) -> None:
        """The session starts on a run of requests now (a burst, or after sending replies)."""
        if self.metered:
            self._t0 = perf_counter()

    def try_now(self, cmd: Command) -> Out | None:
        """Complete a READ or small WRITE without awaiting, if the node can; else None.

        Raises StorageError for a failure the caller must report.

        Inline requests are timed with one clock read each: from the end of the one before
        (or `begin`) to the end of this one, so the time includes parsing and validation.
        """
        t = type(cmd)
        qos = self.qos
        if t is ReadCmd:
            if cmd.length == 0:
                return self._not_now()
            admitted = 0
            if qos is not None and qos.active:
                admitted = qos.try_admit(cmd.length)
                if not admitted:
                    return self._not_now()
            if self.tx.structured and not cmd.flags & _DF:
                # The node decides whether looking for holes pays (large reads only).
                node = self.node
                read = node.read_view_nowait if self.borrow else node.read_sparse_nowait
                segs = read(cmd.offset, cmd.length)
                if segs is None:
                    return self._prepay(cmd, admitted) if admitted else self._not_now()
                if admitted == 2:
                    qos.finished(None)  # type: ignore[union-attr]
                if self.metered:
                    now = perf_counter()
                    self._read_lat.observe(now - self._t0)
                    self._t0 = now
                    self.stats.read_bytes += cmd.length
                return self.tx.read_segments(cmd.cookie, segs)
            data = self.node.read_nowait(cmd.offset, cmd.length)
            if data is None:
                return self._prepay(cmd, admitted) if admitted else self._not_now()
            if admitted == 2:
                qos.finished(None)  # type: ignore[union-attr]
            if self.metered:
                now = perf_counter()
                self._read_lat.observe(now - self._t0)
                self._t0 = now
                self.stats.read_bytes += cmd.length
            return self.tx.read_data(cmd.cookie, cmd.offset, data)
        if t is WriteCmd and not cmd.flags & _FUA:
            admitted = 0
            if qos is not None and qos.active:
                admitted = qos.try_admit(cmd.length)
                if not admitted:
                    return self._not_now()
            if not self.node.write_nowait(cmd.offset, cmd.data):  # type: ignore[attr-defined]
                return self._prepay(cmd, admitted) if admitted else self._not_now()
            if admitted == 2:
                qos.finished(None)  # type: ignore[union-attr]
            if self.metered:
                now = perf_counter()
                self._write_lat.observe(now - self._t0)
                self._t0 = now
                self.stats.write_bytes += cmd.length
            self.unflushed = True
            self._dirtied += 1
            return [self.tx.ok(cmd.cookie)]
        return self._not_now()

    def _prepay(self, cmd: Command, admitted: int) -> Out | None:
        """QoS admitted this request inline but it must go the slow way after all: it is not
        charged again there (and, if counted in a latency window, finishes there)."""
        self._prepaid[cmd.cookie] = admitted == 2
        return self._not_now()

    def _not_now(self) -> Out | None:
        """Not answered inline (run() times it): the next inline request starts from now.
        Always None, try_now's answer."""
        if self.metered:
            self._t0 = perf_counter()
        return None

    # ------------------------------------------------------------ full path
    async def _admit(self, qos: VolumeQos, cmd: Command) -> bool:
        """Wait for QoS admission (data commands only; FLUSH and BLOCK_STATUS are free).
        Returns whether the request is counted in the pool's latency window."""
        t = type(cmd)
        if t is FlushCmd or t is BlockStatusCmd:
            return False
        if self._prepaid:
            counted = self._prepaid.pop(cmd.cookie, None)
            if counted is not None:
                return counted
        nbytes = cmd.length if t is ReadCmd or t is WriteCmd else 0
        admitted = qos.try_admit(nbytes)
        if admitted:
            return admitted == 2
        task = asyncio.current_task()
        assert task is not None
        self.waiting.add(task)
        try:
            return await qos.admit(nbytes)
        finally:
            self.waiting.discard(task)

    def abandon(self) -> None:
        """The client went away: requests still waiting for QoS are dropped."""
        for task in list(self.waiting):
            task.cancel()

    async def run(self, cmd: Command) -> Out:
        qos = self.qos
        counted = qos is not None and qos.active and await self._admit(qos, cmd)
        metered = self.metered
        t0 = perf_counter() if metered or counted else 0.0
        try:
            out = await self._run(cmd)
            if counted:
                assert qos is not None
                qos.finished(perf_counter() - t0)
                counted = False
            if metered:
                self._completed(cmd, perf_counter() - t0)
            return out
        except CommandError as e:
            self._failed(cmd)
            return [self.tx.error(cmd.cookie, e.errno, e.message)]
        except (StorageError, OSError) as e:
            self._failed(cmd)
            log.warning("%s failed: %s", type(cmd).__name__, e)
            return [self.tx.error(cmd.cookie, nbd_errno(e.errno), str(e))]
        finally:
            if counted:  # failed or cancelled: it left the backend all the same
                assert qos is not None
                qos.finished(None)

    def _completed(self, cmd: Command, seconds: float) -> None:
        t = type(cmd)
        stats = self.stats
        stats.observe(_OP_NAMES[t], seconds)
        if t is ReadCmd:
            stats.read_bytes += cmd.length
        elif t is WriteCmd:
            stats.write_bytes += cmd.length

    def _failed(self, cmd: Command) -> None:
        if self.metered:
            self.stats.fail(_OP_NAMES[type(cmd)])
        else:
            self.stats.errors += 1

    def error_reply(self, cmd: Command, err: CommandError | StorageError) -> Out:
        if self._prepaid and self._prepaid.pop(cmd.cookie, False) and self.qos is not None:
            self.qos.finished(None)
        if isinstance(err, StorageError):  # from try_now: the request was valid
            self._failed(cmd)
            return [self.tx.error(cmd.cookie, nbd_errno(err.errno), str(err))]
        return [self.tx.error(cmd.cookie, err.errno, err.message)]

    async def _run(self, cmd: Command) -> Out:
        node, tx, cookie = self.node, self.tx, cmd.cookie
        fua = bool(cmd.flags & _FUA)
        t = type(cmd)
        if t is ReadCmd:
            if cmd.length == 0:
                return [tx.read_empty(cookie)]
            if tx.structured and not cmd.flags & _DF:
                segs = await node.read_sparse(cmd.offset, cmd.length)
                return tx.read_segments(cookie, segs)
            return tx.read_data(cookie, cmd.offset, await node.read(cmd.offset, cmd.length))
        if t is WriteCmd:
            await node.write(cmd.offset, cmd.data, fua)  # type: ignore[attr-defined]
            self._written(fua)
            return [tx.ok(cookie)]
        if t is FlushCmd:
            dirtied = self._dirtied
            await node.flush()
            if self._dirtied == dirtied:
                self.unflushed = False
            return [tx.ok(cookie)]
        if t is WriteZeroesCmd:
            if cmd.flags & _FAST_ZERO and not await node.fast_zero_possible():
                raise CommandError(Errno.ENOTSUP, "zeroing this range is not faster than writing")
            await node.zero(cmd.offset, cmd.length, may_trim=not cmd.flags & _NO_HOLE, fua=fua)
            self._written(fua)
            return [tx.ok(cookie)]
        if t is TrimCmd:
            await node.trim(cmd.offset, cmd.length, fua)
            self._written(fua)
            return [tx.ok(cookie)]
        if t is CacheCmd:
            await node.cache(cmd.offset, cmd.length)
            return [tx.ok(cookie)]
        if t is BlockStatusCmd:
            return [tx.block_status(cookie, await self._block_status(cmd))]
        raise AssertionError(f"unvalidated command {cmd!r}")

    def _written(self, fua: bool) -> None:
        if not fua:
            self.unflushed = True
            self._dirtied += 1

    async def close(self) -> None:
        """The session ended: release what its contexts hold."""
        if self.bitmaps is not None:
            await self.bitmaps.close()

    async def _allocation(self, cmd: Command) -> list[tuple[int, int]]:
        extents = merge_extents(await self.node.block_status(cmd.offset, cmd.length))
        if not extents:  # nodes must answer at least one byte; be safe
            extents = [(min(cmd.length, max(self.size, self.node.size) - cmd.offset), 0)]
        if cmd.flags & _REQ_ONE:
            ln, fl = extents[0]
            extents = [(min(ln, cmd.length), fl)]
        return extents

    async def _block_status(self, cmd: Command) -> dict[int, Sequence[tuple[int, int]]]:
        out: dict[int, Sequence[tuple[int, int]]] = {}
        bitmaps = self.bitmaps
        for cid, name in self.contexts.items():
            if name == BASE_ALLOCATION:
                out[cid] = await self._allocation(cmd)
            elif bitmaps is not None and cid in bitmaps:
                out[cid] = await bitmaps.extents(cid, cmd.offset, cmd.length, bool(cmd.flags & _REQ_ONE))
            elif name == QEMU_ALLOCATION_DEPTH:
                dext = merge_extents(await self.node.allocation_depth(cmd.offset, cmd.length))
                if not dext:
                    dext = [(min(cmd.length, max(self.size, self.node.size) - cmd.offset), 0)]
                out[cid] = [(min(dext[0][0], cmd.length), dext[0][1])] if cmd.flags & _REQ_ONE else dext
        return out
