"""A test that cannot run because the machine lacks something skips on a developer's machine
and fails under BLOCKVIRT_REQUIRE_INTEROP=1, root-only tests included (issue 15, item 14)."""

from __future__ import annotations

import os

import pytest

from tests import needs


def test_missing_skips_on_a_developers_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLOCKVIRT_REQUIRE_INTEROP", raising=False)
    with pytest.raises(pytest.skip.Exception, match="qemu-io not found"):
        needs.missing("qemu-io not found")


def test_missing_fails_under_require_interop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKVIRT_REQUIRE_INTEROP", "1")
    with pytest.raises(pytest.fail.Exception, match="qemu-io not found"):
        needs.missing("qemu-io not found")


def test_a_root_only_test_run_as_another_user_fails_under_require_interop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    monkeypatch.setenv("BLOCKVIRT_REQUIRE_INTEROP", "1")
    with pytest.raises(pytest.fail.Exception, match="needs root: loop devices"):
        needs.need_root("loop devices")
    monkeypatch.delenv("BLOCKVIRT_REQUIRE_INTEROP")
    with pytest.raises(pytest.skip.Exception):
        needs.need_root("loop devices")


def test_root_runs_root_only_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("BLOCKVIRT_REQUIRE_INTEROP", "1")
    needs.need_root("loop devices")  # no skip, no failure
