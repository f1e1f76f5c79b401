#!/usr/bin/env python3
"""Block status of qemu:dirty-bitmap contexts on a large thin volume.

A `--size` (1 TiB) thin volume gets snapshot s1, then `--extents` (10k) writes of 4-64 KiB at
random 4 KiB-aligned offsets (through libnbd, 64 in flight), then snapshot s2. Measured:

- `snapshot diff` through the API (s1 to s2): the storage answer alone;
- per BLOCK_STATUS request for qemu:dirty-bitmap:s1 on `VOL@s2` and on the live `VOL`, each
  on a fresh connection walking the whole volume with requests of at most 4 GiB - 4 KiB (as
  nbdinfo does): the first request (it builds the answer from storage, and on `VOL` inserts
  the change filter), then the median, p99 and max of the others;
- a request whose reply is full: a second volume with 4 KiB dirty every 8 KiB over 256 MiB,
  asked for all of it (16384 extents per reply at most);
- `nbdinfo --map=qemu:dirty-bitmap:s1` of the whole volume, wall clock, for both exports;
- the write path: fio 4 KiB random writes (QD16) on `VOL` with nobody asking for changes and
  with a session holding qemu:dirty-bitmap:s1 (the change filter in the graph), interleaved
  `--reps` times (skipped without fio).

Uses the blockvirt package and libnbd's binding (run it with the project's venv):
``.venv/bin/python tools/bench/dirty.py [--size 1T] [--extents 10000] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import nbd

from blockvirt.storage.catalog import parse_size
from blockvirt.testing import BlockvirtServer, temporary_server

DIRTY_S1 = "qemu:dirty-bitmap:s1"
#: Longest request nbdinfo makes (a 32-bit length, kept block-aligned).
MAX_REQUEST = (1 << 32) - 4096


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))]


def write_extents(uri: str, size: int, count: int, seed: int) -> list[tuple[int, int]]:
    """`count` random writes; returns their (offset, length), in order of writing."""
    rng = random.Random(seed)
    done: list[tuple[int, int]] = []
    h = nbd.NBD()
    h.connect_uri(uri)
    bufs = [rng.randbytes(64 * 1024) for _ in range(4)]
    for _ in range(count):
        length = rng.randint(1, 16) * 4096
        offset = rng.randrange((size - length) // 4096) * 4096
        h.aio_pwrite(bufs[rng.randrange(4)][:length], offset)
        done.append((offset, length))
        while h.aio_in_flight() >= 64:
            h.poll(-1)
    while h.aio_in_flight():
        h.poll(-1)
    h.flush()
    h.shutdown()
    return done


def walk(uri: str, size: int, request: int = MAX_REQUEST) -> dict[str, Any]:
    """Every request over the whole export, timed; returns the figures and what was seen."""
    h = nbd.NBD()
    h.add_meta_context(DIRTY_S1)
    h.connect_uri(uri)
    seen: list[int] = []
    dirty_extents = 0
    dirty_bytes = 0
    times: list[float] = []

    def cb(meta: str, off: int, entries: list[int], err: int) -> int:
        seen[:] = entries
        return 0

    offset = 0
    while offset < size:
        t0 = time.perf_counter()
        h.block_status(min(request, size - offset), offset, cb)
        times.append(time.perf_counter() - t0)
        for length, flags in zip(seen[0::2], seen[1::2], strict=True):
            if flags & 1:
                dirty_extents += 1
                dirty_bytes += length
            offset += length
    h.shutdown()
    rest = times[1:] or times
    return {
        "requests": len(times),
        "first_ms": times[0] * 1e3,
        "median_ms": statistics.median(rest) * 1e3,
        "p99_ms": percentile(rest, 99) * 1e3,
        "max_ms": max(rest) * 1e3,
        "total_s": sum(times),
        "dirty_extents": dirty_extents,
        "dirty_bytes": dirty_bytes,
    }


def full_reply(server: BlockvirtServer) -> dict[str, Any]:
    """4 KiB dirty every 8 KiB over 256 MiB: replies are capped, timed per request."""
    server.create_volume("dense", "1T")
    server.api.post("/api/v1/volumes/dense/snapshots", {"name": "s1"})
    h = nbd.NBD()
    h.add_meta_context(DIRTY_S1)
    h.connect_uri(server.uri("dense"))
    block = b"d" * 4096
    for off in range(0, 256 << 20, 8192):
        h.aio_pwrite(block, off)
        while h.aio_in_flight() >= 64:
            h.poll(-1)
    while h.aio_in_flight():
        h.poll(-1)
    counts: list[int] = []

    def cb(meta: str, off: int, entries: list[int], err: int) -> int:
        counts.append(len(entries) // 2)
        return 0

    h.block_status(4096, 0, cb)  # builds the answer: not part of the figure
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        h.block_status(256 << 20, 0, cb)
        times.append(time.perf_counter() - t0)
    h.shutdown()
    return {
        "extents_per_reply": counts[-1],
        "median_ms": statistics.median(times) * 1e3,
        "max_ms": max(times) * 1e3,
    }


def nbdinfo_map(uri: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = subprocess.run(["nbdinfo", f"--map={DIRTY_S1}", uri], capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    lines = r.stdout.splitlines()
    dirty = sum(1 for x in lines if x.endswith("dirty"))
    return {"seconds": seconds, "lines": len(lines), "dirty_lines": dirty}


def fio_iops(uri: str, runtime: int) -> float:
    r = subprocess.run(
        ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=16",
         "--size=1G", f"--runtime={runtime}", "--time_based", "--ramp_time=1", "--output-format=json"],
        capture_output=True, text=True, timeout=runtime + 120,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    report = r.stdout[r.stdout.index("{") :]  # the nbd engine says "connected" first
    return float(json.loads(report)["jobs"][0]["write"]["iops"])


def write_path(server: BlockvirtServer, reps: int, runtime: int) -> dict[str, Any]:
    if shutil.which("fio") is None:
        return {"skipped": "fio is not installed"}
    uri = server.uri("big")
    plain: list[float] = []
    tracked: list[float] = []
    for _ in range(reps):
        plain.append(fio_iops(uri, runtime))
        h = nbd.NBD()
        h.add_meta_context(DIRTY_S1)
        h.connect_uri(uri)
        h.block_status(4096, 0, lambda *a: 0)  # the session now holds the answer: filter in
        tracked.append(fio_iops(uri, runtime))
        h.shutdown()
    return {
        "iops_without": statistics.median(plain),
        "iops_with_tracking": statistics.median(tracked),
        "runs_without": plain,
        "runs_with": tracked,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1T")
    ap.add_argument("--extents", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="write-path repetitions (0: skip)")
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    out: dict[str, Any] = {"size": size, "extents_written": args.extents}
    with temporary_server() as server:
        server.create_volume("big", size)
        server.api.post("/api/v1/volumes/big/snapshots", {"name": "s1"})
        t0 = time.perf_counter()
        write_extents(server.uri("big"), size, args.extents, args.seed)
        out["write_seconds"] = time.perf_counter() - t0
        server.api.post("/api/v1/volumes/big/snapshots", {"name": "s2"})
        t0 = time.perf_counter()
        diff = server.api.get("/api/v1/volumes/big/snapshots/s1/diff?until=s2")
        out["api_diff"] = {"seconds": time.perf_counter() - t0, "extents": len(diff["extents"])}
        for export in ("big@s2", "big"):
            out[f"walk {export}"] = walk(server.uri(export), size)
            out[f"nbdinfo {export}"] = nbdinfo_map(server.uri(export))
        out["full reply"] = full_reply(server)
        if args.reps:
            out["write path"] = write_path(server, args.reps, args.runtime)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
