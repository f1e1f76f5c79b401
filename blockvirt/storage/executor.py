"""The one escape hatch for blocking syscalls: bounded thread pools, and flush coalescing.

Each storage pool (keyed by its directory) has its own threads: a slow or stuck device can
take all of its pool's threads, but never another pool's. Work not tied to a pool uses the
shared default."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
POOL_SIZE = 16

#: Work in flight on other threads: blocking calls (which want the interpreter lock back to
#: start and to hand their result to the loop) and Ceph aio ops (which need librbd's threads,
#: and on python3-rbd's callback path the lock too). Adaptive polling does not spin while any
#: is in flight: a spinning loop releases the lock only for instants, and takes the CPU those
#: threads need (server/polling.py).
_offloaded = 0


def offloaded() -> int:
    """How many offloaded calls and aio ops are in flight."""
    return _offloaded


def begin_offload() -> None:
    global _offloaded
    _offloaded += 1


def end_offload() -> None:
    global _offloaded
    _offloaded -= 1


async def _offload(submit: Callable[[], asyncio.Future[T]]) -> T:
    begin_offload()  # before the thread can start
    try:
        return await submit()
    finally:
        end_offload()


#: Thread pools given up on (give_up): calls may still run inside them.
_given_up: list[concurrent.futures.ThreadPoolExecutor] = []


def give_up(ex: concurrent.futures.ThreadPoolExecutor) -> None:
    """Stop waiting for `ex`: no new calls, queued ones dropped, and the calls still running
    (inside a client library waiting on a peer that does not answer) are not waited for. The
    process then ends without joining its threads (see stuck_threads)."""
    ex.shutdown(wait=False, cancel_futures=True)
    _given_up.append(ex)


def stuck_threads() -> int:
    """Threads of given-up pools still running a call. Python joins every pool thread at
    exit, so with any, `blockvirt serve` ends with os._exit instead of waiting for them."""
    # _threads: the pool's worker threads (CPython's attribute; typeshed declares it).
    return sum(1 for ex in _given_up for t in ex._threads if t.is_alive())


def pool(key: str = "") -> concurrent.futures.ThreadPoolExecutor:
    """The threads for `key` (a pool directory; "" for work tied to no pool)."""
    ex = _pools.get(key)
    if ex is None:
        name = "blockvirt-io" if not key else f"blockvirt-io-{len(_pools)}"
        ex = _pools[key] = concurrent.futures.ThreadPoolExecutor(POOL_SIZE, thread_name_prefix=name)
    return ex


async def run_in(key: str, fn: Callable[..., T], *args: object) -> T:
    """Run a blocking call on the threads of pool directory `key`."""
    loop = asyncio.get_running_loop()
    return await _offload(lambda: loop.run_in_executor(pool(key), fn, *args))


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking call off the loop (bounded pool, shared by every node)."""
    loop = asyncio.get_running_loop()
    if kwargs:
        return await _offload(lambda: loop.run_in_executor(pool(), lambda: fn(*args, **kwargs)))
    return await _offload(lambda: loop.run_in_executor(pool(), fn, *args))  # type: ignore[arg-type]


class FlushCoalescer:
    """Group commit: concurrent flushes share one sync, but a caller is only released by a
    sync that *started* after it arrived (so it covers every write completed before it)."""

    def __init__(self, do_flush: Callable[[], Awaitable[None]]) -> None:
        self._do_flush = do_flush
        self._lock = asyncio.Lock()
        self._started = 0
        self._finished = 0

    @property
    def busy(self) -> bool:
        """A sync is under way or waited for."""
        return self._lock.locked()

    async def flush(self) -> None:
        want = self._started + 1
        async with self._lock:
            if self._finished >= want:
                return
            # One loop turn before the sync starts: requests taken from the same receive
            # (several FUA writes of one batch) write and join this sync instead of waiting
            # for the next one. They still arrive before it starts, so it covers them.
            await asyncio.sleep(0)
            self._started += 1
            generation = self._started
            await self._do_flush()
            self._finished = generation
