"""Where a FUA write's sync runs: on the loop when the head holds nothing dirty but FUA
writes and one request waits for it, in a thread otherwise, and in threads for a while after
one was slow. Durability is the crash harness's business; this is about the choice."""

from __future__ import annotations

import asyncio
import errno
import struct
from pathlib import Path

import pytest

from blockvirt.nbd.constants import CmdFlag, Errno
from blockvirt.nbd.events import ExportInfo, WriteCmd
from blockvirt.nbd.handshake import transmission_flags
from blockvirt.nbd.transmission import ServerTransmission
from blockvirt.server.dispatch import Dispatcher
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


async def _reopened(node: ChainNode, pool: Path, offset: int, length: int) -> bytes:
    """Close the chain's head and read [offset, offset + length) from its files again: what
    the journal and data file hold, as after a restart."""
    lid = node.head.id
    node.head.close()
    again = Layer.open(REAL, str(pool), lid, SIZE, writable=False)
    try:
        return bytes(await ChainNode([again], SIZE, writable=False).read(offset, length))
    finally:
        again.close()


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


async def test_two_slow_inline_syncs_send_the_next_ones_to_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _chain(tmp_path)
    syncs = Syncs(monkeypatch, delay=SyncGuard.SLOW * 1.5)
    await node.write(0, b"s" * 4096, fua=True)  # inline, and slow: suspect
    await node.write(4096, b"s" * 4096, fua=True)  # inline, slow again: confirmed
    await node.write(8192, b"s" * 4096, fua=True)
    await node.write(12288, b"s" * 4096, fua=True)
    assert (syncs.inline, syncs.threaded) == (2, 2)
    node.head.close()


async def test_allocating_fua_writes_on_a_thin_volume_journal_inline_and_survive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _chain(tmp_path, thick=False)
    syncs = Syncs(monkeypatch)
    await node.write(5 * 4096, b"t" * 4096, fua=True)  # allocates: its state is journaled too
    assert syncs.threaded == 0 and syncs.inline == 2  # the data file, then the journal
    assert await _reopened(node, tmp_path, 5 * 4096, 4096) == b"t" * 4096


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


def test_sync_guard_backs_off_when_a_second_slow_sync_confirms_the_first() -> None:
    g = SyncGuard()
    assert g.inline(0.0)
    g.note(SyncGuard.SLOW / 2, 1.0)
    assert g.inline(1.0)
    g.note(SyncGuard.SLOW * 2, 2.0)  # alone: a journal commit now and then
    assert g.inline(2.0)
    g.note(SyncGuard.SLOW * 2, 2.0 + SyncGuard.CONFIRM / 2)  # a second one soon after
    assert not g.inline(2.5 + SyncGuard.BACKOFF / 2)
    assert g.inline(2.0 + SyncGuard.CONFIRM / 2 + SyncGuard.BACKOFF)
    assert SyncGuard.SLOW == WriteGuard.STALL


def test_sync_guard_forgives_slow_syncs_far_apart() -> None:
    g = SyncGuard()
    for i in range(10):  # one every 5 s, as the file system's journal commits
        g.note(SyncGuard.SLOW * 1.4, 5.0 * i)
        assert g.inline(5.0 * i)


def test_sync_guard_backs_off_at_once_after_a_severe_sync() -> None:
    g = SyncGuard()
    g.note(SyncGuard.SEVERE * 1.1, 1.0)
    assert not g.inline(1.0 + SyncGuard.BACKOFF / 2)
    assert g.inline(1.0 + SyncGuard.BACKOFF)


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


# ---------------------------------------------------------------- FUA writes served inline


def _fua(cookie: int, offset: int, fill: int) -> WriteCmd:
    return WriteCmd(cookie, int(CmdFlag.FUA), offset, 4096, bytes([fill]) * 4096)


def _replies(out: list[bytes | bytearray | memoryview]) -> list[tuple[int, int]]:
    """(cookie, error) of simple replies."""
    got = []
    for b in out:
        magic, error, cookie = struct.unpack(">IIQ", bytes(b)[:16])
        assert magic == 0x67446698
        got.append((cookie, error))
    return got


def _dispatcher(node: ChainNode) -> Dispatcher:
    tflags = transmission_flags(ExportInfo("x", SIZE), structured=False)
    return Dispatcher(node, SIZE, tflags, ServerTransmission(False), {})


async def test_a_burst_of_fua_writes_is_answered_after_one_inline_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _chain(tmp_path)
    d = _dispatcher(node)
    syncs = Syncs(monkeypatch)
    for i in range(16):
        assert d.serve_inline(_fua(i + 1, i * 4096, i)) == []  # written, not answered yet
    assert syncs.inline + syncs.threaded == 0
    out = d.settle_fua()
    assert out is not None and _replies(out) == [(i + 1, 0) for i in range(16)]
    assert (syncs.inline, syncs.threaded) == (1, 0) and d.fua_pending == []
    assert not d.unflushed  # FUA writes leave nothing for the session's last flush
    assert await _reopened(node, tmp_path, 0, 16 * 4096) == b"".join(bytes([i]) * 4096 for i in range(16))


async def test_fua_writes_after_buffered_ones_take_the_general_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _chain(tmp_path)
    d = _dispatcher(node)
    assert d.serve_inline(WriteCmd(1, 0, 0, 4096, b"b" * 4096)) is not None  # buffered
    assert d.serve_inline(_fua(2, 4096, 7)) is None  # a dsync write of its own (run())
    assert d.fua_pending == []
    await node.flush()
    assert d.serve_inline(_fua(3, 8192, 7)) == []  # all synced: inline again
    assert d.settle_fua() is not None
    node.head.close()


async def test_allocating_fua_writes_are_answered_after_an_awaited_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _chain(tmp_path, thick=False)
    d = _dispatcher(node)
    for i in range(4):
        assert d.serve_inline(_fua(i + 1, i * 4096, 0x40 + i)) == []
    assert d.settle_fua() is None  # the new blocks' states must be journaled: not inline
    pending, d.fua_pending = d.fua_pending, []
    out = await d.settle_fua_later(pending)
    assert _replies(out) == [(i + 1, 0) for i in range(4)]
    want = b"".join(bytes([0x40 + i]) * 4096 for i in range(4))
    assert await _reopened(node, tmp_path, 0, 4 * 4096) == want


async def test_a_failed_inline_sync_fails_every_pending_fua_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = _chain(tmp_path)
    d = _dispatcher(node)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "device gone")

    for i in range(3):
        assert d.serve_inline(_fua(i + 1, i * 4096, 1)) == []
    monkeypatch.setattr(REAL, "fdatasync", eio)
    out = d.settle_fua()
    assert out is not None and _replies(out) == [(i + 1, int(Errno.EIO)) for i in range(3)]
    assert node.failed is not None  # nothing written since can be promised any more
    later = _fua(9, 0, 1)
    assert d.serve_inline(later) is None  # not inline any more: the general path refuses it
    assert _replies(await d.run(later)) == [(9, int(Errno.EIO))]
    node.head.close()
