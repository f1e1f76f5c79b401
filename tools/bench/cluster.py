#!/usr/bin/env python3
"""Several blockvirt nodes over one RBD pool: failover time, planned-move pause, the zombie.

A one-node Ceph (tests/cephcluster.py, loaded by path) or an existing one (`--ceph-conf`,
`--ceph-pool`), and `--nodes` `blockvirt serve --node-name` processes on 127.0.0.2, .3, ...
each attaching the pool, with the product's settings (heartbeat 1 s, presumed dead after 5 s).
An initiator (blockvirt's NbdClient with every node's address as fallbacks) writes 4 KiB
blocks at QD 4 with a FLUSH per batch, knows each block's durable version, and timestamps
every acknowledgement.

Part 1, failover (`--failovers`, default 10): a volume is written through its owner, the owner
is killed (SIGKILL); failover time = kill to the first request acknowledged on a connection
made after the kill (the issue's "kill to first served request on the new node"). Every
durable write is checked afterwards; the killed node is restarted for the next run, and the
owner rotates over the nodes.

Part 2, planned move (`--moves`, default 30): one volume moved round the nodes under writes
(`POST /volumes/V/move`, as `blockvirt volume move` does); pause = the longest gap between
acknowledgements from the request to the first acknowledgement on the new node. The noise
floor is the longest gap in windows as long as a move, with no move.

Part 3, zombie (`--zombies`, default 3): the owner is frozen (SIGSTOP) with writes in flight
and 256 more queued in its socket; once another node presumes it dead, that node takes the
volume over (reading it all, then writing half of it); then the zombie is resumed. Checked:
no queued write is acknowledged or lands, the half not rewritten holds what the new owner read
at the takeover; reported: how soon the zombie told its client, how soon it was back (alive
in the others' eyes with a fresh Ceph client).

Uses the blockvirt package (run it with the project's venv):
``.venv/bin/python tools/bench/cluster.py [--failovers 10] [--moves 30] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from blockvirt.client import NbdClient, NbdClientError
from blockvirt.testing import BlockvirtServer

MiB = 1 << 20
BLOCK = 4096
POOL = "cp"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p99": pct(values, 99),
        "min": min(values),
        "max": max(values),
    }


def load_cephcluster() -> Any:
    path = REPO / "tests" / "cephcluster.py"
    spec = importlib.util.spec_from_file_location("blockvirt_bench_cephcluster", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- blocks


def content(block: int, version: int) -> bytes:
    return struct.pack(">QQ", block, version) * (BLOCK // 16)


def decode(data: bytes) -> tuple[int, int] | None:
    if data == bytes(BLOCK):
        return None
    block, version = struct.unpack(">QQ", data[:16])
    return (block, version) if data == content(block, version) else (-1, -1)


# ----------------------------------------------------------------------------- nodes


class Node:
    def __init__(self, name: str, host: str, data_dir: Path) -> None:
        self.name = name
        self.server = BlockvirtServer(data_dir, extra_args=("--node-name", name), log_level="info")
        self.server.nbd_host = host
        self.frozen = False

    def start(self) -> None:
        self.server.start()  # a restart keeps its NBD port: clients' address lists stay valid

    @property
    def running(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    def kill(self) -> float:
        assert self.server.proc is not None
        t = time.monotonic()
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait()
        self.server.stop()
        return t

    def freeze(self) -> float:
        assert self.server.proc is not None
        t = time.monotonic()
        os.kill(self.server.proc.pid, signal.SIGSTOP)
        self.frozen = True
        while Path(f"/proc/{self.server.proc.pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
            time.sleep(0.001)
        return t

    def thaw(self) -> float:
        assert self.server.proc is not None
        t = time.monotonic()
        os.kill(self.server.proc.pid, signal.SIGCONT)
        self.frozen = False
        return t

    def stop(self) -> None:
        if self.frozen:
            self.thaw()
        self.server.stop(timeout=15)

    @property
    def nbd(self) -> str:
        return f"{self.server.nbd_host}:{self.server.nbd_port}"

    def uri(self, volume: str) -> str:
        return self.server.uri(volume)

    def view(self) -> dict[str, dict[str, Any]]:
        pools = [p for p in self.server.api.get("/api/v1/nodes")["pools"] if p["pool"] == POOL]
        return {n["name"]: n for n in pools[0]["nodes"]} if pools else {}


class Cluster:
    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes

    def uris(self, volume: str, first: Node) -> list[str]:
        order = [first, *(n for n in self.nodes if n is not first)]
        return [n.uri(volume) for n in order]

    def others(self, node: Node) -> list[Node]:
        return [n for n in self.nodes if n is not node and n.running and not n.frozen]

    @staticmethod
    def wait(what: str, ready: Any, timeout: float, step: float = 0.05) -> float:
        t0 = time.monotonic()
        while not ready():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(step)
        return time.monotonic() - t0

    def wait_owner(self, volume: str, owner: str, via: Node, timeout: float = 15.0) -> None:
        self.wait(
            f"{volume} owned by {owner}",
            lambda: volume in via.view().get(owner, {}).get("volumes", []),
            timeout,
        )

    def wait_alive(self, node: Node, via: Node, alive: bool, timeout: float = 20.0) -> float:
        return self.wait(
            f"{node.name} {'alive' if alive else 'dead'} for {via.name}",
            lambda: bool(via.view().get(node.name, {}).get("alive")) is alive,
            timeout,
        )

    def wait_known(self, volume: str, timeout: float = 10.0) -> None:
        def known() -> bool:
            return all(
                any(v["name"] == volume for v in n.server.api.get("/api/v1/volumes")["volumes"])
                for n in self.nodes
                if n.running
            )

        self.wait(f"every node to know {volume}", known, timeout)


# ----------------------------------------------------------------------------- the initiator


class Writer:
    """Writes through failovers and moves; remembers what must be on disk."""

    def __init__(self, uris: list[str], blocks: int, *, depth: int = 4, seed: int = 1) -> None:
        self.uris = uris
        self.blocks = blocks
        self.depth = depth
        self.rng = random.Random(seed)
        self.version = 0
        self.durable = [0] * blocks
        self.written: list[set[int]] = [{0} for _ in range(blocks)]
        self.acks: list[float] = []
        self.reconnects: list[tuple[float, str]] = []
        self.stop = asyncio.Event()

    async def connect(self, patience: float = 60.0) -> NbdClient:
        deadline = time.monotonic() + patience
        while True:
            try:
                return await NbdClient.connect(
                    self.uris[0], fallbacks=tuple(self.uris[1:]), attempt_timeout=2.0
                )
            except (OSError, NbdClientError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def run(self) -> None:
        while not self.stop.is_set():
            client = await self.connect()
            peer = client._link.writer.get_extra_info("peername")
            self.reconnects.append((time.monotonic(), f"{peer[0]}:{peer[1]}"))
            try:
                while not self.stop.is_set():
                    await self._batch(client)
            except (NbdClientError, OSError, TimeoutError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), 1.0)

    async def _batch(self, client: NbdClient) -> None:
        picks = self.rng.sample(range(self.blocks), self.depth)
        versions = []
        for b in picks:
            self.version += 1
            self.written[b].add(self.version)
            versions.append(self.version)

        async def one(b: int, v: int) -> None:
            await asyncio.wait_for(client.write(b * BLOCK, content(b, v)), 2.0)
            self.acks.append(time.monotonic())

        results = await asyncio.gather(
            *(one(b, v) for b, v in zip(picks, versions, strict=True)), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        await asyncio.wait_for(client.flush(), 2.0)
        self.acks.append(time.monotonic())
        for b, v in zip(picks, versions, strict=True):
            self.durable[b] = max(self.durable[b], v)

    def first_served_after(self, t: float) -> float | None:
        conn = next((when for when, _ in self.reconnects if when > t), None)
        return None if conn is None else next((a for a in self.acks if a > conn), None)

    def longest_gap(self, start: float, end: float) -> float:
        inside = [start, *(a for a in self.acks if start <= a <= end), end]
        return max(b - a for a, b in itertools.pairwise(inside))

    async def check(self, uris: list[str]) -> list[str]:
        """Read the region back through any node: problems found (empty: all durable)."""
        c = await NbdClient.connect(uris[0], fallbacks=tuple(uris[1:]))
        try:
            data = await c.read(0, self.blocks * BLOCK)
        finally:
            await c.close()
        problems = []
        for b in range(self.blocks):
            got = decode(data[b * BLOCK : (b + 1) * BLOCK])
            v = 0 if got is None else got[1]
            if got is not None and got[0] != b:
                problems.append(f"block {b}: garbage")
            elif v not in self.written[b] or v < self.durable[b]:
                problems.append(f"block {b}: version {v}, durable {self.durable[b]}")
        return problems


async def wait_for(ready: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        await asyncio.sleep(0.02)


# ----------------------------------------------------------------------------- parts


async def part_failover(cl: Cluster, runs: int) -> dict[str, Any]:
    times: list[float] = []
    problems: list[str] = []
    for i in range(runs):
        owner = cl.nodes[i % len(cl.nodes)]
        name = f"fo{i}"
        owner.server.api.post("/api/v1/volumes", {"name": name, "size": 8 * MiB, "pool": POOL})
        await asyncio.to_thread(cl.wait_known, name)
        w = Writer(cl.uris(name, owner), blocks=2048, seed=i)
        task = asyncio.ensure_future(w.run())
        try:
            await wait_for(lambda w=w: len(w.acks) >= 100, 30)
            await asyncio.to_thread(cl.wait_owner, name, owner.name, cl.others(owner)[0])
            killed = await asyncio.to_thread(owner.kill)
            await wait_for(lambda w=w, k=killed: w.first_served_after(k), 60)
            served = w.first_served_after(killed)
            assert served is not None
            times.append(served - killed)
            n = len(w.acks)
            await wait_for(lambda w=w, n=n: len(w.acks) >= n + 50, 30)
        finally:
            w.stop.set()
            await asyncio.wait_for(task, 30)
        bad = await w.check(cl.uris(name, cl.others(owner)[0]))
        problems += [f"run {i}: {p}" for p in bad]
        log(f"  failover {i + 1}/{runs}: {times[-1]:.2f} s, node {owner.name} -> {w.reconnects[-1][1]}"
            f"{'' if not bad else f', {len(bad)} BAD BLOCKS'}")  # fmt: skip
        await asyncio.to_thread(owner.start)
        await asyncio.to_thread(cl.wait_alive, owner, cl.others(owner)[0], True)
    return {"seconds": summary(times), "runs": times, "problems": problems, "ok": not problems}


async def part_move(cl: Cluster, moves: int) -> dict[str, Any]:
    first = cl.nodes[0]
    first.server.api.post("/api/v1/volumes", {"name": "mv", "size": 8 * MiB, "pool": POOL})
    await asyncio.to_thread(cl.wait_known, "mv")
    w = Writer(cl.uris("mv", first), blocks=2048)
    task = asyncio.ensure_future(w.run())
    pauses: list[float] = []
    floors: list[float] = []
    owner = first
    try:
        await wait_for(lambda: len(w.acks) >= 200, 30)
        await asyncio.to_thread(cl.wait_owner, "mv", first.name, first)
        for i in range(moves):
            target = cl.nodes[(cl.nodes.index(owner) + 1) % len(cl.nodes)]
            before = len(w.reconnects)
            asked = time.monotonic()
            await asyncio.to_thread(owner.server.api.post, "/api/v1/volumes/mv/move", {"node": target.name})
            await wait_for(lambda b=before: len(w.reconnects) > b, 15)
            await wait_for(lambda t=asked: w.first_served_after(t), 15)
            resumed = w.first_served_after(asked)
            assert resumed is not None
            if w.reconnects[-1][1] != target.nbd:
                raise AssertionError(f"move {i}: reconnected to {w.reconnects[-1][1]}, not {target.nbd}")
            pauses.append(w.longest_gap(asked, resumed))
            owner = target
            # The noise floor: a window as long as this move, with no move.
            t0 = time.monotonic()
            await asyncio.sleep(max(0.3, resumed - asked))
            floors.append(w.longest_gap(t0, t0 + max(0.3, resumed - asked)))
    finally:
        w.stop.set()
        await asyncio.wait_for(task, 30)
    problems = await w.check(cl.uris("mv", owner))
    return {
        "pause_ms": summary([p * 1000 for p in pauses]),
        "floor_ms": summary([f * 1000 for f in floors]),
        "pauses_ms": [round(p * 1000, 1) for p in pauses],
        "problems": problems,
        "ok": not problems,
    }


async def part_zombie(cl: Cluster, runs: int) -> dict[str, Any]:
    results = []
    blocks = 256
    for i in range(runs):
        zombie = cl.nodes[i % len(cl.nodes)]
        taker = cl.others(zombie)[0]
        name = f"z{i}"
        zombie.server.api.post("/api/v1/volumes", {"name": name, "size": 4 * MiB, "pool": POOL})
        await asyncio.to_thread(cl.wait_known, name)
        zc = await NbdClient.connect(zombie.uri(name))
        for b in range(blocks):
            await zc.write(b * BLOCK, content(b, 1))
        await zc.flush()
        await asyncio.to_thread(cl.wait_owner, name, zombie.name, taker)
        stop = asyncio.Event()

        async def hammer(client: NbdClient = zc, halt: asyncio.Event = stop) -> None:
            v = 1000
            while not halt.is_set():
                v += 16
                await asyncio.gather(
                    *(client.write(b * BLOCK, content(b, v + b % 16)) for b in range(0, blocks, 16))
                )

        h = asyncio.ensure_future(hammer())
        await asyncio.sleep(0.5)
        frozen = await asyncio.to_thread(zombie.freeze)
        stop.set()
        queued = [asyncio.ensure_future(zc.write(b * BLOCK, content(b, 100_000 + b))) for b in range(blocks)]
        try:
            dead = await asyncio.to_thread(cl.wait_alive, zombie, taker, False)
            c = await NbdClient.connect(taker.uri(name))
            at_takeover = await c.read(0, blocks * BLOCK)
            for b in range(0, blocks, 2):
                await c.write(b * BLOCK, content(b, 200_000 + b))
            await c.flush()
            await c.close()
            thawed = await asyncio.to_thread(zombie.thaw)
            outcomes = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 30)
            told = time.monotonic() - thawed
            back = await asyncio.to_thread(cl.wait_alive, zombie, taker, True, 30)
        finally:
            if zombie.frozen:
                zombie.thaw()
            h.cancel()
            with contextlib.suppress(BaseException):
                await h
            with contextlib.suppress(Exception):
                await asyncio.wait_for(zc.close(), 2)
        await asyncio.sleep(1.0)
        c = await NbdClient.connect(taker.uri(name))
        now = await c.read(0, blocks * BLOCK)
        await c.close()
        acked = sum(1 for r in outcomes if not isinstance(r, BaseException))
        landed = []
        for b in range(blocks):
            got = decode(now[b * BLOCK : (b + 1) * BLOCK])
            want = (b, 200_000 + b) if b % 2 == 0 else decode(at_takeover[b * BLOCK : (b + 1) * BLOCK])
            if got != want:
                landed.append(b)
        ok = acked == 0 and not landed
        results.append(
            {
                "node": zombie.name,
                "presumed_dead_after_s": round(dead, 3),
                "frozen_s": round(thawed - frozen, 3),
                "queued_writes": blocks,
                "queued_acknowledged": acked,
                "blocks_changed_after_takeover": len(landed),
                "client_told_s": round(told, 3),
                "back_alive_s": round(back, 3),
                "ok": ok,
            }
        )
        log(f"  zombie {i + 1}/{runs}: {'ok' if ok else 'FAIL'}: {results[-1]}")
    return {"runs": results, "ok": all(r["ok"] for r in results)}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="failover,move,zombie")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--failovers", type=int, default=10)
    p.add_argument("--moves", type=int, default=30)
    p.add_argument("--zombies", type=int, default=3)
    p.add_argument("--ceph-conf", help="an existing cluster's ceph.conf (default: start a one-node Ceph)")
    p.add_argument(
        "--ceph-pool", help="with --ceph-conf: an RBD pool to use (its blockvirt state is shared!)"
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.nodes < 2:
        log("--nodes: at least 2")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bv-clbench-"))
    ceph = None
    results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "json"}}
    nodes: list[Node] = []
    try:
        if args.ceph_conf:
            conf, pool = args.ceph_conf, args.ceph_pool
            if not pool:
                log("--ceph-pool is needed with --ceph-conf")
                return 2
        else:
            log("starting a one-node Ceph")
            ceph = load_cephcluster().CephCluster(parent_dir=tmp).start()
            pool = f"bvbench-{uuid.uuid4().hex[:6]}"
            ceph.create_pool(pool)
            conf = str(ceph.conf_path)
        nodes = [
            Node(f"node-{chr(97 + i)}", f"127.0.0.{i + 2}", tmp / f"node-{i}") for i in range(args.nodes)
        ]
        for n in nodes:
            n.start()
            n.server.api.post("/api/v1/pools", {"name": POOL, "rbd": {"pool": pool, "conf": conf}})
        cl = Cluster(nodes)
        for n in nodes:
            for m in nodes:
                cl.wait_alive(m, n, True)
        if "failover" in args.parts:
            log(f"part 1: {args.failovers} failovers (kill -9 of the owner)")
            results["failover"] = asyncio.run(part_failover(cl, args.failovers))
        if "move" in args.parts:
            log(f"part 2: {args.moves} planned moves under writes")
            results["move"] = asyncio.run(part_move(cl, args.moves))
        if "zombie" in args.parts:
            log(f"part 3: {args.zombies} zombies (SIGSTOP of the owner, takeover, SIGCONT)")
            results["zombie"] = asyncio.run(part_zombie(cl, args.zombies))
    finally:
        for n in nodes:
            with contextlib.suppress(Exception):
                n.stop()
        if ceph is not None:
            ceph.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if "failover" in results:
        s = results["failover"]["seconds"]
        print(
            f"failover, kill -9 to the first request served on the new node, {s['n']} runs: "
            f"median {s['median']:.2f} s, worst {s['max']:.2f} s (best {s['min']:.2f} s); "
            f"acknowledged data {'intact' if results['failover']['ok'] else 'LOST'}"
        )
    if "move" in results:
        m, f = results["move"]["pause_ms"], results["move"]["floor_ms"]
        print(
            f"planned move, pause the initiator saw, {m['n']} moves: median {m['median']:.0f} ms, "
            f"p99 {m['p99']:.0f} ms, max {m['max']:.0f} ms (noise floor: median {f['median']:.0f} ms, "
            f"max {f['max']:.0f} ms); data {'intact' if results['move']['ok'] else 'LOST'}"
        )
    if "zombie" in results:
        runs = results["zombie"]["runs"]
        print(
            f"zombie, {len(runs)} runs: {'every' if results['zombie']['ok'] else 'NOT every'} queued write "
            f"refused and none landed after the takeover; client told within "
            f"{max(r['client_told_s'] for r in runs):.2f} s of SIGCONT; back alive within "
            f"{max(r['back_alive_s'] for r in runs):.2f} s"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    ok = all(results[k]["ok"] for k in ("failover", "move", "zombie") if k in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
