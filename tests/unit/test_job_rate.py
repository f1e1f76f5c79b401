"""A job's rate and ETA come from its progress reports over the last seconds, however often
it reports: a stream reports every run of blocks it copies, in bursts between checkpoints."""

from __future__ import annotations

import pytest

from blockvirt.jobs.manager import Job
from blockvirt.storage.work import JobKind

KiB = 1024
MiB = 1024 * KiB


def test_rate_spans_seconds_of_bursty_reports() -> None:
    job = Job("j", JobKind.FLATTEN, "vol", {})
    total = 64 * MiB
    t, done = 0.0, 0
    job.progress(0, total, now=t)
    # Bursts of 100 runs of 256 KiB, 1 ms apart, each followed by a 0.5 s checkpoint sync.
    for _ in range(2):
        for _ in range(100):
            t += 0.001
            done += 256 * KiB
            job.progress(done, now=t)
        t += 0.5
    t += 0.001
    done += 256 * KiB
    job.progress(done, now=t)
    rate = job.rate()
    assert rate is not None
    assert rate == pytest.approx(done / t, rel=0.15)  # not the last few reports' pace
    out = job.to_dict()
    assert out["unit"] == "bytes" and out["done"] == done and out["total"] == total
    assert out["eta_seconds"] == pytest.approx((total - done) / out["rate"], abs=0.1)


def test_rate_follows_a_change_of_pace() -> None:
    job = Job("j", JobKind.MERGE, "vol", {})
    job.progress(0, 100 * MiB, now=0.0)
    done = 0
    for i in range(1, 101):  # 10 s at 1 MiB/s, then 10 s at 4 MiB/s, reported every 0.1 s
        done += 100 * KiB
        job.progress(done, now=i / 10)
    for i in range(101, 201):
        done += 400 * KiB
        job.progress(done, now=i / 10)
    rate = job.rate()
    assert rate == pytest.approx(4 * MiB, rel=0.05)
