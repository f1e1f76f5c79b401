"""Pure pieces of the metrics: histogram buckets, the job series bound, accounting on and off
in the dispatcher, and PromQL metric-name extraction used by the dashboard tests."""

from __future__ import annotations

import errno

from blockvirt.jobs.manager import DONE, FAILED, RUNNING, Job
from blockvirt.metrics.collectors import JOB_RETENTION, MAX_JOB_SERIES, exported_jobs, histogram_buckets
from blockvirt.nbd.constants import Cmd
from blockvirt.nbd.events import ExportInfo
from blockvirt.server.dispatch import Dispatcher
from blockvirt.storage.drivers.memory import MemoryNode
from blockvirt.storage.node import StorageError
from blockvirt.storage.stats import LATENCY_BOUNDS, Latency, VolumeStats
from tests.helpers import FakeCatalog, NbdPair, execute
from tests.promql import metric_names

SIZE = 1 << 20


def test_histogram_buckets_are_cumulative_and_end_in_inf() -> None:
    lat = Latency()
    for s in (0.00001, 0.00005, 0.0003, 0.2, 7.0):
        lat.observe(s)
    buckets = histogram_buckets(lat)
    assert [le for le, _ in buckets[:3]] == ["5e-05", "0.0001", "0.00025"]
    assert buckets[-1] == ("+Inf", 5.0)
    assert len(buckets) == len(LATENCY_BOUNDS) + 1
    counts = [c for _, c in buckets]
    assert counts == sorted(counts)
    assert counts[0] == 2  # le is inclusive: 50 us lands in the first bucket
    assert dict(buckets)["0.25"] == 4


def _job(i: int, state: str, updated: float, volume: str = "v") -> Job:
    return Job(f"j{i}", "merge", volume, {}, state=state, created=updated, updated=updated)


def test_job_series_are_bounded_and_old_or_orphaned_jobs_drop_out() -> None:
    now = 1_000_000.0
    jobs = [_job(i, DONE, now - i) for i in range(80)]
    jobs.append(_job(100, FAILED, now - JOB_RETENTION - 1))  # too old
    jobs.append(_job(101, DONE, now, volume="deleted"))  # its volume is gone
    jobs += [_job(200 + i, RUNNING, now - 5000, volume="gone") for i in range(3)]  # running: always
    out = exported_jobs(jobs, {"v"}, now=now)
    assert len(out) == MAX_JOB_SERIES
    assert [j.id for j in out[:3]] == ["j200", "j201", "j202"]
    assert [j.id for j in out[3:6]] == ["j0", "j1", "j2"]  # newest finished first
    assert {"j100", "j101"}.isdisjoint(j.id for j in out)


async def _traffic(stats: VolumeStats) -> Dispatcher:
    pair = NbdPair(FakeCatalog(ExportInfo("disk", SIZE)))
    neg = pair.negotiate("disk")
    d = Dispatcher(MemoryNode(SIZE), SIZE, neg.transmission_flags, pair.stx, neg.contexts, stats)
    await execute(pair, d, Cmd.WRITE, 0, 4096, data=b"x" * 4096, fast_path=True)
    await execute(pair, d, Cmd.READ, 0, 4096, fast_path=True)
    await execute(pair, d, Cmd.READ, 0, 4096)
    await execute(pair, d, Cmd.FLUSH)
    await execute(pair, d, Cmd.READ, SIZE, 4096)  # out of range: an error
    return d


async def test_accounting_on() -> None:
    st = VolumeStats()
    await _traffic(st)
    assert st.ops == {"write": 1, "read": 2, "flush": 1}
    assert (st.read_bytes, st.write_bytes, st.errors) == (8192, 4096, 1)
    assert {op: sum(lat.counts) for op, lat in st.latency.items()} == {"read": 2, "write": 1, "flush": 1}
    assert st.busy_seconds == sum(lat.total for lat in st.latency.values()) > 0
    d = st.to_dict()
    assert d["latency"]["read"]["count"] == 2 and d["busy_seconds"] > 0


async def test_accounting_off_counts_nothing_but_errors() -> None:
    st = VolumeStats(enabled=False)
    d = await _traffic(st)
    assert not d.metered
    assert st.ops == {} and st.latency == {} and st.read_bytes == st.write_bytes == 0
    assert st.busy_seconds == 0
    assert st.errors == 1


class FailingReads(MemoryNode):
    def read_nowait(self, offset: int, length: int) -> None:
        return None

    def read_sparse_nowait(self, offset: int, length: int) -> None:
        return None

    async def read(self, offset: int, length: int) -> bytes:
        raise StorageError(errno.EIO, "disk on fire")

    async def read_sparse(self, offset: int, length: int) -> list[tuple[int, int, bytes | None]]:
        raise StorageError(errno.EIO, "disk on fire")


async def test_a_storage_failure_is_an_op_and_an_error_without_bytes_or_latency() -> None:
    pair = NbdPair(FakeCatalog(ExportInfo("disk", SIZE)))
    neg = pair.negotiate("disk")
    st = VolumeStats()
    d = Dispatcher(FailingReads(SIZE), SIZE, neg.transmission_flags, pair.stx, neg.contexts, st)
    r = await execute(pair, d, Cmd.READ, 0, 4096, fast_path=True)
    assert r.error
    assert st.ops == {"read": 1} and st.errors == 1 and st.read_bytes == 0
    assert st.latency["read"].count == 0


def test_promql_metric_names() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, op) (rate(a_bucket{volume=~"$volume"}[$__rate_interval])))'
    assert metric_names(expr) == {"a_bucket"}
    assert metric_names("rate(x_total[5m]) * on (instance, job) group_left b_info") == {"x_total", "b_info"}
    assert metric_names("sum without (op) (c) / ignoring(op) d > bool 1e-05") == {"c", "d"}
    assert metric_names('e{le="+Inf"} offset 5m and f') == {"e", "f"}
    assert metric_names("label_values(blockvirt_volume_read_bytes_total, volume)") == {
        "blockvirt_volume_read_bytes_total"
    }
