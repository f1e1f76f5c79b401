"""Edits of volumes in three pools of two edit scopes (the file pools; each RBD pool its own)
run at once: creates, snapshots, clones, resizes, deletes and migrations between every pair
of pools, in a random order, from several clients. Nothing hangs, every refusal is a clear
conflict, and afterwards `blockvirt check` finds each pool's catalog and storage agreeing and
every volume readable with what was written into it."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from blockvirt.client import NbdClient, NbdClientError
from blockvirt.testing import BlockvirtServer
from tests.ceph.rbdpool import SERVE_ARGS, attach
from tests.cephcluster import CephCluster

pytestmark = pytest.mark.ceph

MiB = 1 << 20
POOLS = ("default", "rbd-a", "rbd-b")
WORKERS = 5
RUN_FOR = 25.0  # seconds of random edits
#: Refusals that edits racing each other may meet (a volume deleted meanwhile, a job on it,
#: a shrink without --force, ...) are clear one-line errors; never these.
NEVER = ("internal server error", "Traceback", "did not answer", "cannot reach")


def stamp(name: str) -> bytes:
    return name.encode().ljust(4096, b".")


async def test_edits_of_every_pool_at_once(tmp_path: Path, ceph_cluster: CephCluster) -> None:
    ceph_a, ceph_b = f"scope-a-{time.monotonic_ns()}", f"scope-b-{time.monotonic_ns()}"
    ceph_cluster.create_pool(ceph_a)
    ceph_cluster.create_pool(ceph_b)
    server = BlockvirtServer(tmp_path / "data", extra_args=SERVE_ARGS, log_level="info").start()
    rng = random.Random(1207)
    done: dict[str, int] = {}
    refused: dict[str, int] = {}
    names = iter(range(1_000_000))
    unstamped: set[str] = set()
    try:
        attach(server, ceph_cluster, ceph_a, name="rbd-a")
        attach(server, ceph_cluster, ceph_b, name="rbd-b")

        def volumes() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = server.api.get("/api/v1/volumes")["volumes"]
            return out

        def snapshots(vol: str) -> list[str]:
            r = server.cli("snapshot", "list", vol, "--json")
            return [x["name"] for x in json.loads(r.stdout)] if r.returncode == 0 else []

        def cli(*args: str) -> tuple[bool, str]:
            r = server.cli(*args, timeout=90)
            assert r.returncode in (0, 1), (args, r.returncode, r.stderr)
            return r.returncode == 0, r.stderr.strip()

        async def op() -> None:
            vols = await asyncio.to_thread(volumes)
            picked = rng.choice(vols) if vols else None
            vol = picked["name"] if picked else None
            what = rng.choice(
                ["create", "create", "snapshot", "snapshot", "unsnap", "clone", "resize", "delete", "migrate"]
            )
            if what == "create" or vol is None:
                what, name = "create", f"v{next(names)}"
                args: tuple[str, ...] = (
                    "volume",
                    "create",
                    name,
                    "--size",
                    "8M",
                    "--pool",
                    rng.choice(POOLS),
                )
            elif what == "snapshot":
                args = ("snapshot", "create", vol, f"s{next(names)}")
            elif what == "unsnap":
                snaps = await asyncio.to_thread(snapshots, vol)
                if not snaps:
                    return
                args = ("snapshot", "delete", vol, rng.choice(snaps))
            elif what == "clone":
                snaps = await asyncio.to_thread(snapshots, vol)
                if not snaps:
                    return
                args = ("volume", "clone", f"{vol}@{rng.choice(snaps)}", f"c{next(names)}")
            elif what == "resize":
                args = ("volume", "resize", vol, f"{rng.choice([8, 12, 16])}M")
            elif what == "delete":
                args = ("volume", "delete", vol)
            else:
                # Between kinds of storage (RBD pool to RBD pool is not done yet).
                assert picked is not None
                to = "default" if picked["pool"] != "default" else rng.choice(POOLS[1:])
                args = ("migrate", vol, "--pool", to)
            t0 = time.monotonic()
            ok, err = await asyncio.to_thread(cli, *args)
            took = time.monotonic() - t0
            assert took < 60, f"{args} took {took:.1f} s"
            if ok:
                done[what] = done.get(what, 0) + 1
                if what == "create":  # something of its own to read back at the end
                    try:
                        async with await NbdClient.connect(server.uri(args[2])) as c:
                            await c.write(0, stamp(args[2]), fua=True)
                    except (NbdClientError, ConnectionError):
                        gone = args[2] not in {v["name"] for v in await asyncio.to_thread(volumes)}
                        assert gone, f"{args[2]} cannot be written"
                        unstamped.add(args[2])
            else:
                assert err.startswith("blockvirt: error: ") and err.count("\n") == 0, (args, err)
                assert not any(e in err for e in NEVER), (args, err)
                refused[what] = refused.get(what, 0) + 1
                print("refused:", args, err)

        async def worker() -> None:
            end = time.monotonic() + RUN_FOR
            while time.monotonic() < end:
                await op()

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(WORKERS))), RUN_FOR + 120)
        print(f"edits done {done}, refused {refused}")
        assert done.get("create", 0) >= 5 and done.get("snapshot", 0) >= 3, done

        def jobs_running() -> bool:
            jobs = server.api.get("/api/v1/jobs")["jobs"]
            return any(j["state"] in ("running", "queued") for j in jobs)

        deadline = time.monotonic() + 90
        while await asyncio.to_thread(jobs_running):
            assert time.monotonic() < deadline, "jobs still running"
            await asyncio.sleep(0.5)
        failed = [j for j in server.api.get("/api/v1/jobs")["jobs"] if j["state"] == "failed"]
        assert not failed, failed

        # Every volume reads back what was written into it (clones: their source's stamp).
        final = volumes()
        pools = {v["name"]: v["pool"] for v in final}
        print(f"{len(final)} volumes: " + ", ".join(f"{p} {list(pools.values()).count(p)}" for p in POOLS))
        for v in final:
            async with await NbdClient.connect(server.uri(v["name"])) as c:
                head = bytes(await c.read(0, 4096))
            if v["name"].startswith("v"):
                assert head == stamp(v["name"]), v
            else:
                assert head.rstrip(b".\0").startswith(b"v") or head == bytes(4096), v
        assert server.stop(30) == 0
        # Offline, each pool's catalog against its storage.
        r = subprocess.run(
            [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(tmp_path / "data"), "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        server.stop()
        ceph_cluster.delete_pool(ceph_a)
        ceph_cluster.delete_pool(ceph_b)
