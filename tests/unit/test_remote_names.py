"""Names of volumes kept in other storage (RBD pools): while such a pool cannot be reached after
a restart, its last seen names stay taken; and where two pools hold the same name (nodes that
share storage each took it), the older volume is the one served and the other is reported.

The manager is driven with a stand-in backend here (what RBD pools look like to it: volumes
listed or not, per pool); tests/ceph covers the same with a real cluster."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, cast

import pytest

from blockvirt.storage.backend import Space, VolumeBackend, VolumeRecord
from blockvirt.storage.catalog import SCHEMA_VERSION, Catalog, CatalogError, PoolRecord
from blockvirt.storage.volumes import VolumeManager
from blockvirt.storage.work import JobHost


class Remote:
    """What the manager asks of a backend whose pools keep their own catalog."""

    kind = "remote"

    def __init__(self) -> None:
        self.vols: dict[str, dict[str, VolumeRecord]] = {}  # pool -> name -> record
        self.reached: set[str] = set()

    def volume(self, name: str) -> VolumeRecord | None:
        for pool in sorted(self.reached):
            rec = self.vols.get(pool, {}).get(name)
            if rec is not None:
                return rec
        return None

    def volumes(self) -> list[VolumeRecord]:
        return [r for pool in sorted(self.reached) for r in self.vols.get(pool, {}).values()]

    def listed(self, pool: str) -> bool:
        return pool in self.reached

    def space(self, rec: PoolRecord) -> Space:
        return Space(100 << 30, 1 << 30, 99 << 30, 1 << 30, 2 << 30)

    def pool_error(self, pool: str) -> str | None:
        return None


class Local(Remote):
    kind = "local"

    def listed(self, pool: str) -> bool:
        return True


@pytest.fixture
def catalog(tmp_path: Path) -> Any:
    c = Catalog(str(tmp_path))
    yield c
    c.close()


def manager(catalog: Catalog, *backends: Remote) -> VolumeManager:
    vm = VolumeManager(catalog, cast(JobHost, None))
    for b in backends:
        vm.add_backend(cast(VolumeBackend, b))
    return vm


def pool(catalog: Catalog, name: str, backend: str) -> None:
    catalog.insert_pool(PoolRecord(name, "", time.time(), backend=backend))


def vol(name: str, pool: str, created: float) -> VolumeRecord:
    return VolumeRecord(name, 1 << 20, False, pool, created)


def test_the_catalog_keeps_the_last_names_per_pool_until_the_pool_is_deleted(catalog: Catalog) -> None:
    pool(catalog, "ceph", "remote")
    catalog.remember_names("ceph", ["a", "b", "a"])
    catalog.remember_names("other", ["b"])
    assert catalog.remembered_names("ceph") == {"a", "b"}
    assert catalog.pools_remembering("b") == ["ceph", "other"]
    catalog.remember_names("ceph", ["c"])  # replaces, does not add
    assert catalog.remembered_names("ceph") == {"c"}
    catalog.delete_pool("ceph")
    assert catalog.remembered_names("ceph") == set() and catalog.pools_remembering("c") == []
    (version,) = catalog.db.execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION == 9


def test_names_of_a_pool_not_reached_since_the_start_stay_taken(catalog: Catalog) -> None:
    pool(catalog, "ceph", "remote")
    remote, local = Remote(), Local()
    vm = manager(catalog, local, remote)
    vm.remember_names("ceph", ["db", "web"])  # what the pool held when last reached

    vm = manager(catalog, Local(), Remote())  # a restart: the pool cannot be reached
    assert vm.unreachable_holder("db") == "ceph" and vm.unreachable_holder("other") is None
    with pytest.raises(CatalogError) as e:
        vm._check_new("db", 1 << 20, "ceph")
    assert e.value.kind == "conflict" and "cannot be reached now" in e.value.message
    # The export exists, and opening it says why it cannot be served.
    assert vm.exists("db") and vm.exists("db@s1") and not vm.exists("other")
    with pytest.raises(CatalogError) as e:
        vm.volume("db")
    assert e.value.kind == "unavailable" and "'ceph'" in e.value.message
    assert vm.volume("other") is None
    # Every edit of it says why it cannot be done (not that there is no such volume).
    with pytest.raises(CatalogError) as e:
        vm.locate("web")
    assert e.value.kind == "unavailable" and "which cannot be reached now" in e.value.message
    with pytest.raises(CatalogError) as e:
        vm.locate("other")
    assert e.value.kind == "not-found"
    # Listed by name, as far as no reachable pool serves the name.
    assert vm.unreachable() == [("db", "ceph"), ("web", "ceph")]


def test_once_the_pool_is_reached_its_names_are_what_it_says(catalog: Catalog) -> None:
    pool(catalog, "ceph", "remote")
    remote = Remote()
    vm = manager(catalog, Local(), remote)
    vm.remember_names("ceph", ["gone"])
    remote.reached.add("ceph")  # reached: the volume was deleted meanwhile
    vm.remember_names("ceph", [])
    assert vm.unreachable_holder("gone") is None and not vm.exists("gone")
    assert catalog.remembered_names("ceph") == set()


def test_a_pool_that_no_longer_exists_takes_no_names(catalog: Catalog) -> None:
    vm = manager(catalog, Local(), Remote())
    vm.remember_names("detached", ["x"])  # a late sync of a pool being deleted
    assert vm.unreachable_holder("x") is None


def test_the_older_of_two_volumes_of_one_name_is_served_and_the_other_reported(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    pool(catalog, "ceph", "remote")
    pool(catalog, "disks", "local")
    local, remote = Local(), Remote()
    local.reached.add("disks")
    remote.reached.add("ceph")
    local.vols["disks"] = {"twin": vol("twin", "disks", 100.0), "solo": vol("solo", "disks", 50.0)}
    remote.vols["ceph"] = {"twin": vol("twin", "ceph", 200.0)}  # taken later, on another node
    vm = manager(catalog, remote, local)  # the remote backend is asked first: age decides
    assert vm.record("twin") == vol("twin", "disks", 100.0)
    assert vm.hidden_in("ceph") == [("twin", "disks")] and vm.hidden_in("disks") == []
    assert [(r.name, r.pool) for r in vm.records()] == [("solo", "disks"), ("twin", "disks")]
    with caplog.at_level(logging.WARNING, logger="blockvirt.volumes"):
        vm.remember_names("ceph", ["twin"])
        vm.remember_names("ceph", ["twin"])
    assert [r.getMessage() for r in caplog.records].count(
        "volume twin of pool ceph is hidden: pool disks has a volume of the same name, which is the one "
        "served; delete or move one of them"
    ) == 1  # once, not at every sync
    # The other way round, the remote one is older: it is served.
    remote.vols["ceph"]["twin"] = vol("twin", "ceph", 10.0)
    assert vm.record("twin") == vol("twin", "ceph", 10.0)
    assert vm.hidden_in("disks") == [("twin", "ceph")] and vm.hidden_in("ceph") == []
    assert [(r.name, r.pool) for r in vm.records()] == [("solo", "disks"), ("twin", "ceph")]
    info = vm.pools.info(cast(PoolRecord, catalog.pool("disks")))
    assert "volume twin is hidden by the volume of the same name in pool ceph" in info["warnings"]


class NoJobs:
    def running(self) -> list[Any]:
        return []


async def test_a_pool_not_reached_since_the_start_counts_and_keeps_its_last_seen_volumes(
    catalog: Catalog,
) -> None:
    pool(catalog, "ceph", "remote")
    pool(catalog, "empty", "remote")
    remote = Remote()
    detached: list[str] = []
    remote.pool_in_use = lambda name: None  # type: ignore[attr-defined]  # nothing listed

    async def detach(name: str) -> None:
        detached.append(name)

    remote.detach = detach  # type: ignore[attr-defined]
    vm = VolumeManager(catalog, cast(JobHost, NoJobs()))
    vm.add_backend(cast(VolumeBackend, Local()))
    vm.add_backend(cast(VolumeBackend, remote))
    vm.remember_names("ceph", ["db", "web"])
    info = vm.pools.info(cast(PoolRecord, catalog.pool("ceph")))
    assert info["volumes"] == 2
    assert "2 volume(s) as last seen, unavailable until it is reached" in info["warnings"]
    assert vm.pools.info(cast(PoolRecord, catalog.pool("empty")))["volumes"] == 0
    # It cannot be seen to be empty: detached only when asked to be, and then forgotten.
    with pytest.raises(CatalogError) as e:
        await vm.pools.delete("ceph")
    assert e.value.kind == "conflict"
    assert e.value.message == (
        "pool 'ceph' cannot be reached now; when last reached it held volumes db, web: delete "
        "them once it is back, or detach it anyway with --force (its storage keeps them)"
    )
    assert catalog.pool("ceph") is not None and detached == []
    await vm.pools.delete("empty")  # held nothing when last reached
    await vm.pools.delete("ceph", force=True)
    assert detached == ["empty", "ceph"] and catalog.pool("ceph") is None
    assert catalog.remembered_names("ceph") == set() and vm.unreachable_holder("db") is None
    # Once reached, the count is what the pool lists.
    pool(catalog, "ceph", "remote")
    remote.reached.add("ceph")
    remote.vols["ceph"] = {"db": vol("db", "ceph", 1.0)}
    assert vm.pools.info(cast(PoolRecord, catalog.pool("ceph")))["volumes"] == 1
