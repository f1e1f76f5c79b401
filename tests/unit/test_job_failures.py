"""How a failed job is logged: a failure storage reports on purpose (a disk error, a pool away)
is one line with its reason; anything else, a bug, comes with its stack."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest

from blockvirt.jobs.manager import Job, JobManager
from blockvirt.storage.catalog import Catalog
from blockvirt.storage.node import StorageError
from blockvirt.storage.work import JobKind, JobState


async def fail_with(tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception) -> Job:
    jobs = JobManager(Catalog(str(tmp_path)))

    async def runner(job: Job) -> None:
        await asyncio.sleep(0)
        raise error

    jobs.register(JobKind.FLATTEN, runner)
    with caplog.at_level(logging.ERROR, logger="blockvirt.jobs"):
        job = jobs.start(JobKind.FLATTEN, "v1", {})
        assert job.task is not None
        await job.task
    return job


async def test_a_storage_failure_is_one_line_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job = await fail_with(tmp_path, caplog, StorageError(errno.EIO, "v1: write: Input/output error"))
    assert job.state == JobState.FAILED and job.error == "v1: write: Input/output error"
    [record] = [r for r in caplog.records if r.name == "blockvirt.jobs"]
    assert record.getMessage() == f"job {job.id} (flatten on v1) failed: v1: write: Input/output error"
    assert record.exc_info is None


async def test_a_disk_error_is_one_line_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = await fail_with(tmp_path, caplog, OSError(errno.ENOSPC, "No space left on device", "/p/x.data"))
    assert job.error == "No space left on device"  # the API is not shown file names
    [record] = [r for r in caplog.records if r.name == "blockvirt.jobs"]
    assert "/p/x.data" in record.getMessage() and record.exc_info is None  # the log is


async def test_a_bug_is_logged_with_its_stack(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = await fail_with(tmp_path, caplog, KeyError("chunk 7"))
    assert job.state == JobState.FAILED
    [record] = [r for r in caplog.records if r.name == "blockvirt.jobs"]
    assert record.exc_info is not None and record.exc_info[0] is KeyError
