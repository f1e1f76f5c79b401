"""From librados/librbd completion callbacks to asyncio futures.

An aio call takes a callback that Ceph runs on one of its own threads (a "finisher") with the
GIL held. That thread must not touch the event loop, and must not block: the callback only
reads the return value and hands it to the loop with call_soon_threadsafe. Everything else
(setting the future, counting in-flight ops, noticing fencing) happens on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from blockvirt.storage.backends.rbd.errors import rbd_error

#: What Ceph calls: the completion, then op-specific values (aio_read's data, notify's acks).
CephCallback = Callable[..., None]


def completion(
    loop: asyncio.AbstractEventLoop,
    what: str,
    settled: Callable[[int], None] | None = None,
) -> tuple[asyncio.Future[Any], CephCallback]:
    """A future and the callback to pass to an aio call.

    The future gets the op's extra value (aio_read's bytes; the tuple of them when there are
    several) or its return value, or an RbdError when the return value is negative.
    `settled(rv)` runs on the loop once per op, whether or not anyone still awaits it.
    """
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(rv: int, value: Any) -> None:  # on the loop
        if settled is not None:
            settled(rv)
        if fut.done():  # the waiter was cancelled; the op still ran to its end
            return
        if rv < 0:
            fut.set_exception(rbd_error(rv, what))
        else:
            fut.set_result(value)

    def on_complete(comp: Any, *extra: Any) -> None:  # on a Ceph thread
        rv = int(comp.get_return_value())
        value: Any = rv if not extra else extra[0] if len(extra) == 1 else extra
        try:
            loop.call_soon_threadsafe(settle, rv, value)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass

    return fut, on_complete
