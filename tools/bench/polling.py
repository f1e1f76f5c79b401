#!/usr/bin/env python3
"""What adaptive polling (`serve --busy-poll-us`) costs in CPU and gains in QD1 latency.

Two blockvirt servers side by side, one with polling (`--busy-poll-us`, default 100) and one
without (`--busy-poll-us=0`), each with a thin volume of `--size` filled through the server.
For each request rate in `--rates` (IOPS; 0 = idle, no client at all; "max" = as fast as QD1
goes), fio 4k random reads at QD1 (`--rw` changes it) run against each server in turn, the
order alternating per rep, and the server's CPU time (user + system, from /proc) is read
around the run. The table gives, per rate and server, the median CPU use in % of one CPU
and fio's mean completion latency. The CPU figures are what this process used, so they do
not depend much on the machine's load; the latencies do.

    python tools/bench/polling.py                          # rates 0,100,1000,10000,max; 3 reps
    python tools/bench/polling.py --rates 0,1000,max --reps 5 --pin same-cpu

Stdlib only; server helpers from run.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any


def _load_run() -> ModuleType:
    path = Path(__file__).with_name("run.py")
    spec = importlib.util.spec_from_file_location("blockvirt_bench_run", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_run = _load_run()
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="0,100,1000,10000,max", help="IOPS list; 0: idle, max: unlimited")
    p.add_argument("--window-us", type=float, default=100.0, help="--busy-poll-us of the polling server")
    p.add_argument("--rw", default="randread", help="fio --rw (default randread)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--runtime", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--size", type=_run.parse_size, default=256 << 20, help="volume size (default 256M)")
    p.add_argument("--pin", choices=["same-cpu", "cross-cpu"], help="pin server and fio (default: unpinned)")
    p.add_argument("--python", default=sys.executable)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rates = args.rates.split(",")
    variants = {"poll": f"--busy-poll-us={args.window_us:g}", "no-poll": "--busy-poll-us=0"}
    results: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
    with tempfile.TemporaryDirectory(prefix="blockvirt-polling-") as tmp:
        work = Path(tmp)
        servers: dict[str, Any] = {}
        try:
            for name, flag in variants.items():
                # A thin volume, as created by default, filled through the server.
                opts = _run.Options(args.size, work, work, args.python, 60.0, (flag,), thick=False)
                s = _run.Server(name)
                servers[name] = s  # stopped in `finally` even if its start or fill fails
                _run.start_blockvirt(s, opts)
                _run.fill(s, args.size, 600, work)
            for rep in range(args.reps):
                order = list(servers) if rep % 2 == 0 else list(reversed(servers))
                for rate in rates:
                    for name in order:
                        s = servers[name]
                        assert s.proc is not None
                        if args.pin:
                            _run.pin_server(s, str(_run.SERVER_CPU))
                        os.sync()
                        t0, c0 = time.monotonic(), cpu_seconds(s.proc.pid)
                        lat: float | None = None
                        if rate == "0":
                            time.sleep(args.runtime)
                        else:
                            params = {
                                "rw": args.rw, "bs": "4k", "iodepth": "1", "size": str(args.size),
                                "time_based": "1", "runtime": f"{args.runtime:g}",
                            }  # fmt: skip
                            if rate != "max":
                                params["rate_iops"] = rate
                            if args.pin:
                                same = args.pin == "same-cpu"
                                params["cpus_allowed"] = str(_run.SERVER_CPU if same else _run.CROSS_CPU)
                            job = _run.run_fio(s, f"{name}-{rate}", params, args.runtime + 60, work)
                            m = _run.job_metrics(job, "write" if "write" in args.rw else "read")
                            lat = m["lat_mean_us"]  # total: see run.LAT_MEAN
                        cpu = (cpu_seconds(s.proc.pid) - c0) / (time.monotonic() - t0) * 100
                        results.setdefault((rate, name), []).append((cpu, lat))
                        shown = "-" if lat is None else f"{lat:.1f} us"
                        _run.log(f"rep {rep + 1} rate {rate:>6} {name:<8} cpu {cpu:5.1f}%  mean lat {shown}")
        finally:
            for s in servers.values():
                s.stop()
    print(f"{'rate IOPS':<10} {'server':<8} {'CPU % of one':>12} {'mean lat us':>12}")
    for rate in rates:
        for name in variants:
            runs = results.get((rate, name), [])
            if not runs:
                continue
            cpu = statistics.median(c for c, _ in runs)
            lats = [lt for _, lt in runs if lt is not None]
            lat = f"{statistics.median(lats):.1f}" if lats else "-"
            print(f"{rate:<10} {name:<8} {cpu:>12.1f} {lat:>12}")
    print(f"medians of {args.reps} reps; CPU: the server process, user + system, over each run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
