"""Every job kind, wired to the code that runs it (the service calls `register_all`).

Merges, commits and flattens are storage work a backend started: the backend that started
them carries them out (`VolumeManager.run_work`). Migrations are this package's own job
(migrate.py), which hands the data movement to the backend through the seam.
"""

from __future__ import annotations

from blockvirt.jobs import migrate
from blockvirt.jobs.manager import Job, JobManager
from blockvirt.storage.volumes import VolumeManager
from blockvirt.storage.work import JobKind


def register_all(jobs: JobManager, vm: VolumeManager, background: migrate.Background | None) -> None:
    async def storage_work(job: Job) -> None:
        await vm.run_work(job)

    async def migration(job: Job) -> None:
        await migrate.run(vm, job, background)

    for kind in (JobKind.MERGE, JobKind.COMMIT, JobKind.FLATTEN):
        jobs.register(kind, storage_work)
    jobs.register(JobKind.MIGRATE, migration)
