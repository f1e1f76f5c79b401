#!/usr/bin/env python3
"""Where a blockvirt server's CPU time goes per request: py-spy samples under a fio load,
grouped into the parts of the data path.

One `blockvirt serve` (from `--root`, default this tree) with a thin volume of `--size`,
filled through the server; then fio (`--ioengine=nbd`, 4k, `--rw`, `--iodepth`) runs for
`--runtime` seconds while `py-spy record --format raw` samples the server. Samples of waiting
threads (the loop in epoll_wait, idle executor threads) are dropped. Each other sample's
innermost frame decides its part: syscalls if the sampled line calls into the kernel (send,
recv_into, preadv, pwrite; epoll_wait counts as waiting), else the innermost frame of ours (or of
asyncio, selectors, ...): loop, session, codec, dispatch, qos, stats, storage. The table gives
each part's share of the samples and, with fio's IOPS, its microseconds per request.

    python tools/bench/profile.py --rw randread --iodepth 16
    python tools/bench/profile.py --root /tmp/base --rw randwrite --iodepth 1 --serve-arg=--no-metrics

Needs py-spy (pip) and fio. Sampling perturbs little, but the figures are wall-clock: on a
loaded machine compare shares, not microseconds, and compare trees in the same conditions.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import linecache
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


def _load_run() -> ModuleType:
    path = Path(__file__).with_name("run.py")
    spec = importlib.util.spec_from_file_location("blockvirt_bench_run", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_run = _load_run()

#: A sampled line that calls one of these is in the kernel (py-spy shows the Python line).
SYSCALLS = re.compile(r"\.(send|sendmsg|recv_into|recv|preadv|pwrite|pwritev|pread|poll|sched_yield)\(")
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("qos", ("blockvirt/qos/",)),
    ("stats", ("storage/stats.py", "metrics/")),
    ("storage", ("blockvirt/storage/",)),
    ("dispatch", ("server/dispatch.py",)),
    ("codec", ("blockvirt/nbd/", "<string>")),
    ("session", ("server/session.py", "server/listener.py", "server/polling.py")),
    ("loop", ("asyncio/", "selectors.py", "uvloop", "threading.py", "concurrent/")),
]


#: Leaf frames where a thread waits (py-spy samples some waiting threads anyway): not counted.
WAITS = ("_worker (concurrent/futures/thread.py", "EpollSelector.select (selectors.py", "wait (threading.py")


_FRAME = re.compile(r"^(.*) \((.+):(\d+)\)$")


def source_line(frame: str, root: Path) -> str:
    """The source line a sampled frame was on (our files under `root`, others in stdlib)."""
    m = _FRAME.match(frame)
    if m is None:
        return ""
    path, line = m.group(2), int(m.group(3))
    for base in (root, Path(sysconfig.get_paths()["stdlib"])):
        if (base / path).exists():
            return linecache.getline(str(base / path), line)
    return linecache.getline(path, line)


def part_of(stack: str, root: Path) -> str | None:
    frames = stack.split(";")
    leaf = frames[-1]
    if any(leaf.startswith(w) for w in WAITS):
        return None
    if SYSCALLS.search(source_line(leaf, root)):
        return "syscalls"
    for frame in reversed(frames):
        for part, keys in PARTS:
            if any(k in frame for k in keys):
                return part
    return "other"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=_run.REPO_ROOT, help="blockvirt source tree")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--rw", default="randread")
    p.add_argument("--iodepth", type=int, default=16)
    p.add_argument("--runtime", type=float, default=10.0)
    p.add_argument("--size", type=_run.parse_size, default=256 << 20)
    p.add_argument("--rate", type=int, default=499, help="py-spy samples per second (default 499)")
    p.add_argument("--top", type=int, default=0, metavar="N", help="also list the N hottest leaf frames")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory(prefix="blockvirt-profile-") as tmp:
        work = Path(tmp)
        opts = _run.Options(args.size, work, work, args.python, 60.0, tuple(args.serve_arg), thick=False)
        s = _run.Server("blockvirt")
        try:
            _run.start_blockvirt(s, opts, root=args.root)
            _run.fill(s, args.size, 600, work)
            assert s.proc is not None
            raw = work / "spy.txt"
            spy_argv = [pyspy, "record", "--format", "raw", "-r", str(args.rate), "-o", str(raw)]
            spy = subprocess.Popen(
                [*spy_argv, "--pid", str(s.proc.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            params = {
                "rw": args.rw, "bs": "4k", "iodepth": str(args.iodepth), "size": str(args.size),
                "time_based": "1", "runtime": f"{args.runtime:g}",
            }  # fmt: skip
            job = _run.run_fio(s, "profile", params, args.runtime + 60, work)
            spy.send_signal(2)
            spy.wait(timeout=60)
            iops = _run.job_metrics(job, "write" if "write" in args.rw else "read")["iops"]
            counts: collections.Counter[str] = collections.Counter()
            leaves: collections.Counter[str] = collections.Counter()
            for line in raw.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                if not stack or not n.isdigit():
                    continue
                part = part_of(stack, args.root)
                if part is not None:
                    counts[part] += int(n)
                    leaves[stack.split(";")[-1]] += int(n)
        finally:
            s.stop()
    total = sum(counts.values()) or 1
    seconds = total / args.rate  # CPU seconds sampled (the loop's thread, mostly)
    per_req_us = seconds / (iops * args.runtime) * 1e6 if iops else 0.0
    print(f"{args.rw} QD{args.iodepth}: {iops:,.0f} IOPS; {total} samples; ~{per_req_us:.1f} us CPU/request")
    for part, n in counts.most_common():
        print(f"  {part:<9} {n / total * 100:5.1f} %  {per_req_us * n / total:6.2f} us/request")
    for leaf, n in leaves.most_common(args.top):
        print(f"    {n / total * 100:5.1f} %  {leaf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
