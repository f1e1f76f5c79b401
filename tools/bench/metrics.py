#!/usr/bin/env python3
"""What metrics cost on the data path: blockvirt with accounting on vs `serve --no-metrics`.

Two blockvirt servers run side by side, each with its own thick volume of `--size`, filled
once through the server. Then fio (``--ioengine=nbd``, 4k randread at QD16 by default) runs
against each in turn, interleaved (the order alternates per repetition), and the report gives
the median IOPS of each and the server's CPU time per request (user + system time of the
blockvirt process over the run / requests served), and the cost of metrics in both: IOPS
1 - on/off, CPU 1 - off/on (target: at most 3 %). On a machine shared with other work, IOPS
swing far more than 3 % from run to run; CPU time per request is much steadier.

Stdlib only; the server helpers come from ``run.py`` beside this file.
``python tools/bench/metrics.py -h``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any


def _load_run() -> ModuleType:
    """run.py is a script, not a package module: load it by path under a private name."""
    path = Path(__file__).with_name("run.py")
    spec = importlib.util.spec_from_file_location("blockvirt_bench_run", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


_run = _load_run()
log = _run.log

#: Server name -> extra `blockvirt serve` arguments.
VARIANTS: dict[str, tuple[str, ...]] = {"metrics-on": (), "metrics-off": ("--no-metrics",)}
TARGET = 0.03


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fio IOPS of blockvirt with metrics on vs --no-metrics.")
    p.add_argument("--reps", type=int, default=5, help="repetitions per variant (default 5)")
    p.add_argument("--runtime", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument(
        "--ramp-time",
        type=float,
        default=0.0,
        help="fio ramp_time seconds (default 0: then fio counts every request the CPU time covers)",
    )
    p.add_argument("--size", type=_run.parse_size, default=512 << 20, help="volume size (default 512M)")
    p.add_argument("--rw", default="randread", help="fio rw (default randread)")
    p.add_argument("--bs", default="4k", help="fio block size (default 4k)")
    p.add_argument("--iodepth", type=int, default=16, help="fio iodepth (default 16)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs blockvirt")
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--fill-timeout", type=float, default=600.0)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every run and the summary")
    p.add_argument("--log-dir", type=Path, help="keep server logs here (default: removed at exit)")
    p.add_argument("--no-sync", action="store_true", help="do not sync(2) before each run")
    args = p.parse_args(argv)
    if args.reps < 1 or args.runtime <= 0 or args.ramp_time < 0 or args.iodepth < 1:
        p.error("--reps and --iodepth must be >= 1, --runtime > 0, --ramp-time >= 0")
    return args


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def check_metrics(api: str, want_on: bool) -> str | None:
    """The on-server counted the reads; the off-server has no /metrics. None if so, else why not."""
    try:
        with urllib.request.urlopen(api + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except urllib.error.HTTPError as e:
        return None if not want_on and e.code == 404 else f"/metrics answered {e.code}"
    except OSError as e:
        return f"/metrics failed: {e}"
    if not want_on:
        return "/metrics answered 200 under --no-metrics"
    if 'blockvirt_volume_ops_total{op="read",volume="bench"}' not in text:
        return "/metrics has no read counter for the bench volume"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("fio") is None:
        log("fio not found on PATH")
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    servers = [_run.Server(name) for name in VARIANTS]
    apis: dict[str, str] = {}
    runs: list[dict[str, Any]] = []
    problems: list[str] = []
    timeout = args.runtime + args.ramp_time + _run.FIO_SLACK_S
    params = {
        "rw": args.rw,
        "bs": args.bs,
        "iodepth": str(args.iodepth),
        "size": str(args.size),
        "time_based": "1",
        "runtime": f"{args.runtime:g}",
        "ramp_time": f"{args.ramp_time:g}",
    }
    direction = "write" if "write" in args.rw else "read"
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="blockvirt-bench-metrics-") as tmp:
        workdir = Path(tmp)
        logdir = args.log_dir or workdir / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        try:
            for s in servers:
                sdir = workdir / s.name
                sdir.mkdir()
                opts = _run.Options(
                    args.size, sdir, logdir, args.python, args.start_timeout, VARIANTS[s.name]
                )
                log(f"[{s.name}] starting (blockvirt serve {' '.join(VARIANTS[s.name])})")
                _run.start_blockvirt(s, opts)
                apis[s.name] = _api_url(s)
                log(f"[{s.name}] up at {s.uri}; filling {_run.size_arg(args.size)}")
                if not args.no_sync:
                    os.sync()
                s.fill = _run.fill(s, args.size, args.fill_timeout, workdir)
            for rep in range(args.reps):
                order = servers if rep % 2 == 0 else servers[::-1]
                for pos, s in enumerate(order):
                    if not args.no_sync:
                        os.sync()
                    record: dict[str, Any] = {"rep": rep, "server": s.name, "position": pos}
                    assert s.proc is not None
                    try:
                        cpu0 = cpu_seconds(s.proc.pid)
                        job = _run.run_fio(s, s.name, params, timeout, workdir)
                        cpu = cpu_seconds(s.proc.pid) - cpu0
                        record["iops"] = _run.job_metrics(job, direction)["iops"]
                        # With no ramp time, fio's count covers every request the server served.
                        record["cpu_us"] = cpu / max(1, job[direction]["total_ios"]) * 1e6
                        log(
                            f"rep {rep + 1}/{args.reps} {s.name:<12} IOPS={record['iops']:.0f} "
                            f"server CPU/request={record['cpu_us']:.2f} us"
                        )
                    except _run.FioError as exc:
                        record["error"] = str(exc)
                        problems.append(f"{s.name} rep {rep + 1}: {exc}")
                        log(f"rep {rep + 1}/{args.reps} {s.name:<12} FAILED: {exc}")
                    runs.append(record)
            for s in servers:
                why = check_metrics(apis[s.name], want_on=s.name == "metrics-on")
                if why:
                    problems.append(f"{s.name}: {why}")
        except (_run.ServerError, _run.FioError, OSError) as exc:
            problems.append(str(exc))
            log(f"failed: {exc}")
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        finally:
            for s in servers:
                s.stop()

    summary = {s.name: summarize(runs, s.name) for s in servers}
    on, off = summary["metrics-on"], summary["metrics-off"]
    costs: dict[str, float | None] = {"iops": None, "cpu": None}
    if on["iops"] and off["iops"]:
        costs["iops"] = 1.0 - on["iops"]["median"] / off["iops"]["median"]
    if on["cpu_us"] and off["cpu_us"]:
        costs["cpu"] = 1.0 - off["cpu_us"]["median"] / on["cpu_us"]["median"]
    workload = f"{args.rw} {args.bs} QD{args.iodepth}"
    print(f"workload: fio --ioengine=nbd {workload}, {args.runtime:g}s runs, {args.reps} reps interleaved")
    print("cells: median [min-max]; server CPU = user+system time of the blockvirt process per request")
    for name, st in summary.items():
        iops, cpu = st["iops"], st["cpu_us"]
        if iops and cpu:
            print(
                f"{name:<12} IOPS {iops['median']:8.0f} [{iops['min']:.0f}-{iops['max']:.0f}]"
                f"   server CPU/request {cpu['median']:6.2f} us [{cpu['min']:.2f}-{cpu['max']:.2f}]"
            )
    if costs["iops"] is not None and costs["cpu"] is not None:
        print(f"cost of metrics in IOPS (1 - on/off):                    {costs['iops']:+.2%}")
        print(f"cost of metrics in server CPU per request (1 - off/on):  {costs['cpu']:+.2%}")
        verdict = "within" if max(costs.values()) <= TARGET else "OVER"  # type: ignore[type-var]
        print(f"target: at most {TARGET:.0%}: {verdict} (a negative cost is noise)")
    for p in problems:
        print(f"problem: {p}")
    if args.json:
        out = {
            "config": {**vars(args), "json": str(args.json), "log_dir": str(args.log_dir)},
            "environment": _run.environment(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start)),
            "runs": runs,
            "summary": summary,
            "costs": costs,
            "problems": problems,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 1 if problems or None in costs.values() else 0


def summarize(runs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("iops", "cpu_us"):
        vals = [r[key] for r in runs if r["server"] == name and key in r]
        out[key] = (
            {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
            if vals
            else None
        )
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _api_url(server: Any) -> str:
    """The API URL from the server's command line (`--api HOST:PORT`): start_blockvirt keeps
    it only in the environment it gave the server."""
    argv = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().decode().split("\0")
    return "http://" + argv[argv.index("--api") + 1]


if __name__ == "__main__":
    sys.exit(main())
