"""The offline check of RBD pools (`blockvirt check`): each pool's catalog in Ceph against its
images and snapshots, reached with the pool's config from the node's catalog.

Damage (exit status 1):
- a catalog volume whose image is missing, a catalog snapshot missing in RBD;
- an image marked as a blockvirt volume (metadata `blockvirt.volume` = its name) that the
  catalog does not know: left by a create or delete cut short;
- an RBD snapshot of a volume that the catalog does not know;
- a snapshot tree pointing at snapshots that do not exist; a pool that cannot be reached.

`--repair` touches only what is provably blockvirt's and no longer needed: marked images the
catalog does not know (removed with their snapshots), RBD snapshots left by a snapshot create
or delete cut short (the catalog's intent record names them: removed, or the delete is
finished), intents nothing came of, and marked images in the RBD trash that no clone reads
(leaks). Anything else (an unmarked image, an operator's `rbd snap create`) is reported and
left alone. Run it while no node serves the pool: a create in progress looks like a leftover.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from blockvirt.storage.backends.rbd.backend import ceph_config
from blockvirt.storage.backends.rbd.catalog import Changes, RbdCatalog, forget_snapshot, pending_key
from blockvirt.storage.backends.rbd.cluster import CephConnection
from blockvirt.storage.backends.rbd.errors import CephError
from blockvirt.storage.backends.rbd.imageops import MARK, remove_image
from blockvirt.storage.backends.rbd.pool import RbdPool
from blockvirt.storage.backends.rbd.tuning import RbdTuning
from blockvirt.storage.catalog import CatalogError, PoolRecord
from blockvirt.storage.check import Report
from blockvirt.storage.node import StorageError


def check_rbd_pools(pools: list[PoolRecord], report: Report, *, repair: bool = False) -> dict[str, set[str]]:
    """Check every RBD pool in `pools` (blocking: runs its own event loop). Returns the
    volume names each pool's catalog holds (of the pools that could be read)."""
    names: dict[str, set[str]] = {}
    for rec in pools:
        asyncio.run(_check_pool(rec, report, repair, names))
    return names


@dataclass
class _Pool:
    rec: PoolRecord
    images: RbdPool
    catalog: RbdCatalog
    report: Report
    repair: bool

    def damage(self, what: str) -> None:
        self.report.damage.append(f"pool {self.rec.name}: {what}")

    def fixed(self, what: str) -> None:
        self.report.repaired.append(f"pool {self.rec.name}: {what}")


async def _check_pool(rec: PoolRecord, report: Report, repair: bool, names: dict[str, set[str]]) -> None:
    cfg = ceph_config(rec, RbdTuning())
    where = f"pool {rec.name} (Ceph {cfg.where})"
    try:
        conn = await CephConnection.open(cfg)
    except CephError as e:
        report.unchecked.append(f"{where}: cannot be checked: {e}")
        return
    try:
        catalog = RbdCatalog(conn)
        await catalog.load()
        names[rec.name] = {v.name for v in catalog.volumes() if v.incoming is None}
        await _check(_Pool(rec, RbdPool(conn), catalog, report, repair))
    except (CephError, StorageError, CatalogError) as e:
        report.damage.append(f"{where}: check cut short: {e}")
    finally:
        await conn.close()


async def _check(p: _Pool) -> None:
    cat, images = p.catalog, p.images
    present = set(await images.list())
    volumes = cat.volumes()
    p.report.volumes += len(volumes)
    pending = {(v, s): op for v, s, op in cat.pending()}
    for vol in volumes:
        if vol.name not in present:
            p.damage(f"volume {vol.name}: its RBD image is missing")
            continue
        img = await images.open(vol.name, read_only=True)
        try:
            in_rbd = {s.name for s in await img.snapshots()}
            mark = await img.metadata_get(MARK)
        finally:
            await img.close()
        if mark != vol.name:
            p.report.notes.append(f"pool {p.rec.name}: volume {vol.name}: image lacks its {MARK} mark")
        await _check_snapshots(p, vol.name, in_rbd, pending)
        known = {s.name for s in cat.snapshots(vol.name)}
        for s in cat.snapshots(vol.name):
            if s.parent is not None and s.parent not in known:
                p.damage(f"snapshot {vol.name}@{s.name}: its parent {s.parent} does not exist")
        if vol.current is not None and vol.current not in known:
            p.damage(f"volume {vol.name}: it sits on snapshot {vol.current}, which does not exist")
    # Intents nothing came of: the change never reached RBD, or the volume is gone.
    for (vol_name, snap), op in sorted(pending.items()):
        await _drop_intent(p, vol_name, snap, f"intent to {op} {vol_name}@{snap}")
    names = {v.name for v in volumes}
    for name in sorted(present - names):
        img = await images.open(name, read_only=True)
        try:
            mark = await img.metadata_get(MARK)
        finally:
            await img.close()
        if mark != name:
            p.report.notes.append(f"pool {p.rec.name}: image {name} is not blockvirt's (left alone)")
            continue
        what = f"image {name} is marked as a blockvirt volume but the catalog does not know it"
        if p.repair:
            await remove_image(images, name)
            p.fixed(f"{what}: removed")
        else:
            p.damage(f"{what} (left by a create or delete cut short; --repair removes it)")
    for t in await images.trash():
        if t.snapshots == 0 and MARK in t.metadata:
            what = f"image {t.name} (id {t.id}) waits in the RBD trash though no clone reads it"
            if p.repair:
                await images.trash_remove(t.id)
                p.fixed(f"{what}: removed")
            else:
                p.report.leaks.append(f"pool {p.rec.name}: {what}")


async def _check_snapshots(
    p: _Pool, volume: str, in_rbd: set[str], pending: dict[tuple[str, str], str]
) -> None:
    in_catalog = {s.name for s in p.catalog.snapshots(volume)}
    for snap in sorted(in_catalog - in_rbd):
        if pending.pop((volume, snap), None) == "delete":
            # The RBD snapshot went, the catalog update did not: finish the delete.
            what = f"snapshot {volume}@{snap}: a delete was cut short"
            if p.repair:

                def finish(items: dict[str, Any], snap: str = snap) -> Changes:
                    changes = forget_snapshot(items, volume, snap)
                    changes.remove.append(pending_key(volume, snap))
                    return changes

                await p.catalog.mutate(finish)
                p.fixed(f"{what}: finished")
            else:
                p.damage(f"{what} (its RBD snapshot is gone; --repair finishes it)")
        else:
            p.damage(f"snapshot {volume}@{snap} is missing in RBD")
    for snap in sorted(in_rbd - in_catalog):
        op = pending.pop((volume, snap), None)
        if op is None:
            p.damage(f"volume {volume}: RBD snapshot {snap} is not in the catalog (left alone)")
            continue
        what = f"volume {volume}: RBD snapshot {snap} left by a snapshot {op} cut short"
        if p.repair:
            img = await p.images.open(volume)
            try:
                await img.snapshot_remove(snap)
            finally:
                await img.close()
            await _forget_intent(p.catalog, volume, snap)
            p.fixed(f"{what}: removed")
        else:
            p.damage(f"{what} (--repair removes it)")


async def _forget_intent(catalog: RbdCatalog, volume: str, snap: str) -> None:
    await catalog.mutate(lambda items: Changes(remove=[pending_key(volume, snap)]))


async def _drop_intent(p: _Pool, volume: str, snap: str, what: str) -> None:
    if p.repair:
        await _forget_intent(p.catalog, volume, snap)
        p.fixed(f"{what}: forgotten")
    else:
        p.report.notes.append(f"pool {p.rec.name}: {what} came to nothing (--repair forgets it)")
