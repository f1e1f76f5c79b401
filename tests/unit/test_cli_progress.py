"""The CLI's job progress bar, rendered by rich to a captured (non-terminal) console."""

from __future__ import annotations

import io
import re
from typing import Any

from rich.console import Console

from blockvirt.cli.progress import JobProgress

MiB = 1 << 20


def render(*jobs: dict[str, Any]) -> str:
    buf = io.StringIO()
    with JobProgress(Console(file=buf, width=120, force_terminal=False)) as bar:
        for job in jobs:
            bar.update(job)
    return buf.getvalue()


def job(**kw: Any) -> dict[str, Any]:
    base = {"id": "j1", "kind": "migrate", "volume": "disk", "state": "running", "unit": "bytes"}
    return {**base, **kw}


def test_bytes_with_rate_and_eta() -> None:
    out = render(job(done=12 * MiB, total=64 * MiB, rate=4 * MiB, eta_seconds=13))
    assert "migrate disk" in out
    assert "19%" in out
    assert "12.0 MiB/64.0 MiB" in out
    assert "4.0 MiB/s" in out
    assert "ETA 0:00:13" in out
    assert re.search(r"━+", out), out  # the bar itself


def test_pages_without_rate_or_eta() -> None:
    out = render(job(kind="merge", done=120, total=4096, unit="pages", rate=None, eta_seconds=None))
    assert "merge disk" in out and "3%" in out
    assert "120/4096 pages" in out
    assert "? /s" in out and "ETA ?" in out


def test_later_updates_replace_earlier_ones() -> None:
    out = render(
        job(done=0, total=0, rate=None, eta_seconds=None),  # total not known yet
        job(done=32 * MiB, total=64 * MiB, rate=8 * MiB, eta_seconds=4),
        job(done=64 * MiB, total=64 * MiB, state="done", rate=None, eta_seconds=None),
    )
    assert out.count("\n") == 1, out  # one line: the final state
    assert "100%" in out and "64.0 MiB/64.0 MiB" in out and "done" in out


def test_hours_and_large_totals() -> None:
    out = render(job(done=MiB, total=1 << 40, rate=MiB, eta_seconds=3 * 3600 + 61))
    assert "ETA 3:01:01" in out and "1.0 MiB/1.0 TiB" in out
