#!/usr/bin/env python3
"""Live migration: the pause an initiator sees at switchover, and convergence under writes.

Part 1, pause (`--parts pause`): a volume with a 3-deep snapshot chain is migrated back and
forth between two pools `--migrations` times while a writer process (blockvirt's asyncio NBD
client, 4 KiB random writes at `--qd`) records the time of every acknowledgement. The server
reports when it held requests for the switch (`result.switch_monotonic`, the host's monotonic
clock, which the writer's timestamps share). Reported, median and p99 over the migrations:
- switchover: the largest gap between acknowledgements that overlaps the hold (from 5 ms
  before it to 20 ms after), i.e. the pause the initiator saw because of the switch;
- whole migration: the largest gap anywhere in the migration (copy and final sync included);
- noise floor: the largest gap in windows as long as the switch window and as long as a
  migration, with no migration running (this machine, the client, ordinary server jitter);
- the server-side hold itself.

Part 2, convergence (`--parts converge`): a volume with `--fill` of allocated data is migrated
with its copy capped at `--bps-limit` B (the bandwidth the target grants the copy) while fio
writes random 64 KiB blocks over it at 50 % and 90 % of B. A single-pass mirror never copies a
chunk twice, so the migration must finish, in about allocated / B: the check is total time
<= 1.2 x allocated / B, and copied bytes <= allocated (+ one chunk per mirror retry).

Uses the blockvirt package (run it with the project's venv):
``.venv/bin/python tools/bench/migration.py [--migrations 30] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

MiB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))]


# ----------------------------------------------------------------------------- the writer


def _writer_main(uri: str, qd: int, blocks: int, out: str, ready: Any, stop: Any) -> None:
    """Child process: write until told to stop, then save every ack's monotonic time."""

    async def main() -> None:
        acks = array("d")
        async with await NbdClient.connect(uri) as c:
            rng = random.Random(1)
            payload = os.urandom(4096)

            async def one() -> None:
                while not stop.is_set():
                    await c.write(rng.randrange(blocks) * 4096, payload)
                    acks.append(time.monotonic())

            ready.set()
            await asyncio.gather(*(one() for _ in range(qd)))
        with open(out, "wb") as f:
            acks.tofile(f)

    asyncio.run(main())


def max_gap(acks: array[float], start: float, end: float) -> float:
    """The largest gap between consecutive acks that overlaps [start, end]."""
    import bisect

    i = bisect.bisect_left(acks, start)
    j = bisect.bisect_right(acks, end)
    window = acks[max(0, i - 1) : j + 1]  # include the acks around the window's edges
    return max((b - a for a, b in itertools.pairwise(window)), default=float("nan"))


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "p99": pct(values, 99), "max": max(values), "all": values}


async def build_chain(server: BlockvirtServer, name: str, size: int, per_layer: int) -> None:
    server.create_volume(name, size)
    rng = random.Random(name)
    async with await NbdClient.connect(server.uri(name)) as c:
        for i in range(3):
            for _ in range(per_layer // MiB):
                await c.write(rng.randrange(size // MiB) * MiB, rng.randbytes(MiB))
            await c.flush()
            server.api.post(f"/api/v1/volumes/{name}/snapshots", {"name": f"s{i}"})
        await c.write(0, rng.randbytes(per_layer))
        await c.flush()


def wait_job(server: BlockvirtServer, job_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = server.api.get(f"/api/v1/jobs/{job_id}")
        if job["state"] != "running":
            return job
        if time.monotonic() > deadline:
            raise RuntimeError(f"migration did not finish: {job}")
        time.sleep(0.01)


def part_pause(server: BlockvirtServer, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    size = args.size
    asyncio.run(build_chain(server, "pz", size, size // 8))
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    out = tmp / "acks.bin"
    proc = ctx.Process(
        target=_writer_main, args=(server.uri("pz"), args.qd, size // 4096, str(out), ready, stop)
    )
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("writer did not start")
        time.sleep(1.0)
        windows: list[tuple[float, float]] = []
        results = []
        pool = "default"
        for i in range(args.migrations):
            pool = "other" if pool == "default" else "default"
            t0 = time.monotonic()
            job = server.api.post("/api/v1/volumes/pz/migrate", {"pool": pool})
            job = wait_job(server, job["id"])
            t1 = time.monotonic()
            if job["state"] != "done":
                raise RuntimeError(f"migration {i} ended {job['state']}: {job['error']}")
            windows.append((t0, t1))
            results.append(job["result"])
            log(f"  migration {i + 1}/{args.migrations}: {t1 - t0:.2f}s, "
                f"server pause {job['result']['pause_seconds'] * 1000:.2f} ms")  # fmt: skip
            time.sleep(0.3)
        # Baseline: the writer alone, as long as all the migrations took.
        b0 = time.monotonic()
        time.sleep(sum(t1 - t0 for t0, t1 in windows) + 0.3 * len(windows))
        b1 = time.monotonic()
    finally:
        stop.set()
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    acks = array("d")
    with open(out, "rb") as f:
        acks.frombytes(f.read())
    switch = [r["switch_monotonic"] for r in results]
    switch_gap = [max_gap(acks, a - 0.005, b + 0.020) * 1000 for a, b in switch]
    whole_gap = [max_gap(acks, a, b) * 1000 for a, b in windows]
    span = statistics.median(b - a + 0.025 for a, b in switch)
    rng = random.Random(2)
    floor_switch = []
    floor_whole = []
    for a, b in windows:
        t = rng.uniform(b0, max(b0, b1 - span))
        floor_switch.append(max_gap(acks, t, t + span) * 1000)
        t = rng.uniform(b0, max(b0, b1 - (b - a)))
        floor_whole.append(max_gap(acks, t, t + (b - a)) * 1000)
    return {
        "migrations": len(windows),
        "acks": len(acks),
        "switch_gap_ms": summary(switch_gap),
        "whole_migration_gap_ms": summary(whole_gap),
        "floor_switch_window_gap_ms": summary(floor_switch),
        "floor_migration_window_gap_ms": summary(floor_whole),
        "server_hold_ms": summary([r["pause_seconds"] * 1000 for r in results]),
        "migration_seconds": statistics.median(b - a for a, b in windows),
    }


def part_converge(server: BlockvirtServer, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    out = []
    bps = args.bps_limit
    for share in (0.5, 0.9):
        name = f"cv{int(share * 100)}"
        server.create_volume(name, args.size)
        subprocess.run(
            ["fio", "--name=fill", "--ioengine=nbd", f"--uri={server.uri(name)}", "--rw=write",
             "--bs=1M", f"--size={args.fill}", "--iodepth=8", "--output=/dev/null"],
            check=True, cwd=tmp, timeout=600,
        )  # fmt: skip
        rate = int(bps * share)
        fio = subprocess.Popen(
            ["fio", "--name=load", "--ioengine=nbd", f"--uri={server.uri(name)}", "--rw=randwrite",
             "--bs=64k", f"--size={args.fill}", "--iodepth=4", f"--rate={rate}", "--time_based",
             "--runtime=3600", "--output-format=json", f"--output={tmp / (name + '.json')}"],
            cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(2.0)
            target = "other" if server.api.get(f"/api/v1/volumes/{name}")["pool"] == "default" else "default"
            t0 = time.monotonic()
            job = server.api.post(f"/api/v1/volumes/{name}/migrate", {"pool": target, "bps_limit": bps})
            job = wait_job(server, job["id"])
            seconds = time.monotonic() - t0
        finally:
            fio.send_signal(2)
            fio.wait(60)
        if job["state"] != "done":
            raise RuntimeError(f"migration ended {job['state']}: {job['error']}")
        allocated = job["total"]
        bound = 1.2 * allocated / bps
        res = job["result"]
        row = {
            "write_rate_share": share,
            "write_rate_Bps": rate,
            "copy_cap_Bps": bps,
            "allocated_bytes": allocated,
            "copied_bytes": res["copied_bytes"],
            "mirrored_writes": res["mirrored_writes"],
            "seconds": round(seconds, 2),
            "bound_seconds": round(bound, 2),
            "ok": seconds <= bound,
            "pause_ms": res["pause_seconds"] * 1000,
        }
        log(f"  writes at {share:.0%} of the copy cap: {seconds:.2f}s (bound {bound:.2f}s), "
            f"copied {res['copied_bytes'] / MiB:.1f} MiB of {allocated / MiB:.1f}, "
            f"{res['mirrored_writes']} mirrored writes")  # fmt: skip
        out.append(row)
        server.api.delete(f"/api/v1/volumes/{name}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="pause,converge")
    p.add_argument("--size", type=lambda s: int(s) * MiB, default=256 * MiB, help="volume size, MiB")
    p.add_argument("--fill", type=lambda s: int(s) * MiB, default=128 * MiB, help="part 2 data, MiB")
    p.add_argument("--migrations", type=int, default=30)
    p.add_argument("--qd", type=int, default=8)
    p.add_argument(
        "--bps-limit", type=lambda s: int(s) * MiB, default=64 * MiB, help="part 2 copy cap, MiB/s"
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if shutil.which("fio") is None and "converge" in args.parts:
        log("fio is needed for part 2")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="bv-migbench-"))
    results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "json"}}
    try:
        with BlockvirtServer(tmp / "data", log_level="info") as server:
            server.api.post("/api/v1/pools", {"name": "other", "path": str(tmp / "other")})
            if "pause" in args.parts:
                log("part 1: switchover pause")
                results["pause"] = part_pause(server, args, tmp)
            if "converge" in args.parts:
                log("part 2: convergence under writes")
                results["converge"] = part_converge(server, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if "pause" in results:
        r = results["pause"]
        print(
            f"switchover, {r['migrations']} migrations ({r['migration_seconds']:.2f}s each, median); "
            "largest gap between acknowledgements, ms:"
        )
        for key, label in (
            ("switch_gap_ms", "around the switch (target: median <= 10, p99 <= 50)"),
            ("floor_switch_window_gap_ms", "  noise floor, same-length windows, no migration"),
            ("whole_migration_gap_ms", "anywhere in the migration (copy, sync, switch, clean-up)"),
            ("floor_migration_window_gap_ms", "  noise floor, migration-length windows, no migration"),
            ("server_hold_ms", "server-side hold (drain + catalog commit + swap)"),
        ):
            v = r[key]
            print(f"  {label:<58} median {v['median']:7.2f}  p99 {v['p99']:7.2f}  max {v['max']:7.2f}")
    for row in results.get("converge", []):
        cap = row["copy_cap_Bps"] / MiB
        print(
            f"convergence, writes at {row['write_rate_share']:.0%} of B={cap:.0f} MiB/s: "
            f"{row['seconds']:.2f}s <= {row['bound_seconds']:.2f}s: {'ok' if row['ok'] else 'FAIL'}; "
            f"copied {row['copied_bytes'] / MiB:.1f} of {row['allocated_bytes'] / MiB:.1f} MiB allocated"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    ok = all(r["ok"] for r in results.get("converge", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
