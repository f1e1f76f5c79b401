"""What every CLI command module shares: the parser class, common options, output helpers and
the job progress display."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from typing import Any

from rich.console import Console

from blockvirt.cli.client import ApiClient
from blockvirt.cli.progress import JobProgress
from blockvirt.cli.progress import human_size as human_size  # re-exported

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


def wait_job(args: argparse.Namespace, api: ApiClient, job_id: str) -> dict[str, Any]:
    """Poll a job to its end, drawing a progress bar on a terminal (stderr)."""
    console = Console(file=sys.stderr)
    show = console.is_terminal and not args.json
    with JobProgress(console, disable=not show) as bar:
        while True:
            job: dict[str, Any] = api.get(f"/api/v1/jobs/{q(job_id)}")
            bar.update(job)
            if job["state"] != "running":
                return job
            time.sleep(0.2)


def job_status(job: dict[str, Any]) -> int:
    """Exit status for a job waited on: 0 only if it is done; else say why on stderr."""
    if job["state"] == "done":
        return EXIT_OK
    why = f": {job['error']}" if job.get("error") else ""
    what = f"job {job['id']} ({job['kind']} of {job['volume']})"
    print(f"blockvirt: error: {what} {job['state']}{why}", file=sys.stderr)
    return EXIT_ERROR


def size_arg(text: str, what: str = "size") -> int:
    """A size from the command line (bytes or 10G, ...): UsageError if it is not one."""
    from blockvirt.storage.catalog import CatalogError, parse_size

    if len(text) > 32:  # parse_size goes through float: 400 digits overflow it
        raise UsageError(f"invalid {what} {text[:40]!r}...: too long")
    try:
        return parse_size(text)
    except CatalogError as e:
        raise UsageError(e.message) from None
    except (OverflowError, ValueError):
        raise UsageError(f"invalid {what} {text!r}") from None


def size_type(text: str) -> int:
    """size_arg as an argparse `type`: a bad size is a usage error that names the flag."""
    try:
        return size_arg(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
