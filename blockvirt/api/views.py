"""What the API answers about volumes and snapshots: JSON views built from storage records and
figures (never opening a volume to describe it)."""

from __future__ import annotations

from typing import Any

from blockvirt.storage.volumes import VolumeManager
from blockvirt.storage.work import JobHost


def volume_info(vm: VolumeManager, jobs: JobHost, name: str) -> dict[str, Any]:
    backend, rec = vm.locate(name)
    head = vm.exports_cache.get(name)
    figures = backend.figures(name, head.base if head is not None else None)
    # A failed commit of the open head, or damage seen without opening (layers gone).
    failed = (backend.failed(head.base) if head is not None else None) or figures.error
    snaps = backend.snapshots(name)
    job = jobs.busy(name)
    return {
        "name": rec.name,
        "size": head.size if head is not None else rec.size,
        "thick": rec.thick,
        "pool": rec.pool,
        "allocated": figures.allocated,
        "head_allocated": figures.head_allocated,
        "chain_depth": figures.chain_depth,
        "snapshots": len(snaps),
        "connections": vm.exports_cache.users(name),
        "job": job.id if job else None,
        "created": rec.created,
        "state": "failed" if failed else "ok",
        "error": failed,
    }


def volume_list(vm: VolumeManager, jobs: JobHost) -> list[dict[str, Any]]:
    out = [volume_info(vm, jobs, rec.name) for rec in vm.records()]
    # Volumes of pools not reached since the start: known by name only until they are.
    out += [_unavailable(name, pool) for name, pool in vm.unreachable()]
    return sorted(out, key=lambda v: str(v["name"]))


def _unavailable(name: str, pool: str) -> dict[str, Any]:
    unknown = ("size", "thick", "allocated", "head_allocated", "chain_depth", "snapshots", "created")
    return {
        "name": name,
        **dict.fromkeys(unknown),
        "pool": pool,
        "connections": 0,
        "job": None,
        "state": "unavailable",
        "error": f"pool {pool} cannot be reached",
    }


async def snapshot_list(vm: VolumeManager, name: str) -> list[dict[str, Any]]:
    """The volume's snapshots as a tree: each with its tree parent and space use."""
    return [s.to_dict() for s in await vm.snapshot_tree(name)]
