#!/usr/bin/env python3
"""Storage I/O control with real clients: fio (`--ioengine=nbd`) on several volumes at once.

Every scenario starts one fio per volume (4 KiB random reads unless said otherwise, all
backlogged). What is judged is what the clients saw: fio's own per-second IOPS log (the
server's per-volume counters are sampled every second too, for comparison, never judged),
the first `--warmup` windows and the last one dropped, against the issue's criteria:

  shares-qd16, shares-qd4  pool capped at 4000 IOPS, shares 1:2:4 -> 571/1143/2286 (+-5%),
                           sum >= 95% of the capacity
  reservation              d1: reservation 1000, shares 1; d2, d3 saturating -> d1 mean >= 990,
                           >= 950 in 95% of windows; d2 and d3 equal (+-5%)
  limit                    d1 limited to 1000 beside 2 saturating disks: every window <= 1020,
                           mean >= 970
  nested                   A (3500) {a1 1000, a2 2500}, B (1500) {b1 500 at 10 IOPS, b2 1000
                           limited to 1000} -> a1 854, a2 2136, b2 1000 (+-5%)
  mixed                    equal shares, two disks at 4 KiB and one at 1 MiB: cost units split
                           equally (+-10%)
  retune                   at t=10 s d1 goes from limit 1000/shares 1000 to limit 2000/shares
                           4000: the second full window after meets the new targets (+-5%)
  latency                  a one-queue device at 2000 IOPS, shares 1:2:4 at QD32, and a QD1
                           probe: with a 10 ms target the probe's p95 (fio's completion
                           latency) <= 1.5 x the target and under half the uncontrolled one;
                           throughput >= 95% of uncontrolled; the 1:2:4 split (+-10%)
  overhead                 one volume, QoS configured but never binding (pool capacity 10x
                           what it serves) vs no QoS, interleaved: IOPS >= 90%, p99 <= 1.2x

Uses the blockvirt package: ``.venv/bin/python tools/bench/qos.py [--scenarios a,b] [--json f]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import itertools

from blockvirt.qos.cost import CostModel
from blockvirt.testing import BlockvirtServer

MiB = 1 << 20
SIZE = 256 * MiB
CAP = 4000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Load:
    volume: str
    bs: str = "4k"
    qd: int = 16
    rate_iops: int = 0


@dataclass
class Result:
    name: str
    checks: list[tuple[str, bool]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def check(self, what: str, ok: bool) -> None:
        self.checks.append((what, ok))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok in self.checks)


class Bench:
    def __init__(
        self, server: BlockvirtServer, tmp: Path, runtime: float, warmup: int, *, fill: bool = True
    ) -> None:
        self.s = server
        self.fill = fill  # write every volume first (else reads are of zeros the server makes)
        self.tmp = tmp
        self.runtime = runtime
        self.warmup = warmup
        self.n = 0

    # ------------------------------------------------------------ setup
    def volume(self, name: str, pool: str = "default") -> None:
        self.s.create_volume(name, SIZE, pool=pool)
        if not self.fill:
            return
        subprocess.run(
            ["fio", "--name=fill", "--ioengine=nbd", f"--uri={self.s.uri(name)}", "--rw=write",
             "--bs=1M", "--iodepth=8", f"--size={SIZE}", "--output=/dev/null"],
            check=True, cwd=self.tmp, timeout=300,
        )  # fmt: skip

    def reset(self) -> None:
        """No volumes, no groups, the default pool uncapped."""
        for v in self.s.api.get("/api/v1/volumes")["volumes"]:
            self.s.api.delete(f"/api/v1/volumes/{v['name']}")
        for g in sorted(self.s.api.get("/api/v1/qos/groups")["groups"], key=lambda g: g["parent"] is None):
            self.s.api.delete(f"/api/v1/qos/groups/{g['group']}")
        self.pool(iops_capacity=0, latency_target_ms=0)

    def pool(self, **settings: Any) -> None:
        self.s.api.request("PATCH", "/api/v1/pools/default", settings)

    def qos(self, volume: str, **settings: Any) -> None:
        self.s.api.request("PATCH", f"/api/v1/volumes/{volume}/qos", settings)

    def group(self, name: str, **settings: Any) -> None:
        self.s.api.post("/api/v1/qos/groups", {"name": name, **settings})

    # ------------------------------------------------------------ running
    def ops(self) -> dict[str, int]:
        out = {}
        for v in self.s.api.get("/api/v1/volumes")["volumes"]:
            st = self.s.api.get(f"/api/v1/volumes/{v['name']}/stats")
            out[v["name"]] = sum(st["ops"].get(k, 0) for k in ("read", "write"))
        return out

    def run(self, loads: list[Load], at: dict[float, Any] | None = None) -> dict[str, Any]:
        """Run the loads together; returns per-volume 1-s windows and fio's results."""
        self.n += 1
        procs = []
        for ld in loads:
            out = self.tmp / f"fio-{self.n}-{ld.volume}.json"
            argv = ["fio", f"--name={ld.volume}", "--ioengine=nbd", f"--uri={self.s.uri(ld.volume)}",
                    "--rw=randread", f"--bs={ld.bs}", f"--iodepth={ld.qd}", f"--size={SIZE}",
                    "--time_based", f"--runtime={self.runtime + 2}", "--output-format=json",
                    f"--output={out}", "--eta=never"]  # fmt: skip
            # fio's own rate, averaged per second: what the client got, not what we count.
            argv += [f"--write_iops_log={self.tmp / f'iops-{self.n}-{ld.volume}'}", "--log_avg_msec=1000"]
            if ld.rate_iops:
                argv.append(f"--rate_iops={ld.rate_iops}")
            procs.append((ld, out, subprocess.Popen(argv, cwd=self.tmp, stderr=subprocess.PIPE)))
        time.sleep(1.0)  # everyone connected and running
        samples = [(time.monotonic(), self.ops())]
        pending = dict(at or {})
        t0 = samples[0][0]
        while samples[-1][0] - t0 < self.runtime:
            time.sleep(max(0.0, t0 + len(samples) - time.monotonic()))
            now = time.monotonic()
            for when in sorted(pending):
                if now - t0 >= when:
                    pending.pop(when)()
            samples.append((now, self.ops()))
        fio: dict[str, Any] = {}
        for ld, out, p in procs:
            _, err = p.communicate(timeout=120)
            job = json.loads(out.read_text())["jobs"][0]
            fio[ld.volume] = {"error": job["error"], "rc": p.returncode, "read": job["read"]}
            if p.returncode or job["error"]:
                raise RuntimeError(f"fio on {ld.volume} failed: {err.decode()[-500:]}")
        server: dict[str, list[float]] = {ld.volume: [] for ld in loads}
        for (ta, a), (tb, b) in itertools.pairwise(samples):
            for v in server:
                server[v].append((b[v] - a[v]) / (tb - ta))
        # fio's window k covers [k, k + 1) s after its start; sampling (and `at`) started 1 s
        # after, so fio's window k + 1 is the server's window k.
        n = len(samples) - 1
        windows = {ld.volume: fio_iops_log(self.tmp / f"iops-{self.n}-{ld.volume}_iops.1.log")[1 : 1 + n]
                   for ld in loads}  # fmt: skip
        steady = {v: w[self.warmup : -1] for v, w in windows.items()}
        mean = {v: statistics.mean(w) for v, w in steady.items()}
        return {"windows": windows, "steady": steady, "mean": mean, "fio": fio, "server_windows": server}


def fio_iops_log(path: Path) -> list[float]:
    """fio's --write_iops_log with --log_avg_msec=1000: one IOPS figure per second."""
    out = []
    for line in path.read_text().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 2 and fields[2] == "0":  # direction 0: reads
            out.append(float(fields[1]))
    return out


def near(v: float, target: float, tol: float) -> bool:
    return abs(v - target) <= tol * target


def shares(b: Bench, qd: int) -> Result:
    r = Result(f"shares-qd{qd}")
    b.reset()
    b.pool(iops_capacity=CAP)
    for name, w in (("d1", 1000), ("d2", 2000), ("d3", 4000)):
        b.volume(name)
        b.qos(name, shares=w)
    out = b.run([Load(n, qd=qd) for n in ("d1", "d2", "d3")])
    m = out["mean"]
    for name, target in (("d1", CAP / 7), ("d2", 2 * CAP / 7), ("d3", 4 * CAP / 7)):
        r.check(f"{name} {m[name]:.0f} ~ {target:.0f} (+-5%)", near(m[name], target, 0.05))
    r.check(f"sum {sum(m.values()):.0f} >= 95% of {CAP}", sum(m.values()) >= 0.95 * CAP)
    r.data = out
    return r


def reservation(b: Bench) -> Result:
    r = Result("reservation")
    b.reset()
    b.pool(iops_capacity=CAP)
    for n in ("d1", "d2", "d3"):
        b.volume(n)
    b.qos("d1", shares=1, reservation=1000)
    out = b.run([Load(n) for n in ("d1", "d2", "d3")])
    m, w = out["mean"], out["steady"]["d1"]
    r.check(f"d1 mean {m['d1']:.0f} >= 990", m["d1"] >= 990)
    good = sum(x >= 950 for x in w) / len(w)
    r.check(f"d1 >= 950 in {good:.0%} of windows (>= 95%)", good >= 0.95)
    r.check(f"d2 {m['d2']:.0f} ~ d3 {m['d3']:.0f} (+-5%)", near(m["d2"], m["d3"], 0.05))
    r.data = out
    return r


def limit(b: Bench) -> Result:
    r = Result("limit")
    b.reset()
    b.pool(iops_capacity=CAP)
    for n in ("d1", "d2", "d3"):
        b.volume(n)
    b.qos("d1", limit=1000)
    out = b.run([Load(n) for n in ("d1", "d2", "d3")])
    w = out["steady"]["d1"]
    r.check(f"every steady window <= 1020 (max {max(w):.0f})", max(w) <= 1020)
    r.check(f"mean {out['mean']['d1']:.0f} >= 970", out["mean"]["d1"] >= 970)
    r.data = out
    return r


def nested(b: Bench) -> Result:
    r = Result("nested")
    b.reset()
    b.pool(iops_capacity=CAP)
    b.group("A", shares=3500)
    b.group("B", shares=1500)
    for n, g, w, extra in (("a1", "A", 1000, {}), ("a2", "A", 2500, {}), ("b1", "B", 500, {}),
                           ("b2", "B", 1000, {"limit": 1000})):  # fmt: skip
        b.volume(n)
        b.qos(n, group=g, shares=w, **extra)
    out = b.run([Load("a1"), Load("a2"), Load("b1", rate_iops=10), Load("b2")])
    m = out["mean"]
    for n, target in (("a1", 854), ("a2", 2136), ("b2", 1000)):
        r.check(f"{n} {m[n]:.0f} ~ {target} (+-5%)", near(m[n], target, 0.05))
    # b1's few requests: judged over the whole run (fio's count), 1-s windows are too coarse.
    b1 = out["fio"]["b1"]["read"]["iops"]
    r.check(f"b1 {b1:.1f} ~ 10 (+-10%)", near(b1, 10, 0.10))
    r.data = out
    return r


def mixed(b: Bench) -> Result:
    r = Result("mixed")
    b.reset()
    b.pool(iops_capacity=CAP)
    for n in ("k1", "k2", "m1"):
        b.volume(n)
    out = b.run([Load("k1"), Load("k2"), Load("m1", bs="1M", qd=4)])
    cost = CostModel(6144)
    units = {"k1": out["mean"]["k1"] * cost.cost(4096), "k2": out["mean"]["k2"] * cost.cost(4096),
             "m1": out["mean"]["m1"] * cost.cost(MiB)}  # fmt: skip
    for n, u in units.items():
        r.check(f"{n} {u:.0f} cost units/s ~ {CAP / 3:.0f} (+-10%)", near(u, CAP / 3, 0.10))
    out["cost_units"] = units
    r.data = out
    return r


def retune(b: Bench) -> Result:
    r = Result("retune")
    b.reset()
    b.pool(iops_capacity=CAP)
    for n in ("d1", "d2"):
        b.volume(n)
    b.qos("d1", limit=1000, shares=1000)
    b.warmup, saved = 0, b.warmup
    try:
        out = b.run([Load("d1"), Load("d2")], at={10.0: lambda: b.qos("d1", limit=2000, shares=4000)})
    finally:
        b.warmup = saved
    w1, w2 = out["windows"]["d1"], out["windows"]["d2"]
    before = w1[saved:10]
    after1, after2 = w1[11:-1], w2[11:-1]  # from the second full window after the change
    r.check(f"before: d1 {statistics.mean(before):.0f} ~ 1000", near(statistics.mean(before), 1000, 0.05))
    r.check(f"after: every d1 window ~ 2000 ({min(after1):.0f}-{max(after1):.0f})",
            all(near(x, 2000, 0.05) for x in after1))  # fmt: skip
    r.check(f"after: d2 {statistics.mean(after2):.0f} ~ 2000", near(statistics.mean(after2), 2000, 0.05))
    r.check("no I/O errors", all(f["error"] == 0 for f in out["fio"].values()))
    r.data = out
    return r


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (clock ticks)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def overhead(b: Bench, reps: int) -> Result:
    r = Result("overhead")
    b.reset()
    b.volume("o1")
    assert b.s.proc is not None
    pid = b.s.proc.pid
    runs: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(reps):
        for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
            if mode == "on":
                b.pool(iops_capacity=1e6)  # configured, never binding
                b.qos("o1", limit=5e5, shares=2000)
            else:
                b.pool(iops_capacity=0)
                b.qos("o1", limit=0, shares=0)
            c0, n0 = cpu_seconds(pid), b.ops()["o1"]
            out = b.run([Load("o1")])
            c1, n1 = cpu_seconds(pid), b.ops()["o1"]
            cpu[mode].append((c1 - c0) / (n1 - n0) * 1e6)
            fio = out["fio"]["o1"]["read"]
            runs[mode].append((fio["iops"], fio["clat_ns"]["percentile"]["99.000000"] / 1000))
            log(f"  overhead rep {i + 1} {mode}: {fio['iops']:.0f} IOPS, p99 {runs[mode][-1][1]:.0f} us, "
                f"{cpu[mode][-1]:.2f} us CPU/request")  # fmt: skip
    iops = {m: statistics.median(x[0] for x in v) for m, v in runs.items()}
    p99 = {m: statistics.median(x[1] for x in v) for m, v in runs.items()}
    r.check(
        f"IOPS with QoS {iops['on']:.0f} >= 90% of without ({iops['off']:.0f})",
        iops["on"] >= 0.9 * iops["off"],
    )
    r.check(
        f"p99 with QoS {p99['on']:.0f} us <= 1.2x without ({p99['off']:.0f} us)",
        p99["on"] <= 1.2 * p99["off"],
    )
    cpu_med = {m: statistics.median(v) for m, v in cpu.items()}
    r.check(f"server CPU per request: {cpu_med['on']:.2f} us with QoS, {cpu_med['off']:.2f} us without "
            f"(+{cpu_med['on'] / cpu_med['off'] - 1:.1%}; reported)", True)  # fmt: skip
    r.data = {"runs": runs, "median_iops": iops, "median_p99_us": p99, "cpu_us_per_request": cpu}
    return r


def latency(b: Bench, target_ms: float = 10.0, device_iops: float = 2000.0) -> Result:
    """SIOC/PARDA: a device with one queue at `device_iops` (latency grows with its queue),
    three disks at shares 1:2:4 reading at QD32 and a probe at QD1, first uncontrolled, then
    with a latency target. Judged by fio: the probe's p95 completion latency <= 1.5 x the
    target and under half the uncontrolled one (a request that gets its turn no longer waits
    behind a device queue of ~100), throughput >= 95% of uncontrolled, and the 1:2:4 split
    (+-10%), which a first-come-first-served device queue does not give. The server's own
    p95 of the device latency is recorded beside, not judged."""
    r = Result("latency")
    s = b.s
    b.fill = True  # reads must reach the (emulated) device: unwritten blocks never do
    s.api.post("/api/v1/pools", {"name": "dev", "path": str(b.tmp / "dev")})
    vols = ["l1", "l2", "l4"]
    for n, w in zip(vols, (1000, 2000, 4000), strict=True):
        b.volume(n, pool="dev")
        b.qos(n, shares=w)
    b.volume("probe", pool="dev")
    s.api.request("PUT", "/api/v1/debug/faults", {"pool": "dev", "device_iops": device_iops, "ops": ["read"]})
    out: dict[str, Any] = {}
    for mode, settings in (
        ("uncontrolled", {"latency_target_ms": 0}),
        ("controlled", {"latency_target_ms": target_ms}),
    ):
        s.api.request("PATCH", "/api/v1/pools/dev", settings)
        seen: list[float] = []

        def sample(seen: list[float] = seen) -> None:
            pool = next(p for p in s.api.get("/api/v1/qos")["pools"] if p["pool"] == "dev")
            if pool["latency_ms"] is not None:
                seen.append(pool["latency_ms"])

        steady = {float(t): sample for t in range(b.warmup, int(b.runtime))}
        run = b.run([*(Load(n, qd=32) for n in vols), Load("probe", qd=1)], at=steady)
        clat = run["fio"]["probe"]["read"]["clat_ns"]["percentile"]
        run["probe_p95_ms"] = clat["95.000000"] / 1e6
        run["server_device_p95_ms"] = statistics.median(seen) if seen else None
        run["total"] = sum(run["mean"][n] for n in vols)
        # What the device served: the probe too. Controlled, the probe waits ~10 ms instead
        # of ~50 and so takes ~90 IOPS instead of ~20, out of the same 2000: counting only
        # the three disks read that as throughput lost (96.5 % where the device served 100 %).
        run["device_total"] = run["total"] + run["mean"]["probe"]
        out[mode] = run
        split = ", ".join(f"{run['mean'][n]:.0f}" for n in vols)
        log(f"  {mode}: {run['total']:.0f} IOPS ({split}) + probe {run['mean']['probe']:.0f}, "
            f"probe p95 {run['probe_p95_ms']:.1f} ms (fio), "
            f"device p95 {run['server_device_p95_ms']} ms (server)")  # fmt: skip
    s.api.delete("/api/v1/debug/faults/dev")
    c, u = out["controlled"], out["uncontrolled"]
    r.check(
        f"controlled probe p95 {c['probe_p95_ms']:.1f} ms <= 1.5 x {target_ms:g} ms (fio)",
        c["probe_p95_ms"] <= 1.5 * target_ms,
    )
    r.check(
        f"controlled probe p95 {c['probe_p95_ms']:.1f} ms < half the uncontrolled {u['probe_p95_ms']:.1f} ms",
        c["probe_p95_ms"] < 0.5 * u["probe_p95_ms"],
    )
    r.check(
        f"throughput {c['device_total']:.0f} >= 95% of uncontrolled {u['device_total']:.0f}",
        c["device_total"] >= 0.95 * u["device_total"],
    )
    m = c["mean"]
    for n, share in zip(vols, (1, 2, 4), strict=True):
        target = c["total"] * share / 7
        r.check(f"{n} {m[n]:.0f} ~ {target:.0f} (shares, +-10%)", near(m[n], target, 0.10))
    r.data = out
    return r


SCENARIOS = (
    "shares-qd16", "shares-qd4", "reservation", "limit", "nested", "mixed", "retune", "latency", "overhead",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--runtime", type=float, default=20.0, help="seconds per run (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="1-s windows dropped at the start (default 2)")
    p.add_argument("--overhead-reps", type=int, default=3)
    p.add_argument("--json", help="write every window and result here")
    args = p.parse_args(argv)
    if shutil.which("fio") is None:
        log("fio is needed")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="bv-qosbench-"))
    results: list[Result] = []
    try:
        with BlockvirtServer(tmp / "data", log_level="warning") as server:
            b = Bench(server, tmp, args.runtime, args.warmup)
            for name in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
                log(f"scenario {name}")
                if name == "latency":
                    with BlockvirtServer(tmp / "ldata", extra_args=("--fault-injection",)) as ls:
                        res = latency(Bench(ls, tmp, args.runtime, args.warmup))
                elif name.startswith("shares-qd"):
                    res = shares(b, int(name.removeprefix("shares-qd")))
                elif name == "overhead":
                    res = overhead(b, args.overhead_reps)
                else:
                    res = {"reservation": reservation, "limit": limit, "nested": nested, "mixed": mixed,
                           "retune": retune}[name](b)  # fmt: skip
                results.append(res)
                for what, ok in res.checks:
                    log(f"  {'ok  ' if ok else 'FAIL'} {what}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'scenario':<14} result")
    for res in results:
        print(f"{res.name:<14} {'ok' if res.ok else 'FAIL'}: " + "; ".join(w for w, _ in res.checks))
    if args.json:
        rows = [{"name": r.name, "ok": r.ok, "checks": r.checks, "data": r.data} for r in results]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    threading.excepthook = lambda a: None
    sys.exit(main())
