"""`blockvirt pool ...`: create, list, info, set, delete storage pools."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from blockvirt.cli.client import ApiClient
from blockvirt.cli.common import (
    EXIT_OK,
    Parser,
    UsageError,
    add_common,
    emit,
    human_size,
    print_table,
    q,
    size_type,
)

#: Settings flags shared by `pool create` and `pool set`: (flag, API key, type, help).
SETTINGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--warn-percent", "warn_percent", float, "used %% at which the pool turns to warning (default 80)"),
    ("--critical-percent", "critical_percent", float, "used %% at which it turns critical (default 90)"),
    ("--iops-capacity", "iops_capacity", float, "QoS: 4 KiB I/Os per second the pool can serve (0: no cap)"),
    ("--latency-target", "latency_target_ms", float, "QoS: ms above which the capacity shrinks (0: off)"),
    ("--cost-s0", "cost_s0", int, "QoS: request cost = (1 + bytes/S0) / (1 + 4096/S0); S0 in bytes"),
    ("--background-shares", "background_shares", int, "QoS: shares of migration copies (disks: 1000)"),
    (
        "--alloc-unit",
        "alloc_unit",
        size_type,
        "file pools: thin volumes grow by units this large (64K-64M; 0: 4K)",
    ),
]


def add_parser(sub: Any) -> None:
    pool = sub.add_parser("pool", help="manage storage pools")
    add_common(pool, top=False)
    psub = pool.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    pc = psub.add_parser(
        "create", help="add a pool: a new or empty directory (--path), or a Ceph RBD pool (--rbd)"
    )
    add_common(pc, top=False)
    pc.add_argument("name")
    where = pc.add_mutually_exclusive_group(required=True)
    where.add_argument("--path", help="a new or empty directory (a file pool)")
    where.add_argument(
        "--rbd",
        metavar="CEPHPOOL[/NAMESPACE]",
        help="an existing Ceph pool initialised for RBD (and an RBD namespace in it)",
    )
    pc.add_argument("--ceph-conf", metavar="FILE", help="the cluster's ceph.conf (default: Ceph's own)")
    pc.add_argument("--ceph-user", metavar="ID", help="the Ceph client id (client.ID; default admin)")
    _settings_flags(pc)
    pl = psub.add_parser("list", help="list pools with their space")
    add_common(pl, top=False)
    for action, helptext in (
        ("info", "show a pool: space, overcommit, watermark state, settings"),
        ("delete", "forget an empty pool (its directory is removed if empty)"),
    ):
        p = psub.add_parser(action, help=helptext)
        add_common(p, top=False)
        p.add_argument("name")
        if action == "delete":
            p.add_argument(
                "--force",
                action="store_true",
                help="detach an RBD pool that cannot be reached although it held volumes when "
                "last seen (Ceph keeps them; attaching the pool again brings them back)",
            )
    pcal = psub.add_parser(
        "calibrate", help="measure the pool's device (direct I/O) and set its QoS capacity and cost model"
    )
    add_common(pcal, top=False)
    pcal.add_argument("name")
    pcal.add_argument("--seconds", type=float, default=4.0, help="how long to measure (default 4)")
    pcal.add_argument("--dry-run", action="store_true", help="measure only; change nothing")
    ps = psub.add_parser("set", help="change a pool's settings (watermarks, QoS capacity)")
    add_common(ps, top=False)
    ps.add_argument("name")
    _settings_flags(ps)


def _settings_flags(p: argparse.ArgumentParser) -> None:
    for flag, key, kind, helptext in SETTINGS:
        p.add_argument(flag, dest=key, type=kind, default=None, help=helptext)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for _, key, _, _ in SETTINGS if getattr(args, key, None) is not None}


def _ceph_where(p: dict[str, Any]) -> str:
    """An RBD pool has no directory: which Ceph pool (and namespace) it is."""
    rbd = p.get("rbd") or {}
    ns = rbd.get("namespace")
    return f"{p.get('backend')}:{rbd.get('pool', '?')}" + (f"/{ns}" if ns else "")


def _size(v: int | None) -> str:
    return human_size(v) if v is not None else "?"


def info_text(p: dict[str, Any]) -> str:
    s = p["settings"]
    over = f"{p['overcommit']:.2f}x" if p.get("overcommit") is not None else "?"
    used_pct = f" ({p['used_percent']:.1f}%)" if p.get("used_percent") is not None else ""
    cap = f"{s['iops_capacity']:g} IOPS" if s["iops_capacity"] else "not capped"
    lines = [
        f"name:         {p['name']}",
        (
            f"path:         {p['path']}"
            if p.get("backend", "file") == "file"
            else f"rbd:          Ceph pool {p['rbd']['pool']}"
            + (f", namespace {p['rbd']['namespace']}" if p["rbd"].get("namespace") else "")
            + (f" ({p['rbd']['conf']})" if p["rbd"].get("conf") else "")
        ),
        f"state:        {p['state']}",
        f"capacity:     {_size(p['capacity'])}",
        f"used:         {_size(p['used'])}{used_pct}",
        f"free:         {_size(p['free'])}",
        f"allocated:    {_size(p['allocated'])} (blockvirt volumes)",
        f"provisioned:  {_size(p['provisioned'])} in {p['volumes']} volume(s), overcommit {over}",
        f"watermarks:   warning at {s['warn_percent']:g}%, critical at {s['critical_percent']:g}%",
        f"qos:          {cap}, latency target "
        + (f"{s['latency_target_ms']:g} ms" if s["latency_target_ms"] else "off"),
    ]
    if p.get("backend", "file") == "file" and "alloc_unit" in s:
        unit = s["alloc_unit"]
        lines.append(f"thin growth:  {_size(unit) + ' units' if unit else 'by file-system blocks'}")
    lines += [f"warning:      {w}" for w in p.get("warnings", [])]
    return "\n".join(lines)


def run(args: argparse.Namespace, api: ApiClient) -> int:
    if args.action == "create":
        body: dict[str, Any] = {"name": args.name}
        if args.rbd is not None:
            ceph_pool, _, namespace = args.rbd.partition("/")
            rbd: dict[str, Any] = {"pool": ceph_pool}
            if namespace:
                rbd["namespace"] = namespace
            if args.ceph_conf is not None:
                rbd["conf"] = os.path.abspath(args.ceph_conf)
            if args.ceph_user is not None:
                rbd["user"] = args.ceph_user
            body["rbd"] = rbd
        else:
            if args.ceph_conf is not None or args.ceph_user is not None:
                raise UsageError("blockvirt pool create: --ceph-conf and --ceph-user go with --rbd")
            body["path"] = args.path
        if settings := _settings(args):
            body["settings"] = settings
        rec = api.post("/api/v1/pools", body)
        where = f"on Ceph pool {args.rbd}" if args.rbd is not None else f"at {rec['path']}"
        emit(args, rec, f"created pool {rec['name']} {where}")
    elif args.action == "list":
        pools = api.get("/api/v1/pools")["pools"]
        if args.json:
            emit(args, pools)
        else:
            rows = [
                {
                    **p,
                    # An RBD pool has no directory: say which Ceph pool it is.
                    "where": p["path"] or _ceph_where(p),
                    "cap_h": _size(p["capacity"]),
                    "free_h": _size(p["free"]),
                    "prov_h": _size(p["provisioned"]),
                    "over_h": f"{p['overcommit']:.2f}x" if p.get("overcommit") is not None else "?",
                }
                for p in pools
            ]
            print_table(
                rows,
                [
                    ("name", "NAME"),
                    ("where", "PATH"),
                    ("cap_h", "CAPACITY"),
                    ("free_h", "FREE"),
                    ("prov_h", "PROVISIONED"),
                    ("over_h", "OVERCOMMIT"),
                    ("state", "STATE"),
                ],
            )
    elif args.action == "info":
        p = api.get(f"/api/v1/pools/{q(args.name)}")
        emit(args, p, info_text(p))
    elif args.action == "set":
        settings = _settings(args)
        if not settings:
            raise UsageError("blockvirt pool set: give at least one setting to change (see --help)")
        p = api.request("PATCH", f"/api/v1/pools/{q(args.name)}", settings)
        emit(args, p, info_text(p))
    elif args.action == "calibrate":
        r = api.post(
            f"/api/v1/pools/{q(args.name)}/calibrate", {"seconds": args.seconds, "apply": not args.dry_run}
        )
        how = "direct I/O" if r["direct_io"] else "buffered I/O (this filesystem refuses direct I/O)"
        human = (
            f"pool {r['pool']}: {r['iops_4k']:g} IOPS at 4 KiB, {r['iops_1m']:g} at 1 MiB "
            f"({human_size(r['bandwidth_bytes_per_second'])}/s), {how}\n"
            f"capacity {r['iops_capacity']:g} IOPS (90% of the 4 KiB rate), "
            f"cost model S0 = {r['cost_s0']} bytes"
            + ("; applied" if r["applied"] else "; not applied (--dry-run)")
        )
        emit(args, r, human)
    elif args.action == "delete":
        api.delete(f"/api/v1/pools/{q(args.name)}" + ("?force=true" if args.force else ""))
        emit(args, {"deleted": args.name}, f"deleted pool {args.name}")
    else:
        raise UsageError("blockvirt pool: choose an action: create, list, info, set, calibrate, delete")
    return EXIT_OK
