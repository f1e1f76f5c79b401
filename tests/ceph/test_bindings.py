"""The Ceph Python bindings are importable and offer what blockvirt's RBD layer calls.

Checked by name because the bindings are compiled (no signatures to introspect); their
behaviour is tested against a real cluster in the other modules here.
"""

from __future__ import annotations

import importlib
import os

import pytest

pytestmark = pytest.mark.ceph

RBD_IMAGE = [
    "aio_read", "aio_write", "aio_discard", "aio_write_zeroes", "aio_flush", "diff_iterate",
    "flatten", "lock_acquire", "lock_release", "lock_get_owners", "lock_break",
    "is_exclusive_lock_owner", "metadata_get", "metadata_set", "metadata_remove",
    "metadata_list", "create_snap", "remove_snap", "rename_snap", "list_snaps", "protect_snap",
    "unprotect_snap", "is_protected_snap", "rollback_to_snap", "get_parent_image_spec",
    "config_list", "resize", "stat",
]  # fmt: skip
RBD_RBD = ["create", "clone", "remove", "rename", "list", "trash_move", "trash_purge", "pool_stats_get"]
RADOS_RADOS = ["get_addrs", "get_instance_id", "wait_for_latest_osdmap", "blocklist_add", "mon_command"]
RADOS_IOCTX = [
    "set_osdmap_full_try", "application_list", "operate_aio_write_op", "operate_read_op",
    "get_omap_vals", "get_omap_vals_by_keys", "set_omap", "remove_omap_keys", "watch", "aio_notify",
]  # fmt: skip


def _module(name: str) -> object:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        what = f"python3-{name} is not importable ({e}); scripts/setup.sh --test installs it"
        if os.environ.get("BLOCKVIRT_REQUIRE_INTEROP") == "1":
            pytest.fail(f"{what} (BLOCKVIRT_REQUIRE_INTEROP=1)", pytrace=False)
        pytest.skip(what)


def test_rbd_binding_offers_what_we_call() -> None:
    rbd = _module("rbd")
    missing = [m for m in RBD_IMAGE if not hasattr(rbd.Image, m)]  # type: ignore[attr-defined]
    missing += [m for m in RBD_RBD if not hasattr(rbd.RBD, m)]  # type: ignore[attr-defined]
    assert not missing
    assert rbd.RBD_FEATURE_FAST_DIFF and rbd.RBD_LOCK_MODE_EXCLUSIVE == 0  # type: ignore[attr-defined]


def test_rados_binding_offers_what_we_call() -> None:
    rados = _module("rados")
    missing = [m for m in RADOS_RADOS if not hasattr(rados.Rados, m)]  # type: ignore[attr-defined]
    missing += [m for m in RADOS_IOCTX if not hasattr(rados.Ioctx, m)]  # type: ignore[attr-defined]
    missing += [m for m in ("omap_cmp", "new", "remove") if not hasattr(rados.WriteOp, m)]  # type: ignore[attr-defined]
    assert not missing
