"""Job registry: long operations as tasks with persisted state and progress.

A job's row is saved when it starts, as it checkpoints and when it ends; jobs still 'running'
in the catalog at start-up are resumed by the runner registered for their kind. Every job
reports progress in bytes (done, total), from which its rate and ETA follow. The manager is
what storage knows as its `JobHost` (blockvirt.storage.work).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from blockvirt.storage.catalog import Catalog, CatalogError, JobRecord
from blockvirt.storage.node import StorageError
from blockvirt.storage.work import CANCELLABLE, JobKind, JobState

log = logging.getLogger("blockvirt.jobs")

#: Samples of progress (for the rate) are kept at least this far apart (seconds); jobs may
#: report far more often (a stream reports every run of blocks it copies).
SAMPLE_EVERY = 0.1

RUNNING, DONE, FAILED, CANCELLED = JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.CANCELLED


@dataclass(slots=True, eq=False)
class Job:
    """A job; to storage code doing its work it is a `WorkContext`."""

    id: str
    kind: JobKind
    volume: str
    params: dict[str, Any]
    state: JobState = JobState.RUNNING
    done: int = 0
    total: int = 0
    error: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    task: asyncio.Task[None] | None = None
    #: Recent (monotonic time, done) samples, for the rate and ETA (not persisted).
    _samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=32), repr=False)
    _save: Callable[[Job], None] | None = field(default=None, repr=False)

    # ------------------------------------------------------------ WorkContext
    @property
    def cancelled(self) -> bool:
        return self.state == JobState.CANCELLED

    def progress(self, done: int, total: int | None = None, now: float | None = None) -> None:
        if total is not None:
            self.total = total
        self.done = done
        t = time.monotonic() if now is None else now
        s = self._samples
        if len(s) >= 2 and t - s[-2][0] < SAMPLE_EVERY:
            s[-1] = (t, done)  # the newest sample moves along: the kept ones span seconds
        else:
            s.append((t, done))

    def checkpoint(self) -> None:
        if self._save is not None:
            self._save(self)

    def note(self, text: str) -> None:
        self.error = text

    def mark_done(self) -> None:
        self.state = JobState.DONE

    # ------------------------------------------------------------ views
    def rate(self) -> float | None:
        """Bytes per second over the last few seconds of samples, or None if unknown."""
        s = self._samples
        if len(s) < 2:
            return None
        t1, d1 = s[-1]
        t0, d0 = next(((t, d) for t, d in s if t1 - t <= 5.0), s[0])
        if t1 - t0 < 0.2:
            t0, d0 = s[0]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def log_extra(self) -> dict[str, str]:
        """Fields for `log.*(..., extra=...)`: structured log lines carry the job and volume."""
        return {"job": self.id, "volume": self.volume}

    @property
    def fraction(self) -> float:
        return 1.0 if self.state == JobState.DONE else (self.done / self.total if self.total else 0.0)

    def record(self) -> JobRecord:
        return JobRecord(
            self.id,
            str(self.kind),
            self.volume,
            str(self.state),
            json.dumps(self.params),
            self.done,
            self.total,
            self.error,
            self.created,
            self.updated,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": str(self.kind),
            "volume": self.volume,
            "state": str(self.state),
            "done": self.done,
            "total": self.total,
            "unit": "bytes",
            "progress": round(self.fraction, 4),
            "error": self.error,
            "created": self.created,
            "updated": self.updated,
        }
        if self.state == JobState.RUNNING:
            rate = self.rate()
            out["rate"] = round(rate, 1) if rate is not None else None
            left = self.total - self.done
            out["eta_seconds"] = round(left / rate, 1) if rate and rate > 0 and left >= 0 else None
        if "result" in self.params:
            out["result"] = self.params["result"]
        if "pool" in self.params:
            out["pool"] = self.params["pool"]
        return out


Runner = Callable[[Job], Awaitable[None]]


#: Failures that storage reports on purpose (a disk error, a pool away, an edit refused):
#: logged as one line. Anything else is logged with its stack.
EXPECTED_FAILURES = (OSError, StorageError, CatalogError)


def public_error(e: BaseException) -> str:
    """What the API may show of a failure: an OSError's text names files, so only its
    strerror goes out (the full error is in the server log)."""
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return str(e) or type(e).__name__


class JobManager:
    """Implements blockvirt.storage.work.JobHost."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.jobs: dict[str, Job] = {}
        self._runners: dict[JobKind, Runner] = {}
        for rec in catalog.jobs():
            self.jobs[rec.id] = Job(
                rec.id,
                JobKind(rec.kind),
                rec.volume,
                json.loads(rec.params),
                JobState(rec.state),
                rec.done,
                rec.total,
                rec.error,
                rec.created,
                rec.updated,
                _save=self.save,
            )

    def register(self, kind: JobKind, runner: Runner) -> None:
        """The code that carries out jobs of `kind` (wired by the service)."""
        self._runners[kind] = runner

    def pending(self) -> list[Job]:
        """Jobs interrupted by a stop or crash (to be resumed)."""
        return [j for j in self.jobs.values() if j.state == RUNNING and j.task is None]

    def resume(self) -> None:
        """Run again every job a stop or crash interrupted."""
        for job in self.pending():
            log.info("resuming job %s (%s on %s)", job.id, job.kind, job.volume, extra=job.log_extra())
            self._run(job)

    def save(self, job: Job) -> None:
        job.updated = time.time()
        self.catalog.save_job(job.record())

    def start(self, kind: JobKind, volume: str, params: dict[str, Any]) -> Job:
        job = Job(uuid.uuid4().hex[:12], kind, volume, params, _save=self.save)
        self.jobs[job.id] = job
        self.save(job)
        log.info("job %s (%s on %s) started", job.id, kind, volume, extra=job.log_extra())
        self._run(job)
        return job

    def _run(self, job: Job) -> None:
        runner = self._runners[job.kind]

        async def main() -> None:
            try:
                await runner(job)
            except asyncio.CancelledError:
                if job.state == CANCELLED:
                    self.save(job)
                raise  # a stop: stays RUNNING in the catalog, resumed next time
            except Exception as e:
                what = (job.id, job.kind, job.volume)
                if isinstance(e, EXPECTED_FAILURES):  # storage said no: its words are the story
                    log.error("job %s (%s on %s) failed: %s", *what, e, extra=job.log_extra())
                else:  # a bug: the stack is what finds it
                    log.exception("job %s (%s on %s) failed", *what, extra=job.log_extra())
                job.state, job.error = FAILED, public_error(e)
                self.save(job)
                return
            if job.state in (RUNNING, DONE):
                job.state = DONE
                job.done = job.total
            self.save(job)
            log.info("job %s (%s on %s) %s", job.id, job.kind, job.volume, job.state, extra=job.log_extra())

        job.task = asyncio.get_running_loop().create_task(main())

    def cancel(self, job_id: str) -> Job:
        """Stop a running job. Only kinds that say so are cancellable (merges are internal:
        they run again at the next collection, so stopping one achieves nothing)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise CatalogError("not-found", f"no job {job_id!r}")
        if job.state != RUNNING:
            raise CatalogError("conflict", f"job {job_id} is {job.state}, not running")
        if job.kind not in CANCELLABLE:
            raise CatalogError("conflict", f"a {job.kind} job cannot be cancelled")
        if job.params.get("committed"):
            raise CatalogError("conflict", f"job {job_id} has switched over: it is finishing")
        job.state = CANCELLED
        job.error = "cancelled"
        if job.task is not None:
            job.task.cancel()
        else:
            self.save(job)
        log.info("job %s (%s on %s) cancelled", job.id, job.kind, job.volume, extra=job.log_extra())
        return job

    def busy(self, volume: str) -> Job | None:
        for job in self.jobs.values():
            if job.volume == volume and job.state == RUNNING:
                return job
        return None

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == RUNNING]

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def list(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.created)

    async def wait(self, job: Job) -> None:
        if job.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(job.task)

    async def close(self) -> None:
        """Stop running jobs; they stay 'running' in the catalog and resume at next start."""
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
