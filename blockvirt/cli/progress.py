"""The job progress bar (`--wait`), drawn by rich: a bar, done/total, rate and ETA.

The server reports `done`, `total` and a `unit` ("bytes", or "pages" for jobs that count
pages), and while running a `rate` (units per second) and `eta_seconds`, either of which may
be null: then rich's own estimate from the samples it saw stands in, or "?" when it has none.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TextColumn
from rich.text import Text


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA ?"
    s = max(0, int(seconds))
    return f"ETA {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _amount(n: float, unit: str) -> str:
    return human_size(n) if unit == "bytes" else f"{n:.0f}"


class AmountColumn(ProgressColumn):
    """`12.0 MiB/64.0 MiB`, or `120/4096 pages`."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "bytes")
        total = "?" if task.total is None else _amount(task.total, unit)
        suffix = "" if unit == "bytes" else f" {unit}"
        return Text(f"{_amount(task.completed, unit)}/{total}{suffix}")


class RateColumn(ProgressColumn):
    """The server's rate; rich's estimate when the server has none yet."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "bytes")
        rate = task.fields.get("rate")
        if rate is None:
            rate = task.speed
        if rate is None:
            return Text("? /s")
        return Text(f"{human_size(rate)}/s" if unit == "bytes" else f"{rate:.0f} {unit}/s")


class EtaColumn(ProgressColumn):
    """The server's ETA; rich's estimate when the server has none."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("done")
        eta = task.fields.get("eta")
        return Text(eta_text(eta if eta is not None else task.time_remaining))


def make_progress(console: Console, *, disable: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=30),
        TaskProgressColumn(),
        AmountColumn(),
        RateColumn(),
        EtaColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


class JobProgress:
    """One job's bar: `update(job)` with each polled JOB object."""

    def __init__(self, console: Console, *, disable: bool = False) -> None:
        self.progress = make_progress(console, disable=disable)
        self._task: Any = None

    def __enter__(self) -> JobProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, job: dict[str, Any]) -> None:
        total = job.get("total") or None  # 0: not known yet
        unit, rate, eta = job.get("unit") or "bytes", job.get("rate"), job.get("eta_seconds")
        description = f"{job.get('kind', 'job')} {job.get('volume', '')}".strip()
        if self._task is None:
            self._task = self.progress.add_task(description, total=total, unit=unit, rate=rate, eta=eta)
        self.progress.update(
            self._task,
            total=total,
            completed=job.get("done") or 0,
            description=description,
            unit=unit,
            rate=rate,
            eta=eta,
        )
