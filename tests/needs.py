"""What a test needs from the machine. Missing, the test skips on a developer's machine, but
fails under BLOCKVIRT_REQUIRE_INTEROP=1 (set by scripts/test.sh and CI): there, a test that
did not run must not pass for one that did."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def strict() -> bool:
    return os.environ.get("BLOCKVIRT_REQUIRE_INTEROP") == "1"


def missing(what: str) -> NoReturn:
    """Skip, or under BLOCKVIRT_REQUIRE_INTEROP=1 fail, because `what` is not available."""
    if strict():
        pytest.fail(f"{what} (BLOCKVIRT_REQUIRE_INTEROP=1)", pytrace=False)
    pytest.skip(what)


def need_root(why: str) -> None:
    if os.geteuid() != 0:
        missing(f"needs root: {why}")
