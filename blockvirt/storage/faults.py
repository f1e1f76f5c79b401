"""Fault injection for tests: a FileIO that makes one pool's device fail or slow down.

Off unless the server runs with `serve --fault-injection` (then the API's
/api/v1/debug/faults sets rules). A rule applies to the files of one pool directory:

  error        an errno name (EIO, ENOSPC, ...) that operations fail with
  ops          which operations: read, write (writes, zeroing, punching), sync
  rate         the chance an operation fails (default 1)
  count        fail at most this many times, then behave (default: no end)
  delay_ms     added to every operation in `ops`
  device_iops  a device with one queue: operations in `ops` go through it one at a time, so
               latency grows with the queue (what latency-aware QoS is for)

A slowed pool's reads never come from the page cache (the inline path reports a miss), as
they would not on a real cold device: they go to the pool's threads, where the delays are.
"""

from __future__ import annotations

import errno as errno_mod
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from blockvirt.storage.catalog import CatalogError
from blockvirt.storage.fileio import FileIO

OPS = frozenset({"read", "write", "sync"})


@dataclass
class FaultRule:
    error: int = 0
    ops: frozenset[str] = OPS
    rate: float = 1.0
    count: int | None = None
    delay: float = 0.0
    device_iops: float = 0.0
    injected: int = 0
    _device: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _free_at: float = 0.0  # when the emulated device is done with what it has been given
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    @property
    def slows(self) -> bool:
        return bool(self.delay or self.device_iops)

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": errno_mod.errorcode.get(self.error) if self.error else None,
            "ops": sorted(self.ops),
            "rate": self.rate,
            "count": self.count,
            "delay_ms": self.delay * 1000,
            "device_iops": self.device_iops,
            "injected": self.injected,
        }


def parse_rule(body: dict[str, Any]) -> FaultRule:
    """An API body -> FaultRule; raises CatalogError('invalid') with what is wrong."""
    unknown = set(body) - {"pool", "error", "ops", "rate", "count", "delay_ms", "device_iops"}
    if unknown:
        raise CatalogError("invalid", f"unknown fault field(s): {', '.join(sorted(unknown))}")
    rule = FaultRule()
    err = body.get("error")
    if err is not None:
        code = getattr(errno_mod, str(err), None)
        if not isinstance(code, int) or not isinstance(err, str) or not err.startswith("E"):
            raise CatalogError("invalid", f"error must be an errno name like EIO or ENOSPC, not {err!r}")
        rule.error = code
    ops = body.get("ops", sorted(OPS))
    if not isinstance(ops, list) or not ops or not set(ops) <= OPS:
        raise CatalogError("invalid", f"ops must be a non-empty list of {', '.join(sorted(OPS))}")
    rule.ops = frozenset(ops)
    for key, attr, scale, top in (("rate", "rate", 1.0, 1.0), ("delay_ms", "delay", 0.001, 60_000.0),
                                  ("device_iops", "device_iops", 1.0, 1e7)):  # fmt: skip
        if key in body:
            v = body[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= top:
                raise CatalogError("invalid", f"{key} must be a number in [0, {top:g}]")
            setattr(rule, attr, float(v) * scale)
    if "count" in body:
        c = body["count"]
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise CatalogError("invalid", "count must be a whole number or null")
        rule.count = c
    if not rule.error and not rule.slows:
        raise CatalogError("invalid", "a fault needs an error, a delay_ms or a device_iops")
    return rule


class FaultyFileIO(FileIO):
    """FileIO with per-pool-directory rules (thread-safe: called from the pools' threads)."""

    faulty = True

    def __init__(self) -> None:
        self.rules: dict[str, FaultRule] = {}  # pool directory -> rule
        self._dirs: dict[int, str] = {}  # fd -> directory it was opened in

    def set_rule(self, pool_dir: str, rule: FaultRule | None) -> None:
        key = os.path.abspath(pool_dir)
        if rule is None:
            self.rules.pop(key, None)
        else:
            self.rules[key] = rule

    def _rule(self, fd: int, op: str) -> FaultRule | None:
        d = self._dirs.get(fd)
        rule = self.rules.get(d) if d is not None else None
        return rule if rule is not None and op in rule.ops else None

    def slow_writes(self, fd: int) -> bool:
        rule = self._rule(fd, "write")
        return rule is not None and rule.slows

    def _apply(self, fd: int, op: str) -> None:
        rule = self._rule(fd, op)
        if rule is None:
            return
        if rule.device_iops:
            # A single-queue device, first come first served: each operation starts when the
            # one before it is done and takes 1/iops; the caller waits until it is through.
            with rule._device:
                now = time.monotonic()
                done = max(now, rule._free_at) + 1.0 / rule.device_iops
                rule._free_at = done
            time.sleep(max(0.0, done - time.monotonic()))
        if rule.delay:
            time.sleep(rule.delay)
        armed = rule.error and (rule.count is None or rule.injected < rule.count)
        if armed and (rule.rate >= 1.0 or rule._rng.random() < rule.rate):
            rule.injected += 1
            raise OSError(rule.error, os.strerror(rule.error))

    # ------------------------------------------------------------ FileIO
    def open(self, path: str, *, write: bool, create: bool = False) -> int:
        fd = super().open(path, write=write, create=create)
        self._dirs[fd] = os.path.dirname(os.path.abspath(path))
        return fd

    def close(self, fd: int) -> None:
        self._dirs.pop(fd, None)
        super().close(fd)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        self._apply(fd, "read")
        return super().pread(fd, length, offset)

    def preadv_nowait(self, fd: int, buf: bytearray | memoryview, offset: int) -> bool:
        rule = self._rule(fd, "read")
        if rule is not None:
            return False  # a slow or failing device: go through pread, in the pool's threads
        return super().preadv_nowait(fd, buf, offset)

    def view_nowait(self, fd: int, offset: int, length: int) -> memoryview | None:
        if self._rule(fd, "read") is not None:
            return None  # as preadv_nowait
        return super().view_nowait(fd, offset, length)

    def pwrite(
        self, fd: int, data: bytes | bytearray | memoryview, offset: int, *, dsync: bool = False
    ) -> None:
        self._apply(fd, "write")
        super().pwrite(fd, data, offset, dsync=dsync)

    def punch(self, fd: int, offset: int, length: int) -> None:
        self._apply(fd, "write")
        super().punch(fd, offset, length)

    def zero_allocated(self, fd: int, offset: int, length: int) -> None:
        self._apply(fd, "write")
        super().zero_allocated(fd, offset, length)

    def fdatasync(self, fd: int) -> None:
        self._apply(fd, "sync")
        super().fdatasync(fd)

    def fsync(self, fd: int) -> None:
        self._apply(fd, "sync")
        super().fsync(fd)
