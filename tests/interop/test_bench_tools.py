"""The benchmark tools in tools/bench still run end to end against real servers (shortest
settings: one rep, one-second runs, 64 MiB disks). Not a measurement: their figures are only
checked to be there. chain.py, metrics.py, polling.py and profile.py once stayed broken for a
day after run.py's fio helper changed under them, because nothing ran them. (profile.py needs
py-spy, which the test setup does not install; it shares the helpers run here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import need

pytestmark = [pytest.mark.interop]

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"


def bench(tool: str, *args: str, cwd: Path) -> str:
    r = subprocess.run(
        [sys.executable, str(BENCH / tool), *args], capture_output=True, text=True, timeout=240, cwd=cwd
    )
    assert r.returncode == 0, f"{tool} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.timeout(300)
def test_run_py_compares_blockvirt_with_a_peer(tmp_path: Path) -> None:
    need("fio")
    need("nbdkit")
    out = tmp_path / "run.json"
    bench("run.py", "--servers", "blockvirt,nbdkit", "--workloads", "randread-4k-qd16,seqwrite-1m-qd8",
          "--reps", "1", "--runtime", "1", "--ramp-time", "0", "--size", "64M", "--no-sync",
          "--json", str(out), cwd=tmp_path)  # fmt: skip
    runs = json.loads(out.read_text())["runs"]
    done = {(r["server"], r["workload"]) for r in runs if r["ok"] and r["metrics"]["iops"] > 0}
    assert done == {(s, w) for s in ("blockvirt", "nbdkit") for w in ("randread-4k-qd16", "seqwrite-1m-qd8")}


@pytest.mark.timeout(300)
def test_chain_py_allocating_writes(tmp_path: Path) -> None:
    need("fio")
    need("nbdkit")
    out = tmp_path / "chain.json"
    bench("chain.py", "--parts", "alloc", "--reps", "1", "--size", "64M", "--no-sync", "--json", str(out),
          cwd=tmp_path)  # fmt: skip
    data = json.loads(out.read_text())
    assert not data["errors"], data["errors"]
    summary = data["results"]["alloc"]["summary"]
    assert {v: bool(s["median_iops"]) for v, s in summary.items()} == {
        "blockvirt-thin": True,
        "blockvirt-thin4k": True,
        "blockvirt-thick": True,
        "nbdkit-file": True,
    }


@pytest.mark.timeout(300)
def test_metrics_py_measures_on_and_off(tmp_path: Path) -> None:
    need("fio")
    out = tmp_path / "metrics.json"
    bench("metrics.py", "--reps", "1", "--runtime", "1", "--ramp-time", "0", "--size", "64M", "--no-sync",
          "--json", str(out), cwd=tmp_path)  # fmt: skip
    runs = json.loads(out.read_text())["runs"]
    measured = sorted(r["server"] for r in runs if r["iops"] > 0 and r["cpu_us"] > 0)
    assert measured == ["metrics-off", "metrics-on"], runs


@pytest.mark.timeout(300)
def test_polling_py_compares_poll_and_no_poll(tmp_path: Path) -> None:
    need("fio")
    text = bench("polling.py", "--rates", "1000", "--reps", "1", "--runtime", "1", "--size", "64M",
                 cwd=tmp_path)  # fmt: skip
    rows = [ln.split() for ln in text.splitlines() if ln.startswith("1000 ")]
    assert sorted(r[1] for r in rows) == ["no-poll", "poll"], text
