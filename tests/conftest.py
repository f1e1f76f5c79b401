from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NoReturn

import pytest

from tests.cephcluster import CephCluster, CephClusterError, missing_binaries


def unavailable(what: str) -> NoReturn:
    """Skip, or fail under BLOCKVIRT_REQUIRE_INTEROP=1 (CI: a missing component is a failure)."""
    if os.environ.get("BLOCKVIRT_REQUIRE_INTEROP") == "1":
        pytest.fail(f"{what} (BLOCKVIRT_REQUIRE_INTEROP=1)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """A one-node Ceph (tests/cephcluster.py), started on first use, stopped at session end.

    pytest caches a failure of a session fixture, so a cluster that cannot start costs the
    bring-up attempt once, not once per test."""
    missing = missing_binaries()
    if missing:
        unavailable(f"Ceph is not installed (missing {', '.join(missing)}; scripts/setup.sh --test)")
    cluster = CephCluster()
    try:
        cluster.start()
    except CephClusterError as first:
        # One retry: the mon's ports are picked free just before it binds them.
        cluster = CephCluster()
        try:
            cluster.start()
        except CephClusterError as e:
            unavailable(f"Ceph did not start: {first}\nretry: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
