"""Where a FUA write's sync runs: on the loop when the head holds nothing dirty but FUA
writes and one request waits for it, in a thread otherwise, and in threads for a while after
one was slow. Durability is the crash harness's business; this is about the choice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockvirt.storage import executor
from blockvirt.storage.backends.cowfile.chain import ChainNode
from blockvirt.storage.backends.cowfile.layer import Layer, SyncGuard, WriteGuard, no_small_sync
from blockvirt.storage.fileio import REAL

MiB = 1 << 20
SIZE = 16 * MiB


class Syncs:
    """Counts fdatasync calls of the data file, by thread: inline (the loop's) or not."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> None:
        import threading
        import time

        self.inline = 0
        self.threaded = 0
        loop_thread = threading.get_ident()
        real = REAL.fdatasync

        def fdatasync(fd: int) -> None:
            if threading.get_ident() == loop_thread:
                self.inline += 1
            else:
                self.threaded += 1
            if delay:
                time.sleep(delay)
            real(fd)

        monkeypatch.setattr(REAL, "fdatasync", fdatasync)


def _chain(pool: Path, *, thick: bool = True) -> ChainNode:
    lid = "5" * 32
    Layer.create(REAL, str(pool), lid, SIZE, thick=thick)
    head = Layer.open(REAL, str(pool), lid, SIZE, writable=True)
    return ChainNode([head], SIZE, writable=True)


async def test_a_lone_fua_write_syncs_on_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = _chain(tmp_path)
    syncs = Syncs(monkeypatch)
    for i in range(5):
        await node.write(i * 4096, b"f" * 4096, fua=True)
    assert (syncs.inline, syncs.threaded) == (5, 0)
    node.head.close()


async def test_a_sync_after_buffered_writes_runs_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _chain(tmp_path)
    syncs = Syncs(monkeypatch)
    await node.write(0, b"b" * 4096)  # buffered: the file holds dirty data of its own
    await node.write(8192, b"f" * 4096, fua=True)  # a dsync write of its own, in a thread
    await node.flush()  # syncs everything buffered: a thread
    assert syncs.inline == 0 and syncs.threaded >= 1
    threaded = syncs.threaded
    await node.write(4096, b"f" * 4096, fua=True)  # all synced now: inline again
    assert (syncs.inline, syncs.threaded) == (1, threaded)
    node.head.close()


async def test_write_zeroes_count_as_unsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = _chain(tmp_path)
    syncs = Syncs(monkeypatch)
    await node.zero(0, 1 * MiB, may_trim=True)  # a punched range: metadata to sync
    await node.flush()
    assert syncs.inline == 0 and syncs.threaded == 1
    node.head.close()


async def test_many_waiters_sync_in_one_thread_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = _chain(tmp_path)
    syncs = Syncs(monkeypatch)
    # Sixteen FUA writes started in one loop turn (one receive's worth): one sync covers
    # them all, and it runs in a thread so that the loop can take more requests meanwhile.
    await asyncio.gather(*(node.write(i * 4096, bytes([i]) * 4096, fua=True) for i in range(16)))
    assert (syncs.inline, syncs.threaded) == (0, 1)
    node.head.close()


async def test_a_slow_inline_sync_sends_the_next_ones_to_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _chain(tmp_path)
    syncs = Syncs(monkeypatch, delay=SyncGuard.SLOW * 1.5)
    await node.write(0, b"s" * 4096, fua=True)  # inline, and slow
    await node.write(4096, b"s" * 4096, fua=True)
    await node.write(8192, b"s" * 4096, fua=True)
    assert (syncs.inline, syncs.threaded) == (1, 2)
    node.head.close()


async def test_allocating_fua_writes_on_a_thin_volume_journal_inline_and_survive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _chain(tmp_path, thick=False)
    syncs = Syncs(monkeypatch)
    await node.write(5 * 4096, b"t" * 4096, fua=True)  # allocates: its state is journaled too
    assert syncs.threaded == 0 and syncs.inline == 2  # the data file, then the journal
    lid = node.head.id
    node.head.close()
    again = Layer.open(REAL, str(tmp_path), lid, SIZE, writable=False)
    reread = ChainNode([again], SIZE, writable=False)
    assert bytes(await reread.read(5 * 4096, 4096)) == b"t" * 4096
    again.close()


def test_a_former_head_forgets_the_chains_count(tmp_path: Path) -> None:
    node = _chain(tmp_path)
    old = node.head
    assert old.small_sync() is True
    Layer.create(REAL, str(tmp_path), "6" * 32, SIZE)
    new = Layer.open(REAL, str(tmp_path), "6" * 32, SIZE, writable=True)
    node.freeze_head(new)
    assert old.small_sync is no_small_sync and new.small_sync() is True
    asyncio.run(node.close())
    assert new.small_sync is no_small_sync
    old.close()
    new.close()


def test_sync_guard_backs_off_after_a_slow_sync() -> None:
    g = SyncGuard()
    assert g.inline(0.0)
    g.note(SyncGuard.SLOW / 2, 1.0)
    assert g.inline(1.0)
    g.note(SyncGuard.SLOW * 2, 2.0)
    assert not g.inline(2.0 + SyncGuard.BACKOFF / 2)
    assert g.inline(2.0 + SyncGuard.BACKOFF)
    assert SyncGuard.SLOW == WriteGuard.STALL


async def test_offloaded_calls_are_counted_while_in_flight() -> None:
    seen: list[int] = []

    def work() -> None:
        seen.append(executor.offloaded())

    def fail() -> None:
        raise OSError(5, "boom")

    before = executor.offloaded()
    task = asyncio.ensure_future(executor.run(work))
    await asyncio.sleep(0)
    assert executor.offloaded() == before + 1
    await task
    assert executor.offloaded() == before and seen == [before + 1]
    with pytest.raises(OSError):
        await executor.run_in("", fail)
    assert executor.offloaded() == before
