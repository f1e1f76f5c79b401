#!/usr/bin/env python3
"""Copy-on-write benchmarks for blockvirt: chain depth, snapshot latency, allocating writes.

1. ``chain``: 4k random read IOPS (fio ``--ioengine=nbd``, QD16 and QD1) on volumes whose data
   is spread over chains of 1, 8, 32, 64 layers, side by side with qemu-nbd serving a qcow2
   backing chain of the same shape; the ratio depth-N / depth-1 for each server.
2. ``snap``: latency of ``POST /api/v1/volumes/NAME/snapshots`` (client side, and the server's
   own "seconds") while fio randwrite runs against the volume, on a small and a huge thin volume.
3. ``alloc``: fio 4k randwrite IOPS on a fresh thin volume (every write allocates), the same in
   a pool without allocation units (``alloc_unit`` 0), on a thick volume (writes in place), and
   on nbdkit's file plugin over a sparse raw file.
4. ``fua``: 4k sequential write IOPS at QD16 with FUA on every write (``qemu-img bench -t
   writethrough``; fio's nbd engine cannot set FUA) and without (``-t writeback``), on a thick
   blockvirt volume, nbdkit's file plugin and qemu-nbd over preallocated raw files.

Every measurement is interleaved (per repetition, each variant in turn, order rotated). Stdlib
only; the server helpers come from ``run.py`` beside this file. ``python tools/bench/chain.py -h``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
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
HOST: str = _run.HOST
REPO_ROOT: Path = _run.REPO_ROOT
Server = _run.Server
ServerError = _run.ServerError
FioError = _run.FioError
log = _run.log
parse_size = _run.parse_size
size_arg = _run.size_arg
free_port = _run.free_port
port_open = _run.port_open
wait_for = _run.wait_for
tail = _run.tail
spawn = _run.spawn
run_fio = _run.run_fio
job_metrics = _run.job_metrics
tool_version = _run.tool_version
csv_list = _run.csv_list

PARTS = ("chain", "snap", "alloc", "fua")
FIO_SLACK_S = 60.0
MAX_RUN = 4 << 20  # longest single qemu-io write when laying out a chain


# --------------------------------------------------------------------------- small helpers


def fmt_iops(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): an actual sample, no interpolation."""
    s = sorted(samples)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(out)


def checked(argv: Sequence[str | Path], *, timeout: float, stdin: str | None = None) -> str:
    """Run a helper command; raise ServerError with its output if it fails."""
    args = [str(a) for a in argv]
    try:
        cp = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ServerError(f"timed out after {timeout:.0f}s: {' '.join(args[:4])} ...") from None
    if cp.returncode != 0 or "failed" in cp.stdout:
        msg = (cp.stderr + cp.stdout).strip()[-500:]
        raise ServerError(f"{' '.join(args[:4])} ... failed (status {cp.returncode}): {msg}")
    return cp.stdout


class Api:
    """The blockvirt management API over urllib: JSON in, JSON out, errors raised."""

    def __init__(self, base: str) -> None:
        self.base = base

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 120) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"{method} {path}: HTTP {e.code}: {e.read()[:300]!r}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"{method} {path}: {e}") from None
        return json.loads(raw) if raw else None

    def create(self, name: str, size: int, *, thick: bool = False, pool: str | None = None) -> None:
        body: dict[str, Any] = {"name": name, "size": size, "thick": thick}
        if pool is not None:
            body["pool"] = pool
        self.call("POST", "/api/v1/volumes", body)

    def delete(self, name: str, timeout: float = 30.0) -> None:
        """Delete once the server has seen its clients go (a client's exit is noticed
        asynchronously, and a volume with connected clients cannot be deleted)."""
        deadline = time.monotonic() + timeout
        while self.info(name)["connections"] and time.monotonic() < deadline:
            time.sleep(0.05)
        self.call("DELETE", f"/api/v1/volumes/{name}")

    def info(self, name: str) -> dict[str, Any]:
        info: dict[str, Any] = self.call("GET", f"/api/v1/volumes/{name}")
        return info

    def snapshot(self, name: str, snap: str) -> dict[str, Any]:
        out: dict[str, Any] = self.call("POST", f"/api/v1/volumes/{name}/snapshots", {"name": snap})
        return out


@dataclass
class Ctx:
    args: argparse.Namespace
    workdir: Path
    logdir: Path
    servers: list[Any] = field(default_factory=list)  # every Server started, stopped at exit
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def opts(self) -> Any:
        return _run.Options(
            size=self.args.size,
            workdir=self.workdir,
            logdir=self.logdir,
            python=self.args.python,
            start_timeout=self.args.start_timeout,
        )

    def fio_timeout(self) -> float:
        return float(self.args.runtime + self.args.ramp_time + FIO_SLACK_S)

    def sync(self) -> None:
        if not self.args.no_sync:
            os.sync()

    def cleanup(self) -> None:
        for proc in self.background:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.background.clear()
        for s in self.servers:
            s.stop()


# --------------------------------------------------------------------------- servers


def start_blockvirt(ctx: Ctx, root: Path = REPO_ROOT, label: str = "blockvirt") -> tuple[Any, Api]:
    """A blockvirt server from the tree at `root` (this one, or --baseline)."""
    server = Server(label)
    ctx.servers.append(server)
    nbd_port, api_port = free_port(), free_port()
    while api_port == nbd_port:
        api_port = free_port()
    data_dir = ctx.workdir / f"{label}-data"
    data_dir.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    argv = [ctx.args.python, "-m", "blockvirt", "serve", "--data-dir", str(data_dir)]
    argv += ["--nbd", f"{HOST}:{nbd_port}", "--api", f"{HOST}:{api_port}", *ctx.args.blockvirt_arg]
    spawn(server, argv, ctx.opts, cwd=root, env=env)
    timeout = ctx.args.start_timeout
    wait_for(f"blockvirt API port {api_port}", lambda: port_open(api_port), server.alive, timeout)
    wait_for(f"blockvirt NBD port {nbd_port}", lambda: port_open(nbd_port), server.alive, timeout)
    api = Api(f"http://{HOST}:{api_port}")

    def healthy() -> bool:
        try:
            api.call("GET", "/api/v1/health", timeout=5)
            return True
        except ServerError:
            return False

    wait_for("blockvirt API health", healthy, server.alive, timeout)
    server.uri = f"nbd://{HOST}:{nbd_port}/"
    return server, api


def start_qemu_nbd(ctx: Ctx, name: str, image: Path, fmt: str) -> Any:
    server = Server(name)
    ctx.servers.append(server)
    port = free_port()
    argv = ["qemu-nbd", "-f", fmt, "-x", "bench", "-b", HOST, "-p", str(port)]
    spawn(server, [*argv, "-t", "-e", "16", "--cache=writeback", str(image)], ctx.opts)
    server.uri = f"nbd://{HOST}:{port}/bench"
    wait_for(f"qemu-nbd port {port}", lambda: port_open(port), server.alive, ctx.args.start_timeout)
    return server


def start_nbdkit_file(ctx: Ctx, name: str, image: Path) -> Any:
    server = Server(name)
    ctx.servers.append(server)
    port = free_port()
    argv = ["nbdkit", "-f", "--exit-with-parent", "-i", HOST, "-p", str(port), "file", f"file={image}"]
    spawn(server, argv, ctx.opts)
    server.uri = f"nbd://{HOST}:{port}/bench"
    wait_for(f"nbdkit port {port}", lambda: port_open(port), server.alive, ctx.args.start_timeout)
    return server


def stop_server(ctx: Ctx, server: Any) -> None:
    server.stop()
    with contextlib.suppress(ValueError):
        ctx.servers.remove(server)


def fio_iops(
    ctx: Ctx, uri: str, name: str, rw: str, iodepth: int, size: int, *, time_based: bool = True
) -> float:
    """One fio run; without time_based it ends after one pass over `size` or at --runtime."""
    params = {
        "rw": rw,
        "bs": "4k",
        "iodepth": str(iodepth),
        "size": str(size),
        "runtime": f"{ctx.args.runtime:g}",
        "ramp_time": f"{ctx.args.ramp_time:g}",
    }
    if time_based:
        params["time_based"] = "1"
    job = run_fio(uri, name, params, ctx.fio_timeout(), ctx.workdir)
    direction = "write" if "write" in rw else "read"
    return float(job_metrics(job, direction)["iops"])


# --------------------------------------------------------------------------- 1: chain depth


def chain_layout(size: int, chunk: int, depth: int, seed: int) -> list[list[tuple[int, int]]]:
    """Give each `chunk`-sized piece of the disk to one of `depth` layers (a shuffled, even
    share each: 1/depth of the chunks), then coalesce neighbours into runs per layer."""
    n = size // chunk
    owners = [i % depth for i in range(n)]
    random.Random(seed).shuffle(owners)
    runs: list[list[tuple[int, int]]] = [[] for _ in range(depth)]
    for i, layer in enumerate(owners):
        off = i * chunk
        lst = runs[layer]
        if lst and lst[-1][0] + lst[-1][1] == off and lst[-1][1] + chunk <= MAX_RUN:
            lst[-1] = (lst[-1][0], lst[-1][1] + chunk)
        else:
            lst.append((off, chunk))
    return runs


def qemu_io_script(runs: list[tuple[int, int]], layer: int) -> str:
    pattern = (layer * 37 + 1) % 255 + 1  # never 0: a zero pattern could be stored as a hole
    return "".join(f"write -q -P {pattern} {off} {length}\n" for off, length in runs)


def write_layer(target: str, fmt: str, runs: list[tuple[int, int]], layer: int) -> None:
    # Commands on stdin (one qemu-io process per layer); a failed write makes qemu-io exit 1.
    checked(["qemu-io", "-f", fmt, target], timeout=600, stdin=qemu_io_script(runs, layer))


@dataclass
class ChainTarget:
    server: str  # "blockvirt" | "qemu-nbd"
    depth: int
    uri: str
    build_s: float


def build_blockvirt_chain(ctx: Ctx, bv: Any, api: Api, depth: int) -> ChainTarget:
    t0 = time.monotonic()
    name = f"chain{depth}"
    api.create(name, ctx.args.size)
    uri = bv.uri + name
    for layer, runs in enumerate(chain_layout(ctx.args.size, ctx.args.chunk, depth, seed=depth)):
        write_layer(uri, "raw", runs, layer)
        if layer < depth - 1:
            api.snapshot(name, f"l{layer}")
    got = api.info(name)["chain_depth"]
    if got != depth:
        raise ServerError(f"volume {name} has chain depth {got}, expected {depth}")
    return ChainTarget("blockvirt", depth, uri, time.monotonic() - t0)


def build_qcow2_chain(ctx: Ctx, depth: int) -> ChainTarget:
    t0 = time.monotonic()
    size = str(ctx.args.size)
    opts = f"cluster_size={ctx.args.qcow2_cluster}"
    top: Path | None = None
    for layer, runs in enumerate(chain_layout(ctx.args.size, ctx.args.chunk, depth, seed=depth)):
        img = ctx.workdir / f"qcow2-d{depth}-{layer}.qcow2"
        argv: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
        if top is not None:
            argv += ["-b", top.name, "-F", "qcow2"]  # relative: the chain lives in one dir
        checked([*argv, img, size], timeout=60)
        write_layer(str(img), "qcow2", runs, layer)
        top = img
    assert top is not None
    server = start_qemu_nbd(ctx, f"qemu-nbd-d{depth}", top, "qcow2")
    return ChainTarget("qemu-nbd", depth, server.uri, time.monotonic() - t0)


def part_chain(ctx: Ctx, bv: Any, api: Api, results: dict[str, Any]) -> list[str]:
    args = ctx.args
    errors: list[str] = []
    with_qemu = shutil.which("qemu-nbd") is not None and shutil.which("qemu-img") is not None
    if not with_qemu:
        errors.append("chain: qemu-nbd/qemu-img not found; blockvirt only")
    targets: dict[tuple[str, int], ChainTarget] = {}
    for depth in args.depths:
        log(f"[chain] depth {depth}: laying out {size_arg(args.size)} in {depth} layer(s)")
        for server in ("blockvirt", "qemu-nbd") if with_qemu else ("blockvirt",):
            try:
                if server == "blockvirt":
                    built = build_blockvirt_chain(ctx, bv, api, depth)
                else:
                    built = build_qcow2_chain(ctx, depth)
            except (ServerError, OSError) as exc:
                errors.append(f"chain: {server} depth {depth}: {exc}")
                log(f"[chain] {server} depth {depth} FAILED: {exc}")
                continue
            targets[(server, depth)] = built
            log(f"[chain] {server} depth {depth} built in {built.build_s:.1f}s")

    servers = ["blockvirt", "qemu-nbd"] if with_qemu else ["blockvirt"]
    samples: dict[tuple[str, int, int], list[float]] = {}
    for rep in range(args.reps):
        k = rep % len(servers)
        order = servers[k:] + servers[:k]
        for depth in args.depths:
            for qd in args.qds:
                for server in order:
                    t = targets.get((server, depth))
                    if t is None:
                        continue
                    ctx.sync()
                    try:
                        iops = fio_iops(ctx, t.uri, f"chain-d{depth}", "randread", qd, args.size)
                    except FioError as exc:
                        errors.append(f"chain: {server} depth {depth} qd{qd} rep {rep + 1}: {exc}")
                        log(f"[chain] rep {rep + 1} {server} depth {depth} qd{qd} FAILED: {exc}")
                        continue
                    samples.setdefault((server, depth, qd), []).append(iops)
                    log(
                        f"[chain] rep {rep + 1}/{args.reps} depth {depth:>3} qd{qd:<2} {server:<9} "
                        f"{fmt_iops(iops)} IOPS"
                    )

    summary: dict[str, Any] = {}
    rows: list[list[str]] = []
    for qd in args.qds:
        for depth in args.depths:
            row = [f"qd{qd}", str(depth)]
            for server in servers:
                med = median_or_none(samples.get((server, depth, qd), []))
                base = median_or_none(samples.get((server, args.depths[0], qd), []))
                ratio = med / base if med and base else None
                spread = samples.get((server, depth, qd), [])
                cell = fmt_iops(med)
                if len(spread) > 1:
                    cell += f" [{fmt_iops(min(spread))}-{fmt_iops(max(spread))}]"
                row += [cell, fmt_ratio(ratio)]
                summary.setdefault(server, {}).setdefault(f"qd{qd}", {})[str(depth)] = {
                    "median_iops": med,
                    "samples": spread,
                    "ratio_to_first_depth": ratio,
                }
            rows.append(row)
    header = ["qd", "depth"]
    first = args.depths[0]
    for server in servers:
        label = "qemu-nbd/qcow2" if server == "qemu-nbd" else server
        header += [f"{label} IOPS", f"/d{first}"]
    results["chain"] = {
        "summary": summary,
        "build_seconds": {f"{t.server}-d{t.depth}": round(t.build_s, 2) for t in targets.values()},
    }
    print(
        f"\n== 1. 4k random read IOPS by chain depth ({size_arg(args.size)}, "
        f"{size_arg(args.chunk)} chunks spread evenly over the layers) =="
    )
    print(table(header, rows))
    print(
        f"/d{first}: median IOPS at this depth / at depth {first}, per server "
        "(target for blockvirt: >= 0.9 at depth 32)."
    )
    return errors


# --------------------------------------------------------------------------- 2: snapshot latency


def snapshot_series(ctx: Ctx, bv: Any, api: Api, name: str, size: int) -> dict[str, Any]:
    """Create a thin volume, start fio randwrite on it, take N snapshots (timed), stop fio."""
    args = ctx.args
    api.create(name, size)
    out = ctx.workdir / f"fio-{name}.json"
    argv = [
        "fio", f"--name={name}", "--ioengine=nbd", f"--uri={bv.uri + name}", "--rw=randwrite",
        "--bs=4k", "--iodepth=16", f"--size={size}", "--time_based=1",
        "--runtime=3600", "--output-format=json", f"--output={out}",
    ]  # fmt: skip
    fio_log = ctx.logdir / f"fio-{name}.log"
    with open(fio_log, "wb") as logf:
        fio = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=logf, start_new_session=True)
    ctx.background.append(fio)
    client: list[float] = []
    server: list[float] = []
    try:
        deadline = time.monotonic() + 30
        while api.info(name)["connections"] < 1:  # fio is connected and writing
            if fio.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"fio did not connect to {name}: {tail(fio_log, 5)}")
            time.sleep(0.05)
        time.sleep(args.snap_warmup)
        for i in range(args.snapshots):
            t0 = time.perf_counter()
            resp = api.snapshot(name, f"s{i}")
            client.append(time.perf_counter() - t0)
            server.append(float(resp["seconds"]))
            time.sleep(args.snap_interval)
        if fio.poll() is not None:
            raise ServerError(f"fio ended early (status {fio.returncode}) on {name}: {tail(fio_log, 5)}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(fio.pid, signal.SIGINT)  # fio stops and writes its report
        try:
            fio.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(fio.pid, signal.SIGKILL)
            fio.wait()
        ctx.background.remove(fio)
    write_iops = max_lat = None
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        text = out.read_text()  # after SIGINT fio puts "fio: terminating on signal 2" first
        wr = json.loads(text[text.index("{") :])["jobs"][0]["write"]
        write_iops = float(wr["iops"])
        max_lat = float(wr["clat_ns"]["max"]) / 1e9  # the longest a write waited (a drain)
    depth = api.info(name)["chain_depth"]
    api.delete(name)
    return {
        "client_s": client,
        "server_s": server,
        "fio_write_iops": write_iops,
        "fio_max_write_s": max_lat,
        "chain_depth": depth,
    }


def part_snap(ctx: Ctx, bv: Any, api: Api, results: dict[str, Any]) -> list[str]:
    args = ctx.args
    errors: list[str] = []
    sizes = [("small", args.snap_small), ("big", args.snap_big)]
    pooled: dict[str, dict[str, list[float]]] = {k: {"client": [], "server": []} for k, _ in sizes}
    fio_iops_seen: dict[str, list[float]] = {k: [] for k, _ in sizes}
    fio_max_seen: dict[str, list[float]] = {k: [] for k, _ in sizes}
    for rep in range(args.reps):
        k = rep % len(sizes)
        for label, size in sizes[k:] + sizes[:k]:
            name = f"snap-{label}-{rep}"
            ctx.sync()
            try:
                r = snapshot_series(ctx, bv, api, name, size)
            except (ServerError, OSError) as exc:
                errors.append(f"snap: {label} rep {rep + 1}: {exc}")
                log(f"[snap] rep {rep + 1} {size_arg(size)} FAILED: {exc}")
                continue
            pooled[label]["client"] += r["client_s"]
            pooled[label]["server"] += r["server_s"]
            if r["fio_write_iops"] is not None:
                fio_iops_seen[label].append(r["fio_write_iops"])
            if r["fio_max_write_s"] is not None:
                fio_max_seen[label].append(r["fio_max_write_s"])
            c = r["client_s"]
            log(
                f"[snap] rep {rep + 1}/{args.reps} {size_arg(size):>5}: {len(c)} snapshots, "
                f"p50 {percentile(c, 50) * 1e3:.1f} ms, p99 {percentile(c, 99) * 1e3:.1f} ms, "
                f"fio {fmt_iops(r['fio_write_iops'])} write IOPS meanwhile, depth {r['chain_depth']}"
            )
    summary: dict[str, Any] = {}
    rows: list[list[str]] = []
    for label, size in sizes:
        c, s = pooled[label]["client"], pooled[label]["server"]
        if not c:
            rows.append([size_arg(size), "0", "-", "-", "-", "-", "-", "-", "-"])
            continue
        summary[label] = {
            "size": size,
            "n": len(c),
            "client_p50_ms": percentile(c, 50) * 1e3,
            "client_p99_ms": percentile(c, 99) * 1e3,
            "client_max_ms": max(c) * 1e3,
            "server_p50_ms": percentile(s, 50) * 1e3,
            "server_p99_ms": percentile(s, 99) * 1e3,
            "fio_write_iops": median_or_none(fio_iops_seen[label]),
            "fio_max_write_ms": max(fio_max_seen[label]) * 1e3 if fio_max_seen[label] else None,
        }
        m = summary[label]
        rows.append([
            size_arg(size), str(len(c)), f"{m['client_p50_ms']:.1f}", f"{m['client_p99_ms']:.1f}",
            f"{m['client_max_ms']:.1f}", f"{m['server_p50_ms']:.1f}", f"{m['server_p99_ms']:.1f}",
            fmt_iops(m["fio_write_iops"]),
            "-" if m["fio_max_write_ms"] is None else f"{m['fio_max_write_ms']:.0f}",
        ])  # fmt: skip
    header = ["volume", "n", "p50 ms", "p99 ms", "max ms", "srv p50", "srv p99", "fio wr IOPS", "fio max ms"]
    print(
        f"\n== 2. snapshot create latency under fio randwrite 4k qd16 "
        f"({args.snapshots} snapshots per volume per rep, {args.snap_interval * 1e3:.0f} ms apart) =="
    )
    print(table(header, rows))
    if "small" in summary and "big" in summary:
        p99 = summary["big"]["client_p99_ms"] / summary["small"]["client_p99_ms"]
        p50 = summary["big"]["client_p50_ms"] / summary["small"]["client_p50_ms"]
        summary["big_over_small"] = {"p50": p50, "p99": p99}
        print(f"big/small: p50 {p50:.2f}, p99 {p99:.2f} (target: p99 <= 20 ms, within 10% of each other)")
    print(
        "p50/p99/max: client-side time of POST .../snapshots; srv: the server's own 'seconds'; "
        "fio max: the longest write completion meanwhile (writes wait while a snapshot drains)."
    )
    results["snap"] = {"summary": summary, "samples_s": pooled}
    return errors


# --------------------------------------------------------------------------- 3: allocating writes


def part_alloc(ctx: Ctx, bv: Any, api: Api, results: dict[str, Any]) -> list[str]:
    args = ctx.args
    errors: list[str] = []
    variants = ["blockvirt-thin", "blockvirt-thin4k", "blockvirt-thick"]
    # The default pool's thin volumes grow by allocation units; a pool without them shows
    # what the units buy (file-system blocks, ext4's delayed allocation per first write).
    api.call("POST", "/api/v1/pools", {"name": "units4k", "path": str(ctx.workdir / "units4k"),
                                       "settings": {"alloc_unit": 0}})  # fmt: skip
    if shutil.which("nbdkit") is not None:
        variants.append("nbdkit-file")
    else:
        errors.append("alloc: nbdkit not found")
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(args.reps):
        k = rep % len(variants)
        for variant in variants[k:] + variants[:k]:
            nbdkit = None
            name = f"alloc-{variant.rsplit('-', 1)[1]}-{rep}"
            image = ctx.workdir / f"{name}.raw"
            try:
                if variant == "nbdkit-file":
                    with open(image, "wb") as f:
                        f.truncate(args.size)
                    nbdkit = start_nbdkit_file(ctx, variant, image)
                    uri = nbdkit.uri
                else:
                    pool = "units4k" if variant.endswith("thin4k") else None
                    api.create(name, args.size, thick=variant.endswith("thick"), pool=pool)
                    uri = bv.uri + name
                ctx.sync()
                # One pass at most (fio's random map writes each block once): on the thin
                # volume and the sparse file every measured write allocates.
                iops = fio_iops(ctx, uri, name, "randwrite", 16, args.size, time_based=False)
                samples[variant].append(iops)
                log(f"[alloc] rep {rep + 1}/{args.reps} {variant:<15} {fmt_iops(iops)} IOPS")
            except (ServerError, FioError, OSError) as exc:
                errors.append(f"alloc: {variant} rep {rep + 1}: {exc}")
                log(f"[alloc] rep {rep + 1} {variant} FAILED: {exc}")
            finally:
                if nbdkit is not None:
                    stop_server(ctx, nbdkit)
                    image.unlink(missing_ok=True)
                elif variant != "nbdkit-file":
                    try:
                        api.delete(name)
                    except ServerError as exc:
                        errors.append(f"alloc: deleting {name}: {exc}")
    medians = {v: median_or_none(s) for v, s in samples.items()}
    summary = {v: {"median_iops": medians[v], "samples": s} for v, s in samples.items()}
    thick = medians.get("blockvirt-thick")
    rows = []
    for v in variants:
        med = medians[v]
        s = samples[v]
        cell = fmt_iops(med) + (f" [{fmt_iops(min(s))}-{fmt_iops(max(s))}]" if len(s) > 1 else "")
        rows.append([v, cell, fmt_ratio(med / thick if med and thick else None)])
    print(f"\n== 3. 4k randwrite qd16 IOPS, allocating vs in place ({size_arg(args.size)}) ==")
    print(table(["target", "IOPS", "/thick"], rows))
    print(
        "thin: a fresh thin volume (every write allocates; the pool's 1 MiB allocation units); "
        "thin4k: the same in a pool without units; thick: preallocated, written in place; "
        "nbdkit-file: nbdkit's file plugin on a fresh sparse raw file."
    )
    results["alloc"] = {"summary": summary}
    return errors


# --------------------------------------------------------------------------- 4: FUA writes


def bench_writes(ctx: Ctx, uri: str, count: int, *, fua: bool, depth: int = 16) -> float:
    """IOPS of `count` 4k writes at `depth` from offset 0 by qemu-img bench; with `fua`,
    qemu's writethrough cache mode sets FUA on every write."""
    argv = ["qemu-img", "bench", "-f", "raw", "-w", "-t", "writethrough" if fua else "writeback"]
    argv += ["-c", str(count), "-d", str(depth), "-s", "4k", "--pattern=165", uri]  # not zeros
    out = checked(argv, timeout=ctx.fio_timeout() + count / 500)
    for line in out.splitlines():
        if line.startswith("Run completed in "):
            return count / float(line.split()[3])
    raise ServerError(f"qemu-img bench printed no timing: {out[-300:]}")


def part_fua(ctx: Ctx, bv: Any, api: Api, results: dict[str, Any]) -> list[str]:
    args = ctx.args
    errors: list[str] = []
    variants = ["blockvirt-thick", "nbdkit-file", "qemu-nbd-raw"]
    before: tuple[Any, Api] | None = None
    if args.baseline is not None:
        before = start_blockvirt(ctx, args.baseline, "before")
        variants.append("before-thick")
    modes = ("fua", "plain", "fua-qd1")
    count = min(args.fua_count, args.size // 4096)
    samples: dict[tuple[str, str], list[float]] = {(v, m): [] for v in variants for m in modes}
    for rep in range(args.reps):
        k = rep % len(variants)
        for variant in variants[k:] + variants[:k]:
            server = None
            name = f"fua-{rep}"
            image = ctx.workdir / f"{name}.raw"
            try:
                if variant.endswith("-thick"):
                    srv, vapi = (bv, api) if variant == "blockvirt-thick" or before is None else before
                    vapi.create(name, args.size, thick=True)
                    uri = srv.uri + name
                else:
                    with open(image, "wb") as f:  # preallocated like the thick volume
                        os.posix_fallocate(f.fileno(), 0, args.size)
                    if variant == "nbdkit-file":
                        server = start_nbdkit_file(ctx, variant, image)
                    else:
                        server = start_qemu_nbd(ctx, variant, image, "raw")
                    uri = server.uri
                for mode in modes[rep % 2 :] + modes[: rep % 2]:
                    ctx.sync()
                    if mode == "fua-qd1":
                        iops = bench_writes(ctx, uri, count // 4, fua=True, depth=1)
                    else:
                        iops = bench_writes(ctx, uri, count, fua=mode == "fua")
                    samples[(variant, mode)].append(iops)
                    log(f"[fua] rep {rep + 1}/{args.reps} {variant:<15} {mode:<5} {fmt_iops(iops)} IOPS")
            except (ServerError, OSError) as exc:
                errors.append(f"fua: {variant} rep {rep + 1}: {exc}")
                log(f"[fua] rep {rep + 1} {variant} FAILED: {exc}")
            finally:
                if server is not None:
                    stop_server(ctx, server)
                    image.unlink(missing_ok=True)
                elif variant.endswith("-thick"):
                    try:
                        (api if variant == "blockvirt-thick" or before is None else before[1]).delete(name)
                    except ServerError as exc:
                        errors.append(f"fua: deleting {name}: {exc}")
    medians = {key: median_or_none(s) for key, s in samples.items()}
    if before is not None:
        stop_server(ctx, before[0])
    peers = [v for v in variants if not v.endswith("-thick")]
    best_fua = max((medians[(v, "fua")] or 0.0 for v in peers), default=0.0)
    best_qd1 = max((medians[(v, "fua-qd1")] or 0.0 for v in peers), default=0.0)
    rows = []
    summary: dict[str, Any] = {}
    for v in variants:
        fua, plain, qd1 = medians[(v, "fua")], medians[(v, "plain")], medians[(v, "fua-qd1")]
        summary[v] = {m: {"median_iops": medians[(v, m)], "samples": samples[(v, m)]} for m in modes}
        rows.append(
            [
                v,
                fmt_iops(fua),
                fmt_iops(plain),
                fmt_ratio(fua / plain if fua and plain else None),
                fmt_ratio(fua / best_fua if fua and best_fua else None),
                fmt_iops(qd1),
                fmt_ratio(qd1 / best_qd1 if qd1 and best_qd1 else None),
            ]
        )
    print(f"\n== 4. 4k sequential writes, IOPS, FUA on each or none (QD16 x{count}, QD1 x{count // 4}) ==")
    print(table(["target", "FUA", "plain", "FUA/plain", "FUA/best peer", "FUA QD1", "QD1/best peer"], rows))
    print("qemu-img bench -t writethrough (FUA) / -t writeback; preallocated volume and files.")
    results["fua"] = {"summary": summary, "count": count}
    return errors


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="blockvirt copy-on-write benchmarks: read IOPS by chain depth (vs qemu-nbd "
        "over qcow2), snapshot latency under load, allocating-write IOPS.",
    )
    p.add_argument("--parts", type=csv_list, default=list(PARTS), help=f"comma list of {','.join(PARTS)}")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--runtime", type=float, default=5.0, help="fio seconds per run (default 5)")
    p.add_argument("--ramp-time", type=float, default=1.0, help="fio ramp_time seconds (default 1)")
    p.add_argument("--size", type=parse_size, default=1 << 30, help="volume size for parts 1 and 3 (1G)")
    p.add_argument(
        "--depths",
        type=lambda t: [int(x) for x in csv_list(t)],
        default=[1, 8, 32, 64],
        help="chain depths, the first is the reference (default 1,8,32,64)",
    )
    p.add_argument(
        "--qds", type=lambda t: [int(x) for x in csv_list(t)], default=[16, 1], help="fio iodepths (16,1)"
    )
    p.add_argument("--chunk", type=parse_size, default=64 << 10, help="unit given to one layer (default 64K)")
    p.add_argument("--qcow2-cluster", default="64k", help="qcow2 cluster_size (default 64k)")
    p.add_argument("--snapshots", type=int, default=50, help="snapshots per volume per rep (default 50)")
    p.add_argument("--snap-interval", type=float, default=0.05, help="seconds between snapshots (0.05)")
    p.add_argument("--snap-warmup", type=float, default=1.0, help="fio seconds before the first snapshot")
    p.add_argument("--snap-small", type=parse_size, default=1 << 30, help="small thin volume (1G)")
    p.add_argument("--snap-big", type=parse_size, default=1 << 40, help="big thin volume (1T)")
    p.add_argument("--fua-count", type=int, default=40000, help="writes per part-4 run (40000)")
    p.add_argument("--baseline", type=Path, metavar="DIR", help="part 4 also runs blockvirt from this tree")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs blockvirt")
    p.add_argument("--blockvirt-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `blockvirt serve` (repeatable)")  # fmt: skip
    p.add_argument("--start-timeout", type=float, default=30.0, help="server start timeout (30 s)")
    p.add_argument("--log-dir", type=Path, help="keep server logs here (default: removed at exit)")
    p.add_argument("--no-sync", action="store_true", help="do not sync(2) before each run")
    args = p.parse_args(argv)
    bad = [x for x in args.parts if x not in PARTS]
    if bad or not args.parts:
        p.error(f"unknown parts {bad}; choose from {','.join(PARTS)}")
    if args.reps < 1 or args.runtime <= 0 or args.ramp_time < 0:
        p.error("--reps must be >= 1, --runtime > 0, --ramp-time >= 0")
    if not args.depths or any(d < 1 or d > 250 for d in args.depths):
        p.error("--depths must be 1..250 (blockvirt's chain limit)")
    if args.snapshots < 1 or args.snapshots > 240:
        p.error("--snapshots must be 1..240 (blockvirt's chain limit is 250 layers)")
    if args.chunk % 4096 or args.size % args.chunk:
        p.error("--chunk must be a multiple of 4K that divides --size")
    if not args.qds or any(q < 1 for q in args.qds):
        p.error("--qds must be positive")
    return args


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("fio", "qemu-io", "qemu-img"):
        if shutil.which(tool) is None:
            log(f"{tool} not found on PATH")
            return 2
    signal.signal(signal.SIGTERM, _sigterm)
    t_start = time.time()
    results: dict[str, Any] = {}
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="blockvirt-chain-bench-") as tmp:
        workdir = Path(tmp)
        logdir = args.log_dir or workdir / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        ctx = Ctx(args, workdir, logdir)
        try:
            bv, api = start_blockvirt(ctx)
            log(f"[blockvirt] up at {bv.uri}")
            parts = {"chain": part_chain, "snap": part_snap, "alloc": part_alloc, "fua": part_fua}
            for part in args.parts:
                errors += parts[part](ctx, bv, api, results)
                if not bv.alive():
                    errors.append(f"blockvirt died during {part}")
                    log(f"[blockvirt] died:\n{tail(bv.log_path) if bv.log_path else ''}")
                    break
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except (ServerError, OSError) as exc:
            errors.append(str(exc))
            log(f"FAILED: {exc}")
        finally:
            ctx.cleanup()
    for e in errors:
        print(f"error: {e}")
    if args.json:
        out = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": _run.environment(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start)),
            "duration_s": round(time.time() - t_start, 1),
            "results": results,
            "errors": errors,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        log(f"wrote {args.json}")
    log(f"done in {time.time() - t_start:.0f}s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
