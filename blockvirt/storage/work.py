"""Background work as storage sees it: the kinds and states of jobs, and the small interfaces
through which storage asks for work and reports on it.

Storage never imports the job layer (`blockvirt.jobs`): it declares here what it needs, and the
job manager implements it. A backend that wants a layer merged asks `JobHost.start(...)`; the
job manager persists the job, runs the runner registered for its kind (which calls back into
the backend with a `WorkContext`), reports progress and resumes it after a restart.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Protocol


class JobKind(enum.StrEnum):
    #: Stream a hidden layer into its only child (after a snapshot delete).
    MERGE = "merge"
    #: Overlay a small immutable child onto its hidden parent (the cheaper direction of a merge).
    COMMIT = "commit"
    #: Copy everything a volume reads from its ancestors into its head.
    FLATTEN = "flatten"
    #: Move a volume with its snapshot tree to another pool, live.
    MIGRATE = "migrate"


class JobState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Kinds an operator may cancel (merges are internal: the next collection starts them again).
CANCELLABLE = frozenset({JobKind.MIGRATE, JobKind.FLATTEN})


class JobView(Protocol):
    """What storage may read of a job."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> JobKind: ...
    @property
    def volume(self) -> str: ...
    @property
    def state(self) -> JobState: ...
    @property
    def params(self) -> dict[str, Any]: ...


class WorkContext(JobView, Protocol):
    """A running job as the storage code doing its work sees it."""

    @property
    def cancelled(self) -> bool: ...

    def progress(self, done: int, total: int | None = None) -> None:
        """Bytes done so far (and, if known now, the total): the job's rate and ETA."""

    def checkpoint(self) -> None:
        """Persist `params` now (a resumed job starts from what they say)."""

    def note(self, text: str) -> None:
        """A remark the job ends with (a resumed job that found its work already done)."""

    def mark_done(self) -> None:
        """The work is complete: the caller has just committed the catalog transaction that
        both completed it and ended the job's row (`Txn.finish_job`), so a crash after that
        commit never runs it again."""


class JobHost(Protocol):
    """The job manager, as storage uses it."""

    def start(self, kind: JobKind, volume: str, params: dict[str, Any]) -> JobView: ...

    def busy(self, volume: str) -> JobView | None:
        """The job running on `volume`, if any."""

    def running(self) -> Sequence[JobView]: ...

    async def close(self) -> None:
        """Stop running jobs (they resume at the next start)."""
