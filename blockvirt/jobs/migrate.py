"""The migration job: move a volume with its snapshot tree to another pool while initiators
keep writing (storage vMotion).

This module is the job's side: it checks the request, starts the job, paces the copy (its own
byte rate, then the QoS background class of both pools) and hands the move to the backend
through the seam (`VolumeBackend.plan_move` / `move`), which copies, mirrors and switches
over. See docs/migration.md.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from blockvirt.jobs import transfer
from blockvirt.jobs.manager import Job, JobManager
from blockvirt.jobs.pacing import RateLimiter
from blockvirt.storage.backend import MoveHooks
from blockvirt.storage.catalog import CatalogError
from blockvirt.storage.volumes import VolumeManager
from blockvirt.storage.work import JobKind

PROVISIONING = (None, "thick", "thin")

#: QoS admission of background bytes in a pool (QosManager.background), if QoS runs.
Background = Callable[[str, int], Awaitable[None]]


async def start(
    vm: VolumeManager,
    jobs: JobManager,
    name: str,
    pool: str,
    *,
    provisioning: str | None = None,
    bps_limit: float = 0.0,
) -> Job:
    """Check and start a migration job."""
    async with vm.editing(name, pool) as (backend, rec):
        target = vm.catalog.pool(pool)
        if target is None:
            raise CatalogError("not-found", f"no pool named {pool!r}")
        if provisioning not in PROVISIONING:
            raise CatalogError("invalid", "provisioning must be 'thick', 'thin' or absent")
        if (
            isinstance(bps_limit, bool)
            or not isinstance(bps_limit, int | float)
            or not math.isfinite(bps_limit)
            or bps_limit < 0
        ):
            raise CatalogError("invalid", "bps_limit must be a number of bytes per second (0: unlimited)")
        busy = jobs.busy(name)
        if busy is not None:
            raise CatalogError("conflict", f"job {busy.id} ({busy.kind}) is running on {name!r}")
        if vm.backend_of_pool(target) is not backend:
            params = transfer.plan(vm, backend, rec, pool)  # between kinds: through the seam
            params["provisioning"] = provisioning
        else:
            params = backend.plan_move(rec, target, provisioning)
        params["bps_limit"] = bps_limit
        return jobs.start(JobKind.MIGRATE, name, params)


async def run(vm: VolumeManager, job: Job, background: Background | None) -> None:
    """The job: pace, and let the backend move the volume."""
    params = job.params
    limiter = RateLimiter(float(params.get("bps_limit") or 0))
    source, target = params["source_pool"], params["pool"]

    async def throttle(nbytes: int) -> None:
        # Its own rate limit, then the QoS background class of both pools (so a migration
        # gets its shares of them, and all of whatever the volumes leave).
        await limiter(nbytes)
        if background is not None:
            await background(source, nbytes)
            if target != source:
                await background(target, nbytes)

    if params.get("mode") == "transfer":
        await transfer.run(vm, job, throttle)
        return
    backend = vm.backends[params.get("backend", "file")]
    hooks = MoveHooks(
        open_head=lambda: vm.head(job.volume),
        throttle=throttle,
        switched=lambda: vm.volume_moved(job.volume, target),
    )
    await backend.move(job, hooks)
