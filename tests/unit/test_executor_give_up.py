"""executor.give_up: a pool whose calls do not return is not waited for, and counted."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from blockvirt.storage import executor


def test_given_up_pool_counts_its_running_calls_until_they_return() -> None:
    ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="test-give-up")
    release = threading.Event()
    started = threading.Event()

    def stuck() -> str:
        started.set()
        release.wait(10)
        return "returned"

    running = ex.submit(stuck)
    assert started.wait(5)
    queued = [ex.submit(lambda: "ran") for _ in range(3)]  # behind the stuck call
    before = executor.stuck_threads()
    executor.give_up(ex)
    assert executor.stuck_threads() == before + 1
    # No new calls; the queued ones that had not started are dropped.
    with pytest.raises(RuntimeError):
        ex.submit(lambda: None)
    assert all(f.cancelled() for f in queued)
    release.set()
    assert running.result(5) == "returned"
    for t in list(ex._threads):
        t.join(5)
    assert executor.stuck_threads() == before
