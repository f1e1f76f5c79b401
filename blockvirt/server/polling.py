"""Adaptive polling for the event loop: while requests keep arriving, look for the next one
with non-blocking polls for a short window instead of sleeping in epoll.

A client at queue depth 1 sends its next request a few microseconds after our reply. If the
loop is asleep in epoll_wait by then, the kernel must wake it, often on the other CPU, and on
these machines that wake-up costs ~50 µs, several times the request's own service time.
Polling keeps the loop's thread on its CPU and sees the request at once (SPDK, io_uring's
SQPOLL and NAPI busy polling do the same). `sched_yield` between polls lets a client that
shares our CPU run at once.

The policy (pure, `PollPolicy`) spins only when the last wait ended within the window: that is
when polling would have caught it. A spin that finds nothing ends that until a wait ends
within the window again. So an idle server spins once after its last request and then never,
a server under a low request rate (gaps longer than the window) does not spin, and in between
the spinning costs at most one window per wait: at most `rate x window` of one CPU.

Nor does it spin while work handed to other threads is in flight (a commit's fdatasync, a
Ceph op): those threads need the interpreter lock to start and to hand their result back, a
spinning loop lets go of it only for instants, and they would wait until the window ends (a
FUA write at QD1 took 360 µs instead of 250). A Ceph op needs no lock on its eventfd path,
but takes hundreds of microseconds of librbd's threads, which a spin on the same CPU would
slow. Their results wake the loop through its self-pipe or an eventfd anyway. Such a wait,
when it is long, tells nothing about the clients, so it leaves the policy as it was: after
the reply, the loop spins for the client's next request as it would have on a fast backend.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from collections.abc import Callable
from typing import Any

from blockvirt.storage import executor

#: Default window: longer than a client's turnaround at QD1 (reply received, next request
#: sent: ~10-60 µs here), short enough that a spin that finds nothing costs little.
DEFAULT_WINDOW_US = 100


class PollPolicy:
    """When to spin (pure: time is an argument)."""

    __slots__ = ("dense", "spins", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        #: The last wait ended within the window: the next one will likely too.
        self.dense = False
        #: Waits that began by spinning (for tests and the performance notes).
        self.spins = 0

    def spin_until(self, now: float, timeout: float | None, offloaded: int = 0) -> float | None:
        """The deadline to spin until before blocking, or None: block at once. A timer due
        within the window is not worth spinning for (QoS pacing arms such timers while
        requests wait): the loop sleeps until it, as it would without polling. Nor is a wait
        while `offloaded` calls on other threads want the interpreter lock back."""
        if (
            not self.dense
            or self.window <= 0
            or offloaded
            or (timeout is not None and timeout <= self.window)
        ):
            return None
        self.spins += 1
        return now + self.window

    def waited(self, seconds: float, offloaded: int = 0) -> None:
        """A wait that found events took `seconds` (spinning included). A long wait that
        began with `offloaded` work in flight was most likely ended by that work (a Ceph op,
        a commit's sync), not by a client: it says nothing about the clients' pace, so it
        leaves `dense` as it was. At QD1 on a slow backend the loop then spins for the
        client's next request after each reply, instead of sleeping through it."""
        if seconds <= self.window:
            self.dense = True
        elif not offloaded:
            self.dense = False

    def missed(self) -> None:
        """A spin found nothing: the burst is over, block from now on until it starts again
        (so a server that went idle spins once, not at every timer tick)."""
        self.dense = False


class PollingSelector(selectors.BaseSelector):
    """A selector that polls before it sleeps (see PollPolicy); delegates everything else."""

    def __init__(
        self,
        window: float,
        inner: selectors.BaseSelector | None = None,
        offloaded: Callable[[], int] = lambda: 0,
    ) -> None:
        self.inner = inner if inner is not None else selectors.DefaultSelector()
        self.policy = PollPolicy(window)
        #: How many calls on other threads are in flight (see the module's notes).
        self.offloaded = offloaded

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        inner = self.inner
        if timeout is not None and timeout <= 0:
            return inner.select(0)  # callbacks are ready: the loop is busy, no wait at all
        policy = self.policy
        start = time.monotonic()
        busy = self.offloaded()
        deadline = policy.spin_until(start, timeout, busy)
        if deadline is not None:
            while True:
                ready = inner.select(0)
                if ready:
                    policy.waited(time.monotonic() - start)
                    return ready
                now = time.monotonic()
                if now >= deadline:
                    policy.missed()
                    break
                os.sched_yield()  # a client on our CPU runs now, not at our next tick
            if timeout is not None:
                timeout = max(0.0, timeout - (now - start))
        ready = inner.select(timeout)
        if ready:
            policy.waited(time.monotonic() - start, busy)
        return ready

    def close(self) -> None:
        self.inner.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.get_key(fileobj)

    def get_map(self) -> Any:
        return self.inner.get_map()


def new_loop(kind: str, busy_poll_us: float) -> asyncio.AbstractEventLoop:
    """The event loop `serve` runs on: `kind` "asyncio" (with adaptive polling unless
    `busy_poll_us` is 0) or "uvloop" (libuv's loop; it has no hook for polling)."""
    if kind == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    if busy_poll_us > 0:
        return asyncio.SelectorEventLoop(PollingSelector(busy_poll_us / 1e6, offloaded=executor.offloaded))
    return asyncio.SelectorEventLoop()


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """The loop and its polling window, for the start-up log."""
    if type(loop).__module__.startswith("uvloop"):
        return "event loop: uvloop, adaptive polling off"
    selector = getattr(loop, "_selector", None)
    if isinstance(selector, PollingSelector) and selector.policy.window > 0:
        return f"event loop: asyncio, adaptive polling {selector.policy.window * 1e6:g} us"
    return "event loop: asyncio, adaptive polling off"
