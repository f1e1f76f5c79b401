"""librbd's data path with no Python on Ceph's threads: C completions and an eventfd.

python3-rbd gives each aio op a completion that runs a Python callback, and librbd hands
such callbacks to its op thread: per op, one more thread hop and two interpreter-lock
hand-overs between that thread and the event loop (docs/rbd.md, "Performance"). librbd has a
way without them: a completion made with no callback is queued on the image, and librbd
writes an eventfd set with `rbd_set_image_notification`. The loop watches that fd and
collects finished ops with `rbd_poll_io_events`, in batches, on its own thread.

The calls go through ctypes on librbd's C API. The image handle is the one python3-rbd
opened (its locks, watch and fencing stay as they are); the binding does not expose it, so
`image_handle` reads it from the object and checks it against the image before use. If any
check fails, the image keeps the binding's callbacks (`AsyncImage` falls back).

Every op on a notified image must come through here: librbd queues every C-API completion
of that image for polling, the binding's too, so the binding's aio calls are not used on it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger("blockvirt.rbd")

_EVENT_TYPE_EVENTFD = 2  # librbd.h
#: Completions collected per rbd_poll_io_events call.
_BATCH = 64


def _load() -> tuple[Any, Any] | None:
    try:
        free = ctypes.CDLL("librbd.so.1")  # lets go of the interpreter lock per call
        held = ctypes.PyDLL("librbd.so.1")  # keeps it: calls that only read memory
    except OSError:
        return None
    vp, u64, i = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int
    sigs: list[tuple[Any, str, Any, list[Any]]] = [
        (free, "rbd_aio_write", i, [vp, u64, ctypes.c_size_t, ctypes.c_char_p, vp]),
        (free, "rbd_aio_read", i, [vp, u64, ctypes.c_size_t, ctypes.c_char_p, vp]),
        (free, "rbd_aio_discard", i, [vp, u64, u64, vp]),
        (free, "rbd_aio_write_zeroes", i, [vp, u64, ctypes.c_size_t, vp, i, i]),
        (free, "rbd_aio_flush", i, [vp, vp]),
        (held, "rbd_aio_create_completion", i, [vp, vp, ctypes.POINTER(vp)]),
        (held, "rbd_aio_get_return_value", ctypes.c_ssize_t, [vp]),
        (held, "rbd_aio_release", None, [vp]),
        (held, "rbd_poll_io_events", i, [vp, ctypes.POINTER(vp), i]),
        (held, "rbd_set_image_notification", i, [vp, i, i]),
        (held, "rbd_get_size", i, [vp, ctypes.POINTER(u64)]),
        (held, "rbd_get_name", i, [vp, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]),
    ]
    for lib, name, res, args in sigs:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return free, held


_libs = _load()


def available() -> bool:
    return _libs is not None


def image_handle(image: Any, ioctx: Any, name: str) -> int | None:
    """The `rbd_image_t` behind python3-rbd's `Image`, or None if it cannot be found safely.

    The binding's object holds, in order: the handle, the closed flag, the name and the
    ioctx object. The ioctx object's address is known, so its slot is found by value and
    no unknown pointer is followed; the handle is then checked against the image's size
    and name through librbd itself.
    """
    if _libs is None:
        return None
    _, held = _libs
    nwords = type(image).__basicsize__ // 8
    words = list((ctypes.c_uint64 * nwords).from_address(id(image)))
    slots = [i for i, w in enumerate(words) if w == id(ioctx)]
    if len(slots) != 1 or slots[0] < 5 or words[slots[0] - 2] != 0 or words[slots[0] - 3] == 0:
        return None
    handle = words[slots[0] - 3]
    size = ctypes.c_uint64()
    if held.rbd_get_size(handle, ctypes.byref(size)) != 0 or size.value != int(image.size()):
        return None
    buf = ctypes.create_string_buffer(4096)
    n = ctypes.c_size_t(len(buf))
    if held.rbd_get_name(handle, buf, ctypes.byref(n)) != 0 or buf.value.decode() != name:
        return None
    return int(handle)


#: Told an op's return value, on the loop, once it ends.
Settled = Callable[[int], None]
#: (future, what the op keeps alive until it ends, its result (None: the return value),
#: settled, what it is)
_Op = tuple["asyncio.Future[Any] | None", Any, Any, Callable[[int], None], str]


class NativeIo:
    """Aio ops on one open image, completed through an eventfd the loop watches.

    A future per op: set to the return value (a read's buffer for reads), or to the negative
    return value wrapped by `error(rv, what)`. `settled(rv)` runs on the loop once per op,
    whether or not anyone still awaits it.
    """

    def __init__(
        self,
        handle: int,
        loop: asyncio.AbstractEventLoop,
        error: Callable[[int, str], Exception],
        label: str,
    ) -> None:
        if _libs is None:
            raise RuntimeError("librbd is not loadable")
        self._free, self._held = _libs
        self._h = handle
        self._loop = loop
        self._error = error
        self._label = label
        #: In flight, by completion pointer (librbd reuses one only after it is released).
        self._ops: dict[int, _Op] = {}
        self._comps = (ctypes.c_void_p * _BATCH)()
        self._comp = ctypes.c_void_p()
        self._comp_out = ctypes.byref(self._comp)
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        r = self._held.rbd_set_image_notification(handle, self._fd, _EVENT_TYPE_EVENTFD)
        if r < 0:
            os.close(self._fd)
            raise OSError(-r, f"{label}: rbd_set_image_notification: {os.strerror(-r)}")
        loop.add_reader(self._fd, self._collect)
        self._watching = True
        self._closed = False

    # ------------------------------------------------------------ submit

    def _start(
        self, what: str, keep: Any, settled: Settled, result: Any = None, future: bool = True
    ) -> tuple[int, asyncio.Future[Any] | None]:
        r = self._held.rbd_aio_create_completion(None, None, self._comp_out)
        if r < 0:
            raise self._error(r, f"{self._label}: {what}")
        comp = self._comp.value or 0  # not null: librbd made it
        fut = self._loop.create_future() if future else None
        self._ops[comp] = (fut, keep, result, settled, what)
        return comp, fut

    def _submitted(self, comp: int, r: int, what: str) -> None:
        if r < 0:  # refused before it started: librbd will not complete it
            fut, _, _, settled, _ = self._ops.pop(comp)
            self._held.rbd_aio_release(comp)
            if fut is None:  # a callback is never run from within the call that started it
                self._loop.call_soon(settled, r)
                return
            settled(r)
            fut.set_exception(self._error(r, f"{self._label}: {what}"))

    # Each returns the op's future; the *_cb forms return nothing: `settled(rv)` is all the
    # caller hears (a read's data is then in the bytearray it passed).
    def write(self, offset: int, data: bytes | bytearray, settled: Settled) -> asyncio.Future[Any]:
        fut = self._write(offset, data, settled, True)
        assert fut is not None
        return fut

    def write_cb(self, offset: int, data: bytes | bytearray, settled: Settled) -> None:
        self._write(offset, data, settled, False)

    def _write(
        self, offset: int, data: bytes | bytearray, settled: Settled, future: bool
    ) -> asyncio.Future[Any] | None:
        # bytes pass as they are; a bytearray (a large payload) through a view of its memory
        buf = data if type(data) is bytes else (ctypes.c_char * len(data)).from_buffer(data)
        comp, fut = self._start("write", buf, settled, None, future)
        self._submitted(comp, self._free.rbd_aio_write(self._h, offset, len(data), buf, comp), "write")
        return fut

    def read(self, offset: int, length: int, settled: Settled) -> asyncio.Future[Any]:
        fut = self._read(offset, bytearray(length), settled, True)
        assert fut is not None
        return fut

    def read_cb(self, offset: int, into: bytearray, settled: Settled) -> None:
        self._read(offset, into, settled, False)

    def _read(
        self, offset: int, data: bytearray, settled: Settled, future: bool
    ) -> asyncio.Future[Any] | None:
        length = len(data)
        buf = (ctypes.c_char * length).from_buffer(data)
        comp, fut = self._start("read", buf, settled, data, future)
        self._submitted(comp, self._free.rbd_aio_read(self._h, offset, length, buf, comp), "read")
        return fut

    def discard(self, offset: int, length: int, settled: Settled) -> asyncio.Future[Any]:
        comp, fut = self._start("discard", None, settled)
        self._submitted(comp, self._free.rbd_aio_discard(self._h, offset, length, comp), "discard")
        assert fut is not None
        return fut

    def write_zeroes(self, offset: int, length: int, settled: Settled) -> asyncio.Future[Any]:
        comp, fut = self._start("write_zeroes", None, settled)
        r = self._free.rbd_aio_write_zeroes(self._h, offset, length, comp, 0, 0)
        self._submitted(comp, r, "write_zeroes")
        assert fut is not None
        return fut

    def flush(self, settled: Settled) -> asyncio.Future[Any]:
        comp, fut = self._start("flush", None, settled)
        self._submitted(comp, self._free.rbd_aio_flush(self._h, comp), "flush")
        assert fut is not None
        return fut

    # ------------------------------------------------------------ complete

    def _collect(self) -> None:
        """On the loop, when librbd signalled the eventfd: settle every finished op."""
        try:
            os.eventfd_read(self._fd)  # reset first: a completion after the poll signals again
        except BlockingIOError:
            pass
        held, comps = self._held, self._comps
        while True:
            n = held.rbd_poll_io_events(self._h, comps, _BATCH)
            done = []
            for i in range(n):  # first take the whole batch out of librbd's hands
                comp = comps[i] or 0
                done.append((self._ops.pop(comp, None), held.rbd_aio_get_return_value(comp)))
                held.rbd_aio_release(comp)
            for op, rv in done:
                if op is None:
                    continue
                try:
                    self._settle(op, rv)
                except Exception:  # one op's bookkeeping must not strand the rest of the batch
                    log.exception("%s: settling an op failed", self._label)
            if n < _BATCH:
                return

    def _settle(self, op: _Op, rv: int) -> None:
        fut, _, result, settled, what = op
        settled(rv)
        if fut is None or fut.done():  # the waiter was cancelled; the op still ran to its end
            return
        if rv < 0:
            fut.set_exception(self._error(rv, f"{self._label}: {what}"))
        elif result is None:
            fut.set_result(rv)
        else:  # a read: its buffer, cut to what was read (the caller refuses a short one)
            fut.set_result(result if rv == len(result) else result[:rv])

    @property
    def inflight(self) -> int:
        return len(self._ops)

    def stop_watching(self) -> None:
        """Take the eventfd off the loop: no _collect runs from now on. Before the image is
        closed, and only once no op is in flight. The eventfd can be readable with nothing to
        collect (librbd signals after queueing an event, so a poll may take the event before
        its signal lands); left watched, that late signal would have the loop poll an image
        that another thread is closing, a use-after-free."""
        if self._watching:
            self._watching = False
            if not self._loop.is_closed():
                self._loop.remove_reader(self._fd)

    def close(self) -> None:
        """Stop watching and close the eventfd: after the image is closed, so librbd never
        signals a descriptor number that may be reused by then."""
        if self._closed:
            return
        self._closed = True
        self.stop_watching()
        os.close(self._fd)
