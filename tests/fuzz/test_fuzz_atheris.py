"""Run the atheris harness (tools/fuzz/fuzz_nbd.py) on every target for a few seconds, from a
scratch copy of the seed corpus. Skipped when atheris is not installed (scripts/setup.sh
installs it where a wheel exists), unless BLOCKVIRT_REQUIRE_INTEROP=1."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "tools" / "fuzz" / "fuzz_nbd.py"
SECONDS = int(os.environ.get("BLOCKVIRT_ATHERIS_SECONDS", "3"))


@pytest.fixture(scope="module")
def atheris_available() -> None:
    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("BLOCKVIRT_REQUIRE_INTEROP") == "1":
            pytest.fail("atheris is not installed (BLOCKVIRT_REQUIRE_INTEROP=1)", pytrace=False)
        pytest.skip("atheris is not installed")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_atheris_finds_nothing(atheris_available: None, target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "tests" / "fuzz" / "corpus" / target, corpus)
    before = len(list(corpus.iterdir()))
    r = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            target,
            f"-max_total_time={SECONDS}",
            "-rss_limit_mb=1024",  # a target that buffered what a header declares would hit this
            "-max_len=65536",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 60,
        cwd=tmp_path,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*")) + sorted(
        p.name for p in tmp_path.glob("oom-*")
    )
    assert r.returncode == 0 and not crashes, f"{crashes}\n{r.stderr[-3000:]}"
    assert "Done" in r.stderr and "#" in r.stderr, r.stderr[-2000:]  # it did run inputs
    assert len(list(corpus.iterdir())) >= before
