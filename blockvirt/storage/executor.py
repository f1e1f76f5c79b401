"""The one escape hatch for blocking syscalls: a bounded thread pool, and flush coalescing."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_pool: concurrent.futures.ThreadPoolExecutor | None = None
POOL_SIZE = 16


def pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(POOL_SIZE, thread_name_prefix="blockvirt-io")
    return _pool


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking call off the loop (bounded pool, shared by every node)."""
    loop = asyncio.get_running_loop()
    if kwargs:
        return await loop.run_in_executor(pool(), lambda: fn(*args, **kwargs))
    return await loop.run_in_executor(pool(), fn, *args)  # type: ignore[arg-type]


class FlushCoalescer:
    """Group commit: concurrent flushes share one sync, but a caller is only released by a
    sync that *started* after it arrived (so it covers every write completed before it)."""

    def __init__(self, do_flush: Callable[[], Awaitable[None]]) -> None:
        self._do_flush = do_flush
        self._lock = asyncio.Lock()
        self._started = 0
        self._finished = 0

    async def flush(self) -> None:
        want = self._started + 1
        async with self._lock:
            if self._finished >= want:
                return
            self._started += 1
            generation = self._started
            await self._do_flush()
            self._finished = generation
