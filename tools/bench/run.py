#!/usr/bin/env python3
"""Side-by-side NBD server benchmark: blockvirt against nbdkit, nbd-server and qemu-nbd.

Every server gets its own backing store of the same size, is filled through the server itself
with a sequential fio write (so all of them serve allocated, page-cached data), and is then
measured with fio ``--ioengine=nbd`` in an interleaved order: for each repetition, for each
workload, each server in turn, the server order rotated per repetition. The report gives the
median (and min/max) per server per workload and the ratio blockvirt / best peer.

Stdlib only. Run from anywhere: ``python tools/bench/run.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
EXPORT = "bench"
ALL_SERVERS = ("blockvirt", "nbdkit", "nbd-server", "qemu-nbd")
PEERS = tuple(s for s in ALL_SERVERS if s != "blockvirt")
#: With --baseline DIR: blockvirt run from another source tree (an older commit), measured in
#: the same interleaved order; the table adds bv/base (this tree against that one).
BASELINE = "blockvirt-base"
#: With --rbd: fio's own rbd engine on an image of the same Ceph, no NBD and no server between
#: them. Not a peer: it is the ceiling an NBD server on librbd can approach, so a row where
#: blockvirt and qemu-nbd both sit just under it is bounded by the cluster, not by either.
LIBRBD = "librbd"
FIO_SLACK_S = 60.0  # added to runtime + ramp time for the fio timeout
STOP_GRACE_S = 5.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Metric:
    key: str  # key in a run's metrics dict
    label: str
    higher_is_better: bool


IOPS = Metric("iops", "IOPS", True)
BW = Metric("bw_bytes", "MB/s", True)
#: QD1 latency is fio's total latency: from the start of its submit call to the completion,
#: what an application waits. fio splits it in two, and the split depends on the server, not
#: on the request: completion latency starts once the submit call has returned, so work a
#: server does inside that call counts as submission latency. A server asleep in epoll is
#: woken by the request's send, and the wake-up is paid inside that send (on the same CPU the
#: woken server may also preempt fio and answer before the call returns); a polling server
#: is not woken at all. Completion latency alone thus flatters servers that sleep.
LAT_MEAN = Metric("lat_mean_us", "mean lat µs", False)
LAT_P99 = Metric("lat_p99_us", "p99 lat µs", False)
SLAT_MEAN = Metric("slat_mean_us", "↳ submit µs", False)
CLAT_MEAN = Metric("clat_mean_us", "↳ completion µs", False)
#: CPU time of the server's processes (every thread) per request over the measured window: on
#: two cores, what a server spends is taken from the client and, with --rbd, from the OSD.
CPU = Metric("cpu_us_per_op", "CPU µs/op", False)


#: CPU placements of a run (`Workload.pin`): server and fio on one CPU (what a request costs
#: to serve, with no cross-CPU wake-up), on two different CPUs (a wake-up of the other CPU per
#: request and reply), or where the scheduler puts them (what users see).
PIN_SAME = "same-cpu"
PIN_CROSS = "cross-cpu"
SERVER_CPU = 0
CROSS_CPU = 1


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    metrics: tuple[Metric, ...]  # what the table shows for this workload
    pin: str | None = None  # PIN_SAME, PIN_CROSS, or None: unpinned

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"


def _qd1(rw: str) -> list[Workload]:
    """A QD1 latency workload, unpinned and in both pinned placements."""
    base = f"{rw}-4k-qd1"
    lat = (IOPS, LAT_MEAN, LAT_P99, SLAT_MEAN, CLAT_MEAN, CPU)
    return [
        Workload(f"{base}-lat", rw, "4k", 1, lat),
        Workload(f"{base}-{PIN_SAME}", rw, "4k", 1, lat, PIN_SAME),
        Workload(f"{base}-{PIN_CROSS}", rw, "4k", 1, lat, PIN_CROSS),
    ]


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("randread-4k-qd16", "randread", "4k", 16, (IOPS, CPU)),
        Workload("randwrite-4k-qd16", "randwrite", "4k", 16, (IOPS, CPU)),
        Workload("seqread-1m-qd8", "read", "1M", 8, (BW, CPU)),
        Workload("seqwrite-1m-qd8", "write", "1M", 8, (BW, CPU)),
        *_qd1("randread"),
        *_qd1("randwrite"),
    )
}


# --------------------------------------------------------------------------- helpers

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Parse '1G', '256M', '512KiB' or a byte count; suffixes are powers of 1024."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 1G, 256M, 1048576)")
    size = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if size <= 0 or size % (1 << 20):
        raise argparse.ArgumentTypeError("size must be a positive multiple of 1 MiB")
    return size


def size_arg(size: int) -> str:
    """The shortest K/M/G spelling of a byte count, for CLIs that take sizes."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def csv_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(what: str, ready: Callable[[], bool], alive: Callable[[], bool], timeout: float) -> None:
    """Poll ``ready`` until true; fail early if the process died, or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        if not alive():
            raise ServerError(f"process exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise ServerError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); treat it as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def tool_version(argv: Sequence[str]) -> str | None:
    """First line a tool prints about itself, or None if it cannot say."""
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (cp.stdout or cp.stderr).strip().splitlines()
    return out[0] if cp.returncode == 0 and out else None


# --------------------------------------------------------------------------- servers


class ServerError(Exception):
    pass


@dataclass
class Server:
    """One started NBD server: how to reach it, how to tell it is alive, how to stop it."""

    name: str
    uri: str = ""
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    daemon_pid: int | None = None  # for servers that daemonize (nbd-server)
    pgids: list[int] = field(default_factory=list)
    error: str | None = None
    fill: dict[str, Any] | None = None
    #: fio's arguments naming the target instead of the NBD URI (LIBRBD), and its environment.
    fio_target: list[str] | None = None
    fio_env: dict[str, str] | None = None

    def fio_args(self) -> list[str]:
        return self.fio_target if self.fio_target is not None else ["--ioengine=nbd", f"--uri={self.uri}"]

    def alive(self) -> bool:
        if self.fio_target is not None:  # no process: fio itself is the client and the driver
            return True
        if self.proc is not None:
            return self.proc.poll() is None
        if self.daemon_pid is not None:
            return pid_alive(self.daemon_pid)
        return False

    def stop(self) -> None:
        """SIGTERM every process group we started, then SIGKILL what is left."""
        for pgid in self.pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            if self.proc is not None:
                self.proc.poll()  # reap our direct child so it does not linger as a zombie
            if not any(group_alive(g) for g in self.pgids):
                break
            time.sleep(0.1)
        for pgid in self.pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_GRACE_S)
        self.pgids.clear()


def exit_status(server: Server) -> str:
    """' (exit status N)' or ' (killed by SIGX)' for a dead direct child, else ''."""
    rc = server.proc.poll() if server.proc is not None else None
    if rc is None:
        return ""
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f" (killed by {signal.Signals(-rc).name})"
    return f" (exit status {rc})"


def group_alive(pgid: int) -> bool:
    """True while a live (non-zombie) process is in process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def pin_server(server: Server, cpus: str) -> None:
    """Move every process of the server, with all its threads, to ``cpus`` (a taskset list).
    Children forked later (nbd-server's per-connection ones) inherit it."""
    for pgid in server.pgids:
        for pid in group_pids(pgid):
            subprocess.run(
                ["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True, check=False, timeout=10
            )


def all_cpus() -> str:
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Options:
    size: int
    workdir: Path
    logdir: Path
    python: str
    start_timeout: float
    blockvirt_args: tuple[str, ...] = ()
    baseline: Path | None = None
    #: With --rbd: (ceph.conf, pool) of the throwaway Ceph every server's disk lives in.
    ceph: tuple[str, str] | None = None
    thick: bool = True  # blockvirt's volume: thick (preallocated) or thin
    baseline_args: tuple[str, ...] | None = None  # None: the same as blockvirt_args


def spawn(server: Server, argv: Sequence[str], opts: Options, **kw: Any) -> None:
    """Start argv in its own session (own process group), output to the server's log."""
    server.log_path = opts.logdir / f"{server.name}.log"
    with open(server.log_path, "ab") as logf:
        logf.write(("$ " + " ".join(argv) + "\n").encode())
        logf.flush()
        server.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kw,
        )
    server.pgids.append(server.proc.pid)


def backing_file(name: str, opts: Options) -> Path:
    path = opts.workdir / f"{name}.img"
    with open(path, "wb") as f:
        f.truncate(opts.size)
    return path


def start_nbdkit(server: Server, opts: Options) -> None:
    img = backing_file(server.name, opts)
    port = free_port()
    argv = ["nbdkit", "-f", "--exit-with-parent", "-i", HOST, "-p", str(port)]
    spawn(server, [*argv, "file", f"file={img}"], opts)
    server.uri = f"nbd://{HOST}:{port}/{EXPORT}"
    wait_for(f"nbdkit port {port}", lambda: port_open(port), server.alive, opts.start_timeout)


def create_rbd_image(image: str, opts: Options) -> str:
    """An image of --size in the throwaway Ceph's pool (--rbd), for a server that is not
    blockvirt (blockvirt makes its own through `volume create`)."""
    assert opts.ceph is not None
    conf, pool = opts.ceph
    subprocess.run(
        ["rbd", "-c", conf, "create", f"{pool}/{image}", "--size", f"{opts.size // (1 << 20)}M"],
        check=True, capture_output=True, timeout=opts.start_timeout,
    )  # fmt: skip
    return image


def start_qemu_nbd(server: Server, opts: Options) -> None:
    port = free_port()
    argv = ["qemu-nbd", "-f", "raw", "-x", EXPORT, "-b", HOST, "-p", str(port)]
    if opts.ceph is not None:
        # qemu's own rbd driver on an image of the same Ceph; cache=none keeps librbd's cache
        # off, as blockvirt keeps it (a completed write is on the OSDs: same durability).
        conf, pool = opts.ceph
        image = create_rbd_image(f"qemu-{server.name}", opts)
        spawn(server, [*argv, "-t", "-e", "16", "--cache=none", f"rbd:{pool}/{image}:conf={conf}"], opts)
    else:
        img = backing_file(server.name, opts)
        spawn(server, [*argv, "-t", "-e", "16", "--cache=writeback", str(img)], opts)
    server.uri = f"nbd://{HOST}:{port}/{EXPORT}"
    wait_for(f"qemu-nbd port {port}", lambda: port_open(port), server.alive, opts.start_timeout)


def start_nbd_server(server: Server, opts: Options) -> None:
    # nbd-server -d serves a single connection and exits, so let it daemonize (it then leads
    # its own session; per-connection children share its process group) and track it by
    # its pid file.
    img = backing_file(server.name, opts)
    port = free_port()
    conf = opts.workdir / "nbd-server.conf"
    pidfile = opts.workdir / "nbd-server.pid"
    conf.write_text(
        "[generic]\n"
        f"    port = {port}\n"
        f"    listenaddr = {HOST}\n"
        "    allowlist = false\n"
        f"[{EXPORT}]\n"
        f"    exportname = {img}\n"
    )
    spawn(server, ["nbd-server", "-C", str(conf), "-p", str(pidfile)], opts, cwd=opts.workdir)
    assert server.proc is not None
    try:
        rc = server.proc.wait(timeout=opts.start_timeout)
    except subprocess.TimeoutExpired:
        raise ServerError("nbd-server did not daemonize") from None
    server.pgids.clear()
    server.proc = None
    if rc != 0:
        raise ServerError(f"nbd-server exited with status {rc}")

    def read_pid() -> bool:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"nbd-server" in cmdline and str(conf).encode() in cmdline:
                server.daemon_pid = pid
                server.pgids.append(os.getpgid(pid))
                return True
        return False

    wait_for("nbd-server pid file", read_pid, lambda: True, opts.start_timeout)
    server.uri = f"nbd://{HOST}:{port}/{EXPORT}"
    wait_for(f"nbd-server port {port}", lambda: port_open(port), server.alive, opts.start_timeout)


def start_blockvirt(
    server: Server, opts: Options, root: Path = REPO_ROOT, extra: tuple[str, ...] | None = None
) -> None:
    nbd_port, api_port = free_port(), free_port()
    while api_port == nbd_port:
        api_port = free_port()
    data_dir = opts.workdir / f"{server.name}-data"
    data_dir.mkdir()
    api_url = f"http://{HOST}:{api_port}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["BLOCKVIRT_API"] = api_url
    spawn(
        server,
        [
            opts.python,
            "-m",
            "blockvirt",
            "serve",
            "--data-dir",
            str(data_dir),
            "--nbd",
            f"{HOST}:{nbd_port}",
            "--api",
            f"{HOST}:{api_port}",
            *(opts.blockvirt_args if extra is None else extra),
        ],
        opts,
        cwd=root,
        env=env,
    )
    wait_for(
        f"blockvirt API port {api_port}",
        lambda: port_open(api_port),
        server.alive,
        opts.start_timeout,
    )
    wait_for(
        f"blockvirt NBD port {nbd_port}",
        lambda: port_open(nbd_port),
        server.alive,
        opts.start_timeout,
    )
    where: list[str] = []
    if opts.ceph is not None:  # the volume lives on an RBD pool of the throwaway Ceph
        conf, pool = opts.ceph
        if server.name == BASELINE:  # a Ceph pool of its own: two nodes' catalogs would clash
            pool = f"{pool}-base"
        attach = [
            opts.python,
            "-m",
            "blockvirt",
            "pool",
            "create",
            "ceph",
            "--rbd",
            pool,
            "--ceph-conf",
            conf,
        ]
        cp = subprocess.run(
            [*attach, "--api", api_url], cwd=root, env=env, capture_output=True, text=True, timeout=60
        )
        if cp.returncode != 0:
            raise ServerError(f"'pool create --rbd' failed: {(cp.stdout + cp.stderr).strip()[-500:]}")
        where = ["--pool", "ceph"]  # thin: the fill writes every byte anyway
    create = [
        opts.python,
        "-m",
        "blockvirt",
        "volume",
        "create",
        EXPORT,
        "--size",
        size_arg(opts.size),
        *where,
        *(["--thick"] if opts.thick else []),
        "--api",
        api_url,
    ]
    deadline = time.monotonic() + opts.start_timeout
    while True:  # the API may accept connections a little before it serves requests
        try:
            cp = subprocess.run(
                create,
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                timeout=max(5.0, opts.start_timeout),
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ServerError("'volume create' timed out") from None
        if cp.returncode == 0:
            break
        if not server.alive() or time.monotonic() > deadline:
            out = (cp.stdout + cp.stderr).strip()
            raise ServerError(f"'volume create' failed (status {cp.returncode}): {out[-500:]}")
        time.sleep(0.5)
    server.uri = f"nbd://{HOST}:{nbd_port}/{EXPORT}"


def start_librbd(server: Server, opts: Options) -> None:
    """No server: an image for fio's rbd engine, with librbd's cache off as qemu-nbd's
    `--cache=none` and blockvirt keep it."""
    assert opts.ceph is not None
    conf, pool = opts.ceph
    image = create_rbd_image(f"fio-{server.name}", opts)
    server.uri = f"rbd:{pool}/{image}"
    server.fio_target = ["--ioengine=rbd", f"--pool={pool}", f"--rbdname={image}", "--clientname=admin"]
    server.fio_env = {**os.environ, "CEPH_CONF": conf, "CEPH_ARGS": "--rbd_cache=false"}


def start_baseline(server: Server, opts: Options) -> None:
    assert opts.baseline is not None
    start_blockvirt(server, opts, root=opts.baseline, extra=opts.baseline_args)


STARTERS: dict[str, Callable[[Server, Options], None]] = {
    "blockvirt": start_blockvirt,
    BASELINE: start_baseline,
    "nbdkit": start_nbdkit,
    "nbd-server": start_nbd_server,
    "qemu-nbd": start_qemu_nbd,
    LIBRBD: start_librbd,
}

REQUIRED_BINARIES: dict[str, str] = {
    "nbdkit": "nbdkit",
    "nbd-server": "nbd-server",
    "qemu-nbd": "qemu-nbd",
}


def probe_size(server: Server, size: int, timeout: float) -> None:
    """Check the export answers a handshake with the expected size (needs nbdinfo)."""
    if shutil.which("nbdinfo") is None or server.fio_target is not None:
        return
    try:
        cp = subprocess.run(
            ["nbdinfo", "--size", server.uri],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ServerError(f"nbdinfo timed out on {server.uri}") from None
    if cp.returncode != 0:
        raise ServerError(f"nbdinfo failed on {server.uri}: {cp.stderr.strip()[-300:]}")
    got = int(cp.stdout.strip())
    if got != size:
        raise ServerError(f"export size is {got} bytes, expected {size}")


# --------------------------------------------------------------------------- fio


class FioError(Exception):
    pass


def run_fio(
    server: Server | str, name: str, params: dict[str, str], timeout: float, out_dir: Path
) -> dict[str, Any]:
    """Run one fio job against the server's export (or an NBD URI); return fio's parsed JSON
    job entry."""
    if isinstance(server, str):
        server = Server(name, uri=server)
    out = out_dir / "fio.json"
    out.unlink(missing_ok=True)
    argv = [
        "fio",
        f"--name={name}",
        *server.fio_args(),
        "--numjobs=1",
        "--output-format=json",
        f"--output={out}",
        "--lat_percentiles=1",  # percentiles of the total latency too (see LAT_MEAN)
        *(f"--{k}={v}" for k, v in params.items()),
    ]
    try:
        cp = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=server.fio_env
        )
    except subprocess.TimeoutExpired:
        raise FioError(f"fio timed out after {timeout:.0f}s") from None
    try:
        data = json.loads(out.read_text())
        job: dict[str, Any] = data["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        msg = (cp.stderr or cp.stdout).strip()
        raise FioError(f"fio failed (status {cp.returncode}): {msg[-500:]}") from None
    if cp.returncode != 0 or job.get("error"):
        msg = (cp.stderr or cp.stdout).strip()
        raise FioError(f"fio error {job.get('error')} (status {cp.returncode}): {msg[-500:]}")
    return job


def job_metrics(job: dict[str, Any], direction: str) -> dict[str, float]:
    d = job[direction]
    clat, lat = d["clat_ns"], d["lat_ns"]
    return {
        "iops": float(d["iops"]),
        "bw_bytes": float(d["bw_bytes"]),
        "lat_mean_us": float(lat["mean"]) / 1000.0,
        "lat_p99_us": _p99(lat) / 1000.0,
        "slat_mean_us": float(d["slat_ns"]["mean"]) / 1000.0,
        "clat_mean_us": float(clat["mean"]) / 1000.0,
        "clat_p99_us": _p99(clat) / 1000.0,
        "ios": float(d["total_ios"]),
    }


def _p99(stat: dict[str, Any]) -> float:
    return float(stat.get("percentile", {}).get("99.000000", 0.0))


def cpu_seconds(pgids: Sequence[int]) -> float:
    """User + system CPU time, every thread, of every process in these process groups."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        # after the command: state, ppid, pgrp ... utime (14th field), stime (15th)
        if int(fields[2]) in pgids:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuWindow:
    """The server's CPU time over fio's measured window (after the ramp, for the runtime),
    sampled by timers while fio runs."""

    def __init__(self, pgids: Sequence[int], ramp: float, runtime: float) -> None:
        self._pgids = list(pgids)
        self._marks: list[float] = []
        self._timers = [threading.Timer(t, self._mark) for t in (ramp, ramp + runtime)]
        self._whole = cpu_seconds(self._pgids)

    def _mark(self) -> None:
        self._marks.append(cpu_seconds(self._pgids))

    def __enter__(self) -> CpuWindow:
        for t in self._timers:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self._timers:
            t.cancel()

    def seconds(self) -> float:
        """The window's CPU time; the whole run's if fio ended before the window did."""
        if len(self._marks) == 2:
            return self._marks[1] - self._marks[0]
        return cpu_seconds(self._pgids) - self._whole


def fill(server: Server, size: int, timeout: float, out_dir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    params = {"rw": "write", "bs": "1M", "iodepth": "8", "size": str(size)}
    job = run_fio(server, "fill", params, timeout, out_dir)
    m = job_metrics(job, "write")
    return {"seconds": round(time.monotonic() - t0, 3), "bw_bytes": m["bw_bytes"]}


# --------------------------------------------------------------------------- report


def fmt_value(metric: Metric, v: float) -> str:
    if metric is BW:
        return f"{v / 1e6:.0f}"
    if metric is IOPS:
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def summarize(
    runs: list[dict[str, Any]], servers: Sequence[str], workloads: Sequence[Workload]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for wl in workloads:
        per_server: dict[str, Any] = {}
        for name in servers:
            samples = [
                r["metrics"] for r in runs if r["workload"] == wl.name and r["server"] == name and r["ok"]
            ]
            if not samples:
                continue
            per_server[name] = {
                key: {
                    "median": statistics.median(s[key] for s in samples),
                    "min": min(s[key] for s in samples),
                    "max": max(s[key] for s in samples),
                    "n": len(samples),
                }
                for key in samples[0]
            }
        ratios: dict[str, Any] = {}
        for metric in wl.metrics:
            bv = per_server.get("blockvirt", {}).get(metric.key, {}).get("median")

            def against(other: float | None, m: Metric = metric, bv: float | None = bv) -> float | None:
                """blockvirt against `other`, > 1 when blockvirt is better."""
                if not other or not bv:
                    return None
                return bv / other if m.higher_is_better else other / bv

            entry: dict[str, Any] = {"best_peer": "-", "best_peer_median": None, "ratio": None}
            peers = {p: per_server[p][metric.key]["median"] for p in per_server if p in PEERS}
            if peers:
                pick = max if metric.higher_is_better else min
                best = pick(peers, key=lambda p: peers[p])
                entry.update(best_peer=best, best_peer_median=peers[best], ratio=against(peers[best]))
            # Also without peers: `--servers blockvirt --baseline DIR` compares two trees.
            for key, other in (("vs_base", BASELINE), ("of_librbd", LIBRBD)):
                value = against(per_server.get(other, {}).get(metric.key, {}).get("median"))
                if value is not None:
                    entry[key] = value
            ratios[metric.key] = entry
        summary[wl.name] = {"servers": per_server, "ratios": ratios}
    return summary


def render_table(
    summary: dict[str, Any], servers: Sequence[str], workloads: Sequence[Workload], reps: int
) -> str:
    with_base = BASELINE in servers
    with_ceiling = LIBRBD in servers
    header = [
        "workload",
        "metric",
        *servers,
        "bv/best",
        "best peer",
        *(["bv/base"] if with_base else []),
        *([f"bv/{LIBRBD}"] if with_ceiling else []),
    ]
    rows: list[list[str]] = []
    for wl in workloads:
        entry = summary[wl.name]
        for i, metric in enumerate(wl.metrics):
            row = [wl.name if i == 0 else "", metric.label]
            for name in servers:
                stats = entry["servers"].get(name, {}).get(metric.key)
                if stats is None:
                    row.append("-")
                    continue
                cell = fmt_value(metric, stats["median"])
                if stats["n"] > 1:
                    lo, hi = fmt_value(metric, stats["min"]), fmt_value(metric, stats["max"])
                    cell += f" [{lo}-{hi}]"
                if stats["n"] < reps:
                    cell += f" (n={stats['n']})"
                row.append(cell)
            r = entry["ratios"].get(metric.key)
            if r is None:
                row += ["n/a", "-"]
            else:
                row += ["n/a" if r["ratio"] is None else f"{r['ratio']:.2f}", r["best_peer"]]
            for wanted, key in ((with_base, "vs_base"), (with_ceiling, "of_librbd")):
                if wanted:
                    vs = r.get(key) if r is not None else None
                    row.append("n/a" if vs is None else f"{vs:.2f}")
            rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    noise = f"median [min-max] of {reps} reps" if reps > 1 else "one run each, no spread"
    lines.append("")
    lines.append(f"cells: {noise}; MB/s = 10^6 bytes/s; latency = fio's total latency (submit + completion,")
    lines.append("the ↳ rows: its two parts).")
    lines.append(
        "bv/best: blockvirt / best peer for IOPS and MB/s, best peer / blockvirt for "
        "latency; > 1 means blockvirt is better."
    )
    if with_base:
        lines.append(f"bv/base: this tree against {BASELINE} (--baseline), the same way round.")
    if with_ceiling:
        lines.append(
            f"bv/{LIBRBD}: blockvirt against fio's own rbd engine with no server (the ceiling), "
            "the same way round."
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Interleaved fio (--ioengine=nbd) benchmark of blockvirt against "
        "nbdkit, nbd-server and qemu-nbd on 127.0.0.1.",
    )
    p.add_argument(
        "--servers",
        type=csv_list,
        default=list(ALL_SERVERS),
        help=f"comma list, default {','.join(ALL_SERVERS)}",
    )
    p.add_argument(
        "--workloads",
        type=csv_list,
        default=list(WORKLOADS),
        help=f"comma list, default {','.join(WORKLOADS)}",
    )
    p.add_argument(
        "--blockvirt-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `blockvirt serve` (repeatable), e.g. --blockvirt-arg=--log-level=debug",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help=f"also run blockvirt from this source tree as {BASELINE!r} (e.g. a `git worktree` of "
        "an older commit), interleaved with the rest",
    )
    p.add_argument(
        "--rbd",
        action="store_true",
        help="every disk on a throwaway one-node Ceph (tests/cephcluster.py): blockvirt on an RBD "
        "pool against qemu-nbd's rbd driver, and fio's own rbd engine with no server as the ceiling "
        f"('{LIBRBD}'; servers default to blockvirt,qemu-nbd,{LIBRBD}; size to 256M)",
    )
    p.add_argument(
        "--baseline-arg",
        action="append",
        default=None,
        metavar="ARG",
        help="`serve` argument for the baseline instead of the --blockvirt-arg ones (repeatable): "
        "with --baseline pointing at this very tree, compares two settings side by side",
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--runtime", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument(
        "--ramp-time",
        type=float,
        default=1.0,
        help="fio ramp_time seconds, not measured (default 1)",
    )
    p.add_argument(
        "--size",
        type=parse_size,
        default=1 << 30,
        help="disk size per server, e.g. 1G, 256M (default 1G)",
    )
    p.add_argument(
        "--thick",
        action="store_true",
        help="blockvirt serves a thick volume (default: thin, as created by default; the fill "
        "allocates every block either way)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs blockvirt (default: this one)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=30.0,
        help="seconds a server may take to start (default 30)",
    )
    p.add_argument(
        "--fill-timeout",
        type=float,
        default=600.0,
        help="seconds the initial fill of one disk may take (default 600)",
    )
    p.add_argument("--log-dir", type=Path, help="keep server logs here (default: temp dir, removed at exit)")
    p.add_argument(
        "--no-sync",
        action="store_true",
        help="do not sync(2) before each run (sync keeps earlier writes' writeback out of the next run)",
    )
    args = p.parse_args(argv)
    if args.rbd:
        argv_list = list(argv or sys.argv[1:])
        if not any(a.startswith("--servers") for a in argv_list):
            args.servers = ["blockvirt", "qemu-nbd", LIBRBD]
        if not any(a.startswith("--size") for a in argv_list):
            args.size = 256 << 20
        bad_rbd = [s for s in args.servers if s not in ("blockvirt", "qemu-nbd", LIBRBD, BASELINE)]
        if bad_rbd:
            p.error(f"--rbd runs blockvirt, qemu-nbd and {LIBRBD} only, not {bad_rbd}")
    elif LIBRBD in args.servers:
        p.error(f"{LIBRBD} (fio's own rbd engine) needs --rbd")
    bad = [s for s in args.servers if s not in (*ALL_SERVERS, LIBRBD)]
    if bad or not args.servers:
        p.error(f"unknown servers {bad}; choose from {','.join(ALL_SERVERS)}")
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad or not args.workloads:
        p.error(f"unknown workloads {bad}; choose from {','.join(WORKLOADS)}")
    if args.reps < 1 or args.runtime <= 0 or args.ramp_time < 0:
        p.error("--reps must be >= 1, --runtime > 0, --ramp-time >= 0")
    pinned = [w for w in args.workloads if WORKLOADS[w].pin is not None]
    if pinned and shutil.which("taskset") is None:
        p.error(f"pinned workloads {pinned} need taskset (util-linux)")
    if any(WORKLOADS[w].pin == PIN_CROSS for w in args.workloads) and len(os.sched_getaffinity(0)) < 2:
        p.error(f"{PIN_CROSS} workloads need two CPUs")
    if args.baseline is not None:
        if not (args.baseline / "blockvirt" / "__main__.py").exists():
            p.error(f"--baseline {args.baseline}: not a blockvirt source tree")
        args.baseline = args.baseline.resolve()
        args.servers.append(BASELINE)
    args.servers = list(dict.fromkeys(args.servers))
    args.workloads = list(dict.fromkeys(args.workloads))
    return args


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def start_all(servers: list[Server], opts: Options) -> None:
    """Start every server; a failure is recorded on the server, never raised."""
    for server in servers:
        binary = REQUIRED_BINARIES.get(server.name)
        if binary and shutil.which(binary) is None:
            server.error = f"{binary} not found on PATH"
            log(f"[{server.name}] skipped: {server.error}")
            continue
        log(f"[{server.name}] starting")
        try:
            STARTERS[server.name](server, opts)
            probe_size(server, opts.size, opts.start_timeout)
        except (ServerError, OSError) as exc:
            server.error = f"failed to start: {exc}{exit_status(server)}"
            log(f"[{server.name}] {server.error}")
            if server.log_path and (t := tail(server.log_path)):
                log("    " + t.replace("\n", "\n    "))
            server.stop()
            continue
        log(f"[{server.name}] up at {server.uri}")


def fill_all(servers: list[Server], args: argparse.Namespace, workdir: Path) -> None:
    """Write every disk once through its server so all serve allocated, cached data."""
    for s in servers:
        if s.error:
            continue
        log(f"[{s.name}] filling {size_arg(args.size)} (fio sequential write, bs=1M, qd8)")
        if not args.no_sync:
            os.sync()
        try:
            s.fill = fill(s, args.size, args.fill_timeout, workdir)
        except FioError as exc:
            s.error = f"fill failed: {exc}"
            log(f"[{s.name}] {s.error}")
            s.stop()
            continue
        mbps = s.fill["bw_bytes"] / 1e6
        log(f"[{s.name}] filled in {s.fill['seconds']:.1f}s ({mbps:.0f} MB/s)")


def measure(
    servers: list[Server], workloads: list[Workload], args: argparse.Namespace, workdir: Path
) -> list[dict[str, Any]]:
    """Interleave: per rep, per workload, each server in turn; rotate the order per rep."""
    runs: list[dict[str, Any]] = []
    active = [s for s in servers if not s.error]
    timeout = args.runtime + args.ramp_time + FIO_SLACK_S
    for rep in range(args.reps):
        k = rep % len(active) if active else 0
        order = active[k:] + active[:k]
        for wl in workloads:
            for pos, s in enumerate(order):
                if s.error:  # died earlier
                    continue
                runs.append(one_run(s, wl, rep, pos, args=args, timeout=timeout, workdir=workdir))
    return runs


def one_run(
    s: Server,
    wl: Workload,
    rep: int,
    pos: int,
    *,
    args: argparse.Namespace,
    timeout: float,
    workdir: Path,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "rep": rep,
        "workload": wl.name,
        "server": s.name,
        "position": pos,
        "ok": False,
        "error": None,
        "metrics": None,
    }
    params = {
        "rw": wl.rw,
        "bs": wl.bs,
        "iodepth": str(wl.iodepth),
        "size": str(args.size),
        "time_based": "1",
        "runtime": f"{args.runtime:g}",
        "ramp_time": f"{args.ramp_time:g}",
    }
    if wl.pin is None:
        pin_server(s, all_cpus())
    else:
        pin_server(s, str(SERVER_CPU))
        params["cpus_allowed"] = str(SERVER_CPU if wl.pin == PIN_SAME else CROSS_CPU)
    if not args.no_sync:
        os.sync()
    prefix = f"rep {rep + 1}/{args.reps} {wl.name:<24} {s.name:<14}"
    try:
        with CpuWindow(s.pgids, args.ramp_time, args.runtime) as cpu:
            job = run_fio(s, wl.name, params, timeout, workdir)
        metrics = job_metrics(job, wl.direction)
        if s.pgids:  # LIBRBD has no server process: its librbd runs inside fio
            metrics["cpu_us_per_op"] = cpu.seconds() * 1e6 / max(metrics["ios"], 1.0)
    except (FioError, KeyError, TypeError, ValueError) as exc:
        record["error"] = str(exc)
        log(f"{prefix} FAILED: {exc}")
        if not s.alive():
            s.error = f"server died during {wl.name} rep {rep + 1}{exit_status(s)}"
            log(f"[{s.name}] {s.error}; dropping it from further runs")
            if s.log_path and (t := tail(s.log_path)):
                log("    " + t.replace("\n", "\n    "))
            s.stop()
        return record
    record["ok"] = True
    record["metrics"] = metrics
    shown = "  ".join(f"{m.label}={fmt_value(m, metrics[m.key])}" for m in wl.metrics if m.key in metrics)
    log(f"{prefix} {shown}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("fio") is None:
        log("fio not found on PATH")
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    workloads = [WORKLOADS[w] for w in args.workloads]
    servers = [Server(name) for name in args.servers]
    t_start = time.time()

    with tempfile.TemporaryDirectory(prefix="blockvirt-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        logdir = args.log_dir or workdir / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        ceph: tuple[str, str] | None = None
        if args.rbd:
            cluster = _ceph_cluster(workdir, args.size * (len(servers) + 1))
            stack.callback(cluster.stop)
            cluster.start()
            cluster.create_pool("bench")
            if args.baseline:
                cluster.create_pool("bench-base")
            ceph = (str(cluster.conf_path), "bench")
            log(f"[ceph] up in {cluster.timings['start']:.1f}s ({cluster.conf_path})")
        opts = Options(
            args.size,
            workdir,
            logdir,
            args.python,
            args.start_timeout,
            tuple(args.blockvirt_arg),
            args.baseline,
            ceph,
            args.thick,
            None if args.baseline_arg is None else tuple(args.baseline_arg),
        )
        try:
            start_all(servers, opts)
            fill_all(servers, args, workdir)
            runs = measure(servers, workloads, args, workdir)
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        finally:
            for server in servers:
                server.stop()

    summary = summarize(runs, args.servers, workloads)
    print(render_table(summary, args.servers, workloads, args.reps))
    for s in servers:
        if s.error:
            print(f"{s.name}: {s.error}")
    failed_runs = sum(1 for r in runs if not r["ok"])
    if failed_runs:
        print(f"{failed_runs} run(s) failed; see the log above or the JSON 'runs' list.")

    if args.json:
        result = {
            "config": {
                "servers": args.servers,
                "workloads": {
                    w.name: {"rw": w.rw, "bs": w.bs, "iodepth": w.iodepth, "pin": w.pin} for w in workloads
                },
                "pinning": {
                    PIN_SAME: f"server and fio on CPU {SERVER_CPU}",
                    PIN_CROSS: f"server on CPU {SERVER_CPU}, fio on CPU {CROSS_CPU}",
                },
                "blockvirt_volume": "thick" if args.thick else "thin",
                "reps": args.reps,
                "runtime_s": args.runtime,
                "ramp_time_s": args.ramp_time,
                "size_bytes": args.size,
                "sync_before_run": not args.no_sync,
                "order": "per rep, per workload, each server in turn; order rotated per rep",
            },
            "environment": environment(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start)),
            "duration_s": round(time.time() - t_start, 1),
            "servers": {
                s.name: {"ok": s.error is None, "error": s.error, "uri": s.uri, "fill": s.fill}
                for s in servers
            },
            "runs": runs,
            "summary": summary,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if failed_runs or any(s.error for s in servers) else 0


def _ceph_cluster(workdir: Path, data_bytes: int) -> Any:
    """tests/cephcluster.py's throwaway Ceph (stdlib only), loaded by path."""
    path = REPO_ROOT / "tests" / "cephcluster.py"
    spec = importlib.util.spec_from_file_location("blockvirt_bench_ceph", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CephCluster(parent_dir=workdir, osd_bytes=max(4 << 30, 2 * data_bytes))


def environment() -> dict[str, Any]:
    git = tool_version(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "blockvirt_git": git,
        "fio": tool_version(["fio", "--version"]),
        "nbdkit": tool_version(["nbdkit", "--version"]),
        "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
        "nbd-server": tool_version(["nbd-server", "-V"]),
    }


if __name__ == "__main__":
    sys.exit(main())
