#!/usr/bin/env python3
"""Soak: many initiators mixing verified I/O on many volumes for a while, memory watched.

`--volumes` volumes (half thin, half thick), each with one fio process running
`--jobs-per-volume` jobs (one NBD connection each; 16 x 4 = 64 initiators by default), random
reads and writes with crc32c verification as they go (a verify backlog), 4 KiB on even
volumes and 64 KiB on odd ones. Meanwhile a churner takes a snapshot of a random volume every
few seconds and deletes the older ones (merge jobs run under the load), and two volumes have
QoS limits. The server's RSS is sampled every second: growth is measured from the end of the
first quarter (warm-up: buffer pools and caches fill) to the end.

Pass: every fio exits 0 with no error, and RSS growth stays under `--max-growth-mib`.

``.venv/bin/python tools/bench/soak.py [--duration 180] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from blockvirt.testing import BlockvirtServer

MiB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run(
    server: BlockvirtServer, tmp: Path, *, volumes: int, jobs: int, duration: float, seed: int = 1
) -> dict[str, Any]:
    size = 16 * MiB * jobs
    names = [f"soak{i:02d}" for i in range(volumes)]
    for i, n in enumerate(names):
        server.create_volume(n, size, thick=bool(i % 2))
    server.api.request("PATCH", "/api/v1/volumes/soak00/qos", {"limit": 3000})
    server.api.request("PATCH", "/api/v1/volumes/soak01/qos", {"bps_limit": 32 * MiB, "shares": 2000})
    procs = []
    for i, n in enumerate(names):
        out = tmp / f"{n}.json"
        argv = [
            "fio", f"--name={n}", "--ioengine=nbd", f"--uri={server.uri(n)}", "--rw=randrw",
            f"--bs={'64k' if i % 2 else '4k'}", "--iodepth=4", f"--numjobs={jobs}",
            "--offset_increment=16M", "--size=16M", "--time_based", f"--runtime={duration}",
            "--verify=crc32c", "--verify_backlog=64", "--verify_fatal=1", "--group_reporting=0",
            "--output-format=json", f"--output={out}", "--eta=never",
        ]  # fmt: skip
        procs.append((n, out, subprocess.Popen(argv, cwd=tmp, stderr=subprocess.PIPE)))
    assert server.proc is not None
    pid = server.proc.pid
    stop = threading.Event()
    churn: dict[str, int] = {"snapshots": 0, "deleted": 0, "errors": 0}

    def churner() -> None:
        rng = random.Random(seed)
        taken: dict[str, list[str]] = {}
        k = 0
        while not stop.wait(3.0):
            vol = rng.choice(names)
            k += 1
            try:
                server.api.post(f"/api/v1/volumes/{vol}/snapshots", {"name": f"c{k}"})
                churn["snapshots"] += 1
                taken.setdefault(vol, []).append(f"c{k}")
                while len(taken[vol]) > 2:
                    server.api.delete(f"/api/v1/volumes/{vol}/snapshots/{taken[vol].pop(0)}")
                    churn["deleted"] += 1
            except Exception as e:  # a refusal while a merge runs is fine; anything else is noted
                if "running" not in str(e) and "merge" not in str(e):
                    churn["errors"] += 1
                    log(f"  churn: {e}")

    th = threading.Thread(target=churner, daemon=True)
    th.start()
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    while any(p.poll() is None for _, _, p in procs):
        samples.append((time.monotonic() - t0, rss_bytes(pid)))
        time.sleep(1.0)
        if time.monotonic() - t0 > duration + 120:
            break
    stop.set()
    th.join(30)
    results = {}
    for n, out, p in procs:
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        jobs_out = json.loads(out.read_text())["jobs"] if out.exists() else []
        results[n] = {
            "rc": p.returncode,
            "errors": sum(j["error"] for j in jobs_out),
            "read_bytes": sum(j["read"]["io_bytes"] for j in jobs_out),
            "write_bytes": sum(j["write"]["io_bytes"] for j in jobs_out),
            "stderr": err.decode()[-400:] if p.returncode else "",
        }
    warm = [r for t, r in samples if t >= duration / 4]
    start_rss = warm[0] if warm else samples[0][1]
    end_rss = statistics.median(r for _, r in samples[-5:])
    return {
        "initiators": volumes * jobs,
        "volumes": volumes,
        "duration": duration,
        "fio": results,
        "churn": churn,
        "rss_mib": [(round(t, 1), round(r / MiB, 1)) for t, r in samples],
        "rss_start_mib": round(start_rss / MiB, 1),
        "rss_end_mib": round(end_rss / MiB, 1),
        "rss_growth_mib": round((end_rss - start_rss) / MiB, 1),
        "ok": all(r["rc"] == 0 and r["errors"] == 0 for r in results.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volumes", type=int, default=16)
    p.add_argument("--jobs-per-volume", type=int, default=4)
    p.add_argument("--duration", type=float, default=180.0)
    p.add_argument("--max-growth-mib", type=float, default=32.0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if shutil.which("fio") is None:
        log("fio is needed")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="bv-soak-"))
    try:
        with BlockvirtServer(tmp / "data", log_level="warning") as server:
            res = run(server, tmp, volumes=args.volumes, jobs=args.jobs_per_volume, duration=args.duration)
        # The server stopped (SIGTERM): the offline check must find a clean data directory.
        chk = subprocess.run(
            [sys.executable, "-m", "blockvirt", "check", "--data-dir", str(tmp / "data")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        res["check"] = chk.stdout.strip().splitlines()[-1] if chk.stdout.strip() else chk.stderr
        res["ok"] = res["ok"] and chk.returncode == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    moved = sum(r["read_bytes"] + r["write_bytes"] for r in res["fio"].values())
    print(f"soak: {res['initiators']} initiators on {res['volumes']} volumes for {res['duration']:.0f} s, "
          f"{moved / MiB:.0f} MiB moved, verified; fio errors: "
          f"{sum(r['errors'] for r in res['fio'].values())}, bad exits: "
          f"{sum(1 for r in res['fio'].values() if r['rc'])}")  # fmt: skip
    print(f"churn: {res['churn']['snapshots']} snapshots taken, {res['churn']['deleted']} deleted "
          f"(merges under load), {res['churn']['errors']} unexpected errors")  # fmt: skip
    print(f"offline check after a SIGTERM: {res['check']}")
    print(f"RSS: {res['rss_start_mib']} MiB after warm-up -> {res['rss_end_mib']} MiB at the end "
          f"(growth {res['rss_growth_mib']} MiB; limit {args.max_growth_mib} MiB)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    ok = res["ok"] and res["rss_growth_mib"] <= args.max_growth_mib and not res["churn"]["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
