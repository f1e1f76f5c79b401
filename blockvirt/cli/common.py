"""What every CLI command module shares: the parser class, common options, output helpers and
the job progress display."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from typing import Any

from blockvirt.cli.client import ApiClient

DEFAULT_API_URL = "http://127.0.0.1:9810"

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def add_common(p: argparse.ArgumentParser, top: bool) -> None:
    # On subcommands the defaults are suppressed so a global --json/--api is not overwritten.
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument(
        "--api",
        metavar="URL",
        help=f"management API URL (default $BLOCKVIRT_API or {DEFAULT_API_URL})",
        **({"default": None} if top else d),
    )
    p.add_argument(
        "--json", action="store_true", help="machine-readable output", **({"default": False} if top else d)
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="API token (default $BLOCKVIRT_API_TOKEN, or the file $BLOCKVIRT_API_TOKEN_FILE)",
        **({"default": None} if top else d),
    )


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> None:
    cells = [[h for _, h in cols]] + [[str(r.get(k, "")) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def emit(args: argparse.Namespace, data: Any, human: str | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif human is not None:
        print(human)


def q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60:02d}:{seconds % 60:02d}")
    )


def progress_line(job: dict[str, Any], width: int = 30) -> str:
    """`kind [####......]  42.0%` plus bytes, rate and ETA for jobs that move bytes."""
    done = int(job["progress"] * width)
    line = f"{job['kind']} [{'#' * done}{'.' * (width - done)}] {job['progress']:6.1%}"
    if job.get("unit") == "bytes":
        line += f"  {human_size(job['done'])}/{human_size(job['total'])}"
        rate = job.get("rate")
        if rate is not None:
            line += f"  {human_size(rate)}/s  ETA {eta_text(job.get('eta_seconds'))}"
    return line


def wait_job(args: argparse.Namespace, api: ApiClient, job_id: str) -> dict[str, Any]:
    """Poll a job to its end, drawing a progress bar on a terminal."""
    tty = sys.stderr.isatty() and not args.json
    shown = 0
    while True:
        job: dict[str, Any] = api.get(f"/api/v1/jobs/{q(job_id)}")
        if tty:
            line = progress_line(job)
            print("\r" + line.ljust(shown), end="", file=sys.stderr)
            shown = len(line)
        if job["state"] != "running":
            if tty:
                print(file=sys.stderr)
            return job
        time.sleep(0.2)
