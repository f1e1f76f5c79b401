"""Measure what a pool's device can do (`blockvirt pool calibrate`), blocking; run in a thread.

A scratch file in the pool is read with direct I/O (bypassing the page cache) where the file
system allows it: 4 KiB random reads at queue depth 16, then 1 MiB reads. From the two rates:
  capacity = 90 % of the 4 KiB rate (headroom, as VMware's automatic threshold takes 90 % of
  peak), and
  S0 = fixed cost / per-byte cost of a request, from t(4 KiB) and t(1 MiB), for the cost
  model (blockvirt.qos.cost).
The scratch file is named like a layer file, so a crash mid-way leaves an orphan that the
next start removes.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
import uuid
from typing import Any

KiB, MiB = 1024, 1024 * 1024
HEADROOM = 0.9
S0_MIN, S0_MAX = 512, 64 * MiB


def _open_direct(path: str) -> tuple[int, bool]:
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, os.O_RDONLY | direct | os.O_CLOEXEC), True
        except OSError:
            pass
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False


def _phase(fd: int, size: int, block: int, seconds: float, threads: int, direct: bool) -> float:
    """Requests per second, `threads` at a time, random block-aligned offsets."""
    stop = time.monotonic() + seconds
    counts = [0] * threads
    errors: list[BaseException] = []
    nblocks = size // block

    def worker(i: int) -> None:
        buf = mmap.mmap(-1, block)  # page aligned, as direct I/O wants
        rng = random.Random(i)
        n = 0
        try:
            while time.monotonic() < stop:
                os.preadv(fd, [buf], rng.randrange(nblocks) * block)
                n += 1
                if not direct and n % 256 == 0:  # keep the page cache out of it, roughly
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            errors.append(e)
        finally:
            counts[i] = n
            buf.close()

    started = time.monotonic()
    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.monotonic() - started)


def cost_model(iops_small: float, iops_large: float, small: int = 4 * KiB, large: int = MiB) -> int:
    """S0 from the rates of two request sizes (clamped to a sane range)."""
    t_small, t_large = 1 / iops_small, 1 / iops_large
    per_byte = (t_large - t_small) / (large - small)
    base = t_small - small * per_byte
    if per_byte <= 0 or base <= 0:
        return S0_MAX if per_byte <= 0 else S0_MIN
    return int(min(S0_MAX, max(S0_MIN, base / per_byte)))


def calibrate(
    pool_dir: str, seconds: float = 4.0, size: int = 256 * MiB, threads: int = 16
) -> dict[str, Any]:
    path = os.path.join(pool_dir, f"{uuid.uuid4().hex}.data.tmp")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        chunk = os.urandom(MiB)
        for off in range(0, size, MiB):
            os.pwrite(fd, chunk, off)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        rfd, direct = _open_direct(path)
        try:
            iops_4k = _phase(rfd, size, 4 * KiB, seconds / 2, threads, direct)
            iops_1m = _phase(rfd, size, MiB, seconds / 2, threads, direct)
        finally:
            os.close(rfd)
    finally:
        os.close(fd)
        os.unlink(path)
    s0 = cost_model(iops_4k, iops_1m)
    return {
        "direct_io": direct,
        "seconds": seconds,
        "iops_4k": round(iops_4k, 1),
        "iops_1m": round(iops_1m, 1),
        "bandwidth_bytes_per_second": round(iops_1m * MiB),
        "cost_s0": s0,
        "iops_capacity": round(HEADROOM * iops_4k),
    }
