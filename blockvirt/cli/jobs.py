"""`blockvirt job ...` and `blockvirt migrate ...`: background jobs and live migration."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from blockvirt.cli.client import ApiClient
from blockvirt.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    Parser,
    UsageError,
    add_common,
    emit,
    human_size,
    job_status,
    print_table,
    q,
    size_arg,
    wait_job,
)


def add_parsers(sub: Any) -> None:
    job = sub.add_parser("job", help="background jobs (merges, flattens, migrations)")
    add_common(job, top=False)
    jsub = job.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    jl = jsub.add_parser("list", help="list jobs")
    add_common(jl, top=False)
    js = jsub.add_parser("show", help="show one job")
    add_common(js, top=False)
    js.add_argument("id")
    js.add_argument("--wait", action="store_true", help="wait for it to end, showing progress")
    jc = jsub.add_parser("cancel", help="stop a running migration or flatten (nothing is lost)")
    add_common(jc, top=False)
    jc.add_argument("id")

    mig = sub.add_parser(
        "migrate", help="move a volume and its snapshots to another pool while clients keep using it"
    )
    add_common(mig, top=False)
    mig.add_argument("volume")
    mig.add_argument("--pool", required=True, help="the target pool")
    mig.add_argument("--wait", action="store_true", help="wait for the job, showing progress")
    prov = mig.add_mutually_exclusive_group()
    prov.add_argument("--thick", action="store_const", dest="provisioning", const="thick",
                      help="preallocate the volume in the target (its base layer)")  # fmt: skip
    prov.add_argument("--thin", action="store_const", dest="provisioning", const="thin",
                      help="copy only data, skipping zero blocks")  # fmt: skip
    mig.add_argument("--bps-limit", default="0", metavar="BYTES",
                     help="cap the copy rate, bytes per second (e.g. 100M); 0: no cap")  # fmt: skip


def _job_text(job: dict[str, Any]) -> str:
    lines = [f"{k + ':':12} {v}" for k, v in job.items() if k != "result"]
    for k, v in (job.get("result") or {}).items():
        lines.append(f"{k + ':':12} {v}")
    return "\n".join(lines)


def run_job(args: argparse.Namespace, api: ApiClient) -> int:
    if args.action == "list":
        jobs = api.get("/api/v1/jobs")["jobs"]
        if args.json:
            emit(args, jobs)
        elif not jobs:
            print("no jobs")
        else:
            rows = [{**j, "pct": f"{j['progress']:.0%}"} for j in jobs]
            print_table(
                rows,
                [
                    ("id", "ID"),
                    ("kind", "KIND"),
                    ("volume", "VOLUME"),
                    ("state", "STATE"),
                    ("pct", "PROGRESS"),
                    ("error", "ERROR"),
                ],
            )
    elif args.action == "show":
        if not args.wait:
            job = api.get(f"/api/v1/jobs/{q(args.id)}")
            emit(args, job, _job_text(job))
            return EXIT_OK
        job = wait_job(args, api, args.id)
        emit(args, job, _job_text(job))
        return job_status(job)  # waited for its end: 0 only if it is done
    elif args.action == "cancel":
        job = api.post(f"/api/v1/jobs/{q(args.id)}/cancel", {})
        emit(args, job, f"job {job['id']} ({job['kind']} on {job['volume']}) cancelled")
    else:
        raise UsageError("blockvirt job: choose an action: list, show, cancel")
    return EXIT_OK


def run_migrate(args: argparse.Namespace, api: ApiClient) -> int:
    try:
        bps = size_arg(args.bps_limit, "--bps-limit")
    except UsageError as e:
        raise UsageError(f"blockvirt migrate: --bps-limit: {e}") from None
    body: dict[str, Any] = {"pool": args.pool, "bps_limit": bps}
    if args.provisioning:
        body["provisioning"] = args.provisioning
    job = api.post(f"/api/v1/volumes/{q(args.volume)}/migrate", body)
    if not args.wait:
        emit(args, job, f"migrating {args.volume} to pool {args.pool}: job {job['id']}")
        return EXIT_OK
    job = wait_job(args, api, job["id"])
    if job["state"] == "done":
        res = job.get("result") or {}
        human = f"moved {args.volume} to pool {args.pool}"
        if res:
            human += (
                f" in {res['seconds']:.1f} s ({human_size(res['copied_bytes'])} copied, "
                f"{res['mirrored_writes']} writes mirrored, switchover pause "
                f"{res['pause_seconds'] * 1000:.1f} ms)"
            )
        emit(args, job, human)
        return EXIT_OK
    emit(args, job)
    print(f"blockvirt: error: migration {job['state']}: {job['error'] or 'no details'}", file=sys.stderr)
    return EXIT_ERROR
