"""FileIO.pwrite: large buffered writes go to the page cache in WRITE_PIECE pieces (ext4
caches a write in a folio as large as the write; see fileio.WRITE_PIECE), and land exactly
as one write would."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest

from blockvirt.storage import fileio
from blockvirt.storage.fileio import REAL, WRITE_PIECE


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, WRITE_PIECE),  # one piece: one call
        (0, WRITE_PIECE + 1),
        (4096, 16 * WRITE_PIECE),  # a 1M write at a block offset
        (123, 3 * WRITE_PIECE + 4567),  # unaligned at both ends
    ],
)
def test_a_large_write_lands_whole_and_in_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: int, length: int
) -> None:
    fd = REAL.open(str(tmp_path / "f.data"), write=True, create=True)
    try:
        before = os.urandom(offset + length + 8192)
        os.pwrite(fd, before, 0)
        calls: list[tuple[int, int]] = []
        real_pwrite = os.pwrite

        def spy(fd_: int, data: Any, off: int) -> int:
            calls.append((off, len(data)))
            return real_pwrite(fd_, data, off)

        monkeypatch.setattr(fileio.os, "pwrite", spy)
        data = bytearray(os.urandom(length))
        REAL.pwrite(fd, data, offset)
        monkeypatch.undo()
        expected = before[:offset] + bytes(data) + before[offset + length :]
        assert os.pread(fd, len(before), 0) == expected
        # Consecutive pieces, none larger than WRITE_PIECE, covering the write exactly.
        assert calls[0][0] == offset
        assert all(n <= WRITE_PIECE for _, n in calls)
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(calls))
        assert sum(n for _, n in calls) == length
        assert len(calls) == -(-length // WRITE_PIECE)
    finally:
        REAL.close(fd)


def test_a_small_write_is_one_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = REAL.open(str(tmp_path / "f.data"), write=True, create=True)
    try:
        calls: list[int] = []
        real_pwrite = os.pwrite

        def spy(fd_: int, data: Any, off: int) -> int:
            calls.append(len(data))
            return real_pwrite(fd_, data, off)

        monkeypatch.setattr(fileio.os, "pwrite", spy)
        REAL.pwrite(fd, b"x" * 4096, 8192)
        monkeypatch.undo()
        assert calls == [4096]
        assert os.pread(fd, 4096, 8192) == b"x" * 4096
    finally:
        REAL.close(fd)
