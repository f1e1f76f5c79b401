"""`blockvirt` command line. main(argv) -> exit status; errors are one clear line, never a
traceback. Every command takes --api URL (default $BLOCKVIRT_API), --json, and --token-file
FILE (else the API token comes from $BLOCKVIRT_API_TOKEN or the file $BLOCKVIRT_API_TOKEN_FILE)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from blockvirt.cli import jobs, nodes, pools, qos
from blockvirt.cli.client import ApiClient, ApiError
from blockvirt.cli.common import (
    DEFAULT_API_URL,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    UsageError,
    add_common,
    emit,
    human_size,
    job_status,
    print_table,
    q,
    size_arg,
    size_type,
    wait_job,
)

# Shared helpers, under the names this module has always used.
_Parser = Parser
_human_size = human_size
_print_table = print_table
_emit = emit
_q = q
_wait_job = wait_job


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    add_common(p, top)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return n


def _seconds(text: str) -> float:
    try:
        n = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= n <= 86400 * 365:
        raise argparse.ArgumentTypeError(f"out of range: {text!r}")
    return n


def _positive_seconds(text: str) -> float:
    n = _seconds(text)
    if n <= 0:  # librados reads 0 as "wait for ever"
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return n


def _busy_poll(text: str) -> float:
    n = _seconds(text)
    if n > 10000:
        raise argparse.ArgumentTypeError(f"at most 10000 microseconds: {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="blockvirt", description="blockvirt storage virtualization service")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--data-dir", default="./blockvirt-data", help="data directory (default %(default)s)")
    serve.add_argument(
        "--node-name",
        metavar="NAME",
        help="this node's name among the nodes sharing an RBD pool (default: the host name)",
    )
    serve.add_argument("--nbd", default="127.0.0.1:10809", metavar="HOST:PORT", help="NBD listen address")
    serve.add_argument(
        "--api",
        dest="api_listen",
        default="127.0.0.1:9810",
        metavar="HOST:PORT",
        help="API and /metrics listen address",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="json: one object per line"
    )
    serve.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="no per-volume accounting on the data path; /metrics and volume stats answer an error",
    )
    serve.add_argument(
        "--no-zero-copy",
        dest="zero_copy",
        action="store_false",
        help="copy every read into a buffer before sending it (default: reads of 64 KiB and "
        "more that the page cache holds are sent from it directly; see docs/performance.md)",
    )
    serve.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="event loop: asyncio's own (default) or uvloop (pip install blockvirt[fast]); "
        "see docs/performance.md",
    )
    serve.add_argument(
        "--busy-poll-us",
        type=_busy_poll,
        default=None,
        metavar="US",
        help="while requests keep coming, poll for the next one this many microseconds before "
        "sleeping (lower queue-depth-1 latency; 0: off; default 100; asyncio loop only)",
    )
    serve.add_argument("--ready-file", help="write {nbd, api, pid} as JSON here once listening")
    serve.add_argument(
        "--fault-injection",
        action="store_true",
        help="testing only: let /api/v1/debug/faults make pools fail or slow down",
    )
    serve.add_argument("--tls-dir", metavar="DIR", help="ca-cert.pem, server-cert.pem, server-key.pem")
    serve.add_argument(
        "--tls",
        choices=["require", "allow"],
        help="with --tls-dir: require TLS (STARTTLS) before anything else, or allow both (default require)",
    )
    serve.add_argument(
        "--warn-depth", type=int, default=16, metavar="N", help="warn when a chain grows past N layers"
    )
    serve.add_argument(
        "--shutdown-deadline",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a stop waits at most this long for clients to finish their requests, as long for "
        "API requests, and as long for storage that does not answer (the last flushes; each Ceph "
        "cluster, as does a pool delete) (default 10)",
    )
    serve.add_argument(
        "--api-token-file",
        metavar="FILE",
        help="clients must send this file's token (Authorization: Bearer); needed off loopback",
    )
    lim = serve.add_argument_group("connection limits and timeouts")
    lim.add_argument("--max-connections", type=_positive_int, default=1024, metavar="N")
    lim.add_argument(
        "--max-connections-per-address",
        type=_positive_int,
        default=512,
        metavar="N",
        help="from one client IP",
    )
    lim.add_argument(
        "--handshake-timeout", type=_seconds, default=30.0, metavar="SECONDS", help="connect to transmission"
    )
    lim.add_argument(
        "--request-timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="a request that started arriving must be complete by then (0: off)",
    )
    lim.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="end sessions with nothing in flight for this long (default 0: off)",
    )
    lim.add_argument(
        "--max-inflight", type=_positive_int, default=64, metavar="N", help="requests per connection"
    )
    lim.add_argument(
        "--max-inflight-bytes",
        type=size_type,
        default="128M",
        metavar="SIZE",
        help="READ/WRITE bytes in flight per connection",
    )
    lim.add_argument(
        "--max-inflight-bytes-total",
        type=size_type,
        default="1G",
        metavar="SIZE",
        help="READ/WRITE bytes in flight over all connections (unread replies included)",
    )

    api_lim = serve.add_argument_group("API connection limits")
    api_lim.add_argument(
        "--api-header-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="a request head must be complete this long after connect or the previous answer",
    )
    api_lim.add_argument(
        "--api-body-timeout", type=_seconds, default=30.0, metavar="SECONDS", help="for a request body"
    )
    api_lim.add_argument("--api-max-connections", type=_positive_int, default=256, metavar="N")
    ceph = serve.add_argument_group("Ceph RBD pools")
    ceph.add_argument(
        "--ceph-op-timeout",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="a read, write or other op the cluster does not answer fails (EIO) after this long",
    )
    ceph.add_argument(
        "--ceph-connect-timeout",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="reaching a cluster (at start, pool create, retries) gives up after this long",
    )
    # Testing: how often an unreachable pool is tried again, and its figures looked at.
    ceph.add_argument("--ceph-retry-interval", type=_positive_seconds, default=5.0, help=argparse.SUPPRESS)
    ceph.add_argument("--ceph-figures-interval", type=_positive_seconds, default=10.0, help=argparse.SUPPRESS)
    ceph.add_argument(
        "--ceph-binding-callbacks",
        action="store_true",
        help="complete RBD I/O through python3-rbd's per-op Python callbacks instead of librbd's "
        "C API and an eventfd (slower; for comparison, or if the C path misbehaves)",
    )

    vol = sub.add_parser("volume", help="manage volumes")
    _common(vol, top=False)
    vsub = vol.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    c = vsub.add_parser("create", help="create a volume")
    _common(c, top=False)
    c.add_argument("name")
    c.add_argument("--size", required=True, help="virtual size: bytes or 512M, 10G, 1T ...")
    c.add_argument("--thick", action="store_true", help="allocate and zero all space now")
    c.add_argument("--pool", default="default")
    for action, helptext in (("list", "list volumes"),):
        p = vsub.add_parser(action, help=helptext)
        _common(p, top=False)
    for action, helptext in (
        ("info", "show one volume"),
        ("delete", "delete a volume and its data"),
        ("stats", "I/O served since the export was opened: ops, bytes, busy time (NAME or VOL@SNAP)"),
        ("reset", "reopen a failed volume from its files once the device is fixed (no clients connected)"),
    ):
        p = vsub.add_parser(action, help=helptext)
        _common(p, top=False)
        p.add_argument("name")
    vc = vsub.add_parser("clone", help="linked clone of a snapshot: volume clone VOL@SNAP NEW")
    _common(vc, top=False)
    vc.add_argument("source", metavar="VOL@SNAP")
    vc.add_argument("name", metavar="NEW")
    vr = vsub.add_parser("resize", help="grow a volume live, or shrink it (--force, no clients connected)")
    _common(vr, top=False)
    vr.add_argument("name")
    vr.add_argument("size", help="new virtual size: bytes or 512M, 10G, 1T ...")
    vr.add_argument("--force", action="store_true", help="allow shrinking (data past the new end is lost)")
    va = vsub.add_parser("acl", help="access rules: who may open the volume (show, add, remove, clear)")
    _common(va, top=False)
    asub = va.add_subparsers(dest="acl_action", metavar="ACTION", parser_class=_Parser)
    a = asub.add_parser("show", help="list the rules (none: open to everyone)")
    _common(a, top=False)
    a.add_argument("name")
    a = asub.add_parser("add", help="allow clients by certificate CN, SAN, or source address")
    _common(a, top=False)
    a.add_argument("name")
    who = a.add_mutually_exclusive_group(required=True)
    who.add_argument("--cn", help="the CN of a TLS client certificate")
    who.add_argument(
        "--san", help="a subjectAltName of it: DNS:host, IP:addr, email:x, URI:x, or a bare value"
    )
    who.add_argument("--address", metavar="CIDR", help="a source address or network: 10.0.0.0/8, ::1")
    a.add_argument("--read-only", action="store_true", help="matching clients get the volume read-only")
    a = asub.add_parser("remove", help="remove one rule by its id")
    _common(a, top=False)
    a.add_argument("name")
    a.add_argument("rule_id", metavar="RULE-ID")
    a = asub.add_parser("clear", help="remove every rule: the volume is open to everyone again")
    _common(a, top=False)
    a.add_argument("name")
    nodes.add_move(vsub)
    vf = vsub.add_parser("flatten", help="copy shared data in so the volume stands alone (a job)")
    _common(vf, top=False)
    vf.add_argument("name")
    vf.add_argument("--wait", action="store_true", help="wait for the job, showing progress")

    snap = sub.add_parser("snapshot", help="manage snapshots")
    _common(snap, top=False)
    ssub = snap.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    for action, helptext in (
        ("create", "snapshot a volume (instant; clients stay connected)"),
        ("revert", "put the volume back on a snapshot (newer snapshots are kept)"),
        ("delete", "delete a snapshot (its data is merged into its child)"),
    ):
        p = ssub.add_parser(action, help=helptext)
        _common(p, top=False)
        p.add_argument("volume")
        p.add_argument("snapshot")
        if action == "revert":
            p.add_argument("--force", action="store_true", help="disconnect connected clients")
        if action == "delete":
            p.add_argument("--wait", action="store_true", help="wait for the merge job")
    sl = ssub.add_parser("list", help="show a volume's snapshot tree")
    _common(sl, top=False)
    sl.add_argument("volume")
    sd = ssub.add_parser("diff", help="what changed between two snapshots, or since one (incremental backup)")
    _common(sd, top=False)
    sd.add_argument("volume")
    sd.add_argument("since", help="the older snapshot")
    sd.add_argument("until", nargs="?", help="the newer snapshot (default: the volume now)")

    jobs.add_parsers(sub)

    chk = sub.add_parser("check", help="offline consistency check of a data directory")
    _common(chk, top=False)
    chk.add_argument("--data-dir", default="./blockvirt-data")
    chk.add_argument("--repair", action="store_true", help="fix what can be fixed safely")

    pools.add_parser(sub)
    qos.add_parser(sub)
    nodes.add_parser(sub)
    return parser


def _volume_row(v: dict[str, Any]) -> dict[str, Any]:
    if v.get("state") == "unavailable":  # its pool cannot be reached: known by name only
        return {**v, "size_h": "?", "alloc_h": "?", "kind": "unavailable"}
    return {
        **v,
        "size_h": _human_size(v["size"]),
        "alloc_h": _human_size(v["allocated"]),
        "kind": "thick" if v["thick"] else "thin",
    }


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import faulthandler

    # A crash inside a native library (librados, librbd, libnbd) leaves the Python stack of
    # every thread in the log instead of just an exit status.
    faulthandler.enable()

    from blockvirt import logs
    from blockvirt.api.auth import TokenError
    from blockvirt.api.server import ApiLimits
    from blockvirt.server.limits import Limits
    from blockvirt.server.tls import TLSConfigError
    from blockvirt.service import ConfigError, RbdTuning, Service, ServiceConfig, parse_hostport
    from blockvirt.storage.catalog import NAME_RE

    try:
        if args.node_name is not None and not NAME_RE.fullmatch(args.node_name):
            raise ValueError(
                f"invalid node name {args.node_name!r}: use 1-64 letters, digits, '.', '_' or '-'"
            )
        nbd_host, nbd_port = parse_hostport(args.nbd, "--nbd")
        api_host, api_port = parse_hostport(args.api_listen, "--api")
        limits = Limits(
            max_connections=args.max_connections,
            max_connections_per_address=args.max_connections_per_address,
            handshake_timeout=args.handshake_timeout,
            request_timeout=args.request_timeout,
            idle_timeout=args.idle_timeout,
            max_inflight=args.max_inflight,
            max_inflight_bytes=args.max_inflight_bytes,
            max_inflight_bytes_total=args.max_inflight_bytes_total,
        )
        api_limits = ApiLimits(
            header_timeout=args.api_header_timeout,
            body_timeout=args.api_body_timeout,
            max_connections=args.api_max_connections,
        )
    except ValueError as e:
        raise UsageError(f"blockvirt serve: {e}") from None
    if args.tls and not args.tls_dir:
        raise UsageError("blockvirt serve: --tls needs --tls-dir DIR")
    logs.setup(args.log_level, args.log_format, sys.stderr)
    cfg = ServiceConfig(
        data_dir=args.data_dir,
        nbd_host=nbd_host,
        nbd_port=nbd_port,
        api_host=api_host,
        api_port=api_port,
        shutdown_deadline=args.shutdown_deadline,
        ready_file=args.ready_file,
        warn_depth=args.warn_depth,
        tls_dir=args.tls_dir,
        tls_mode=args.tls or "require",
        metrics=args.metrics,
        zero_copy=args.zero_copy,
        fault_injection=args.fault_injection,
        api_token_file=args.api_token_file,
        limits=limits,
        api_limits=api_limits,
        node_name=args.node_name,
        rbd=RbdTuning(
            connect_timeout=args.ceph_connect_timeout,
            op_timeout=args.ceph_op_timeout,
            retry_interval=args.ceph_retry_interval,
            figures_interval=args.ceph_figures_interval,
            native_aio=not args.ceph_binding_callbacks,
            let_go_timeout=args.shutdown_deadline,
        ),
    )
    from blockvirt.server.polling import DEFAULT_WINDOW_US, new_loop

    busy_poll = args.busy_poll_us
    if busy_poll is None:
        busy_poll = DEFAULT_WINDOW_US if args.loop == "asyncio" else 0.0
    elif busy_poll and args.loop != "asyncio":
        raise UsageError("blockvirt serve: --busy-poll-us needs --loop asyncio (uvloop has no hook for it)")
    try:
        loop = new_loop(args.loop, busy_poll)
    except ImportError:
        raise UsageError("blockvirt serve: --loop uvloop needs uvloop (blockvirt[fast])") from None
    try:
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            runner.run(Service(cfg).run())
    except (TLSConfigError, ConfigError, TokenError) as e:
        print(f"blockvirt serve: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        print(f"blockvirt serve: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    _exit_if_stuck()
    return EXIT_OK


def _exit_if_stuck() -> None:
    """The stop gave up on calls to a Ceph cluster that does not answer (their threads are
    still inside librados, until its op timeout): end now instead of letting Python join
    those threads at exit. Everything of ours is closed by then."""
    from blockvirt.storage import executor

    stuck = executor.stuck_threads()
    if stuck:
        logging.getLogger("blockvirt.service").warning(
            "exiting without waiting for %d call(s) to unreachable storage", stuck
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)


def _volume(args: argparse.Namespace, api: ApiClient) -> int:
    action = args.action
    if action == "create":
        size = size_arg(args.size)
        info = api.post(
            "/api/v1/volumes", {"name": args.name, "size": size, "thick": args.thick, "pool": args.pool}
        )
        kind = "thick" if info["thick"] else "thin"
        _emit(args, info, f"created {kind} volume {info['name']} ({_human_size(info['size'])})")
    elif action == "list":
        vols = api.get("/api/v1/volumes")["volumes"]
        if args.json:
            _emit(args, vols)
        elif not vols:
            print("no volumes")
        else:
            _print_table(
                [_volume_row(v) for v in vols],
                [
                    ("name", "NAME"),
                    ("size_h", "SIZE"),
                    ("alloc_h", "ALLOCATED"),
                    ("kind", "TYPE"),
                    ("pool", "POOL"),
                    ("connections", "CONNECTIONS"),
                ],
            )
    elif action == "info":
        v = api.get(f"/api/v1/volumes/{_q(args.name)}")
        r = _volume_row(v)
        _emit(
            args,
            v,
            "\n".join(
                [
                    f"name:        {v['name']}",
                    f"size:        {r['size_h']} ({v['size']} bytes)",
                    f"allocated:   {r['alloc_h']} ({v['allocated']} bytes)",
                    f"type:        {r['kind']}",
                    f"pool:        {v['pool']}",
                    f"snapshots:   {v.get('snapshots', 0)} (chain depth {v.get('chain_depth', 1)})",
                    f"connections: {v['connections']}",
                    f"state:       {v.get('state', 'ok')}" + (f" ({v['error']})" if v.get("error") else ""),
                ]
            ),
        )
    elif action == "stats":
        st = api.get(f"/api/v1/volumes/{_q(args.name)}/stats")
        _emit(args, st, _stats_text(st))
    elif action == "delete":
        api.delete(f"/api/v1/volumes/{_q(args.name)}")
        _emit(args, {"deleted": args.name}, f"deleted volume {args.name}")
    elif action == "clone":
        info = api.post("/api/v1/volumes", {"name": args.name, "source": args.source})
        _emit(args, info, f"created volume {info['name']} as a linked clone of {args.source}")
    elif action == "reset":
        info = api.post(f"/api/v1/volumes/{_q(args.name)}/reset", {})
        _emit(args, info, f"reset volume {args.name}: {info['state']}")
    elif action == "resize":
        size = size_arg(args.size)
        info = api.post(f"/api/v1/volumes/{_q(args.name)}/resize", {"size": size, "force": args.force})
        old = info["resized_from"]
        verb = "grew" if info["size"] > old else "shrank" if info["size"] < old else "kept"
        human = f"{verb} volume {args.name}: {_human_size(old)} -> {_human_size(info['size'])}"
        if info["size"] > old and info["connections"]:
            human += " (connected clients see the new size when they reconnect or query it)"
        _emit(args, info, human)
    elif action == "acl":
        return _acl(args, api)
    elif action == "move":
        return nodes.run_move(args, api)
    elif action == "flatten":
        job = api.post(f"/api/v1/volumes/{_q(args.name)}/flatten", {})
        if args.wait:
            job = _wait_job(args, api, job["id"])
        _emit(args, job, f"flatten of {args.name}: job {job['id']} {job['state']}")
        # Not waited for, a running job is success; waited for, only a done one is.
        return job_status(job) if args.wait else EXIT_OK
    else:
        raise UsageError(
            "blockvirt volume: choose an action: "
            "create, list, info, stats, delete, resize, reset, clone, flatten, acl, move"
        )
    return EXIT_OK


def _acl_text(acl: dict[str, Any]) -> str:
    if not acl["rules"]:
        return f"{acl['volume']}: no access rules (open to every client)"
    rows = [
        {
            "id": r["id"],
            "kind": r["kind"],
            "value": r["value"],
            "access": "read-only" if r["read_only"] else "read-write",
        }
        for r in acl["rules"]
    ]
    cols = [("id", "ID"), ("kind", "KIND"), ("value", "MATCHES"), ("access", "ACCESS")]
    cells = [[h for _, h in cols]] + [[str(r[k]) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [f"{acl['volume']}: only clients matching a rule may connect"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _acl(args: argparse.Namespace, api: ApiClient) -> int:
    action = getattr(args, "acl_action", None)
    if action is None:
        raise UsageError("blockvirt volume acl: choose an action: show, add, remove, clear")
    base = f"/api/v1/volumes/{_q(args.name)}/acl"
    if action == "show":
        acl = api.get(base)
        _emit(args, acl, _acl_text(acl))
    elif action == "add":
        kind, value = next((k, getattr(args, k)) for k in ("cn", "san", "address") if getattr(args, k))
        rule = api.post(base, {"kind": kind, "value": value, "read_only": args.read_only})
        access = "read-only" if rule["read_only"] else "read-write"
        _emit(args, rule, f"added rule {rule['id']} to {args.name}: {kind} {rule['value']} ({access})")
    elif action == "remove":
        out = api.delete(f"{base}/{_q(args.rule_id)}")
        _emit(args, out, f"removed rule {args.rule_id} from {args.name}")
    else:
        out = api.delete(base)
        n = len(out["removed"])
        _emit(args, out, f"removed {n} rule(s) from {args.name}: it is open to every client")
    return EXIT_OK


def _stats_text(st: dict[str, Any]) -> str:
    import time

    ops = st["ops"]
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["since"]))
    lines = [
        f"export:      {st['volume']}",
        f"since:       {since}",
        f"connections: {st['connections']}",
        f"read:        {_human_size(st['read_bytes'])} ({st['read_bytes']} bytes) "
        f"in {ops.get('read', 0)} ops",
        f"written:     {_human_size(st['write_bytes'])} ({st['write_bytes']} bytes) "
        f"in {ops.get('write', 0)} ops",
        f"busy:        {st['busy_seconds']:.6f} s",
        f"errors:      {st['errors']}",
    ]
    if ops:
        lines.append("")
        lines.append(f"{'OP':<14}{'COUNT':>10}{'MEAN LATENCY':>16}")
        for op in sorted(ops):
            lat = st["latency"].get(op, {"count": 0, "sum_seconds": 0.0})
            mean = f"{lat['sum_seconds'] / lat['count'] * 1e6:.1f} us" if lat["count"] else "-"
            lines.append(f"{op:<14}{ops[op]:>10}{mean:>16}")
    return "\n".join(lines)


def _tree(snaps: list[dict[str, Any]]) -> str:
    children: dict[str | None, list[dict[str, Any]]] = {}
    for sn in snaps:
        children.setdefault(sn["parent"], []).append(sn)
    lines: list[str] = []

    def walk(parent: str | None, prefix: str) -> None:
        kids = children.get(parent, [])
        for i, sn in enumerate(kids):
            last = i == len(kids) - 1
            mark = "  <- current" if sn["current"] else ""
            lines.append(
                f"{prefix}{'└─ ' if last else '├─ '}{sn['name']}  "
                f"(unique {_human_size(sn['unique_bytes'])}, shared {_human_size(sn['shared_bytes'])}){mark}"
            )
            walk(sn["name"], prefix + ("   " if last else "│  "))

    walk(None, "")
    return "\n".join(lines) if lines else "no snapshots"


def _snapshot_diff(args: argparse.Namespace, api: ApiClient) -> int:
    path = f"/api/v1/volumes/{_q(args.volume)}/snapshots/{_q(args.since)}/diff"
    if args.until:
        path += f"?until={_q(args.until)}"
    out = api.get(path)
    extents = out["extents"]
    to = f"{args.volume}@{args.until}" if args.until else f"{args.volume} now"
    total = out["changed_bytes"]
    lines = [f"{'OFFSET':>16}  {'LENGTH':>14}"] if extents else []
    lines += [f"{e['offset']:>16}  {e['length']:>14}" for e in extents]
    lines.append(
        f"{args.volume}@{args.since} -> {to}: {len(extents)} extent(s), "
        f"{_human_size(total)} ({total} bytes) changed"
    )
    _emit(args, out, "\n".join(lines))
    return EXIT_OK


def _snapshot(args: argparse.Namespace, api: ApiClient) -> int:
    action = args.action
    if action == "list":
        snaps = api.get(f"/api/v1/volumes/{_q(args.volume)}/snapshots")["snapshots"]
        _emit(args, snaps, _tree(snaps))
        return EXIT_OK
    if action == "diff":
        return _snapshot_diff(args, api)
    if action not in ("create", "revert", "delete"):
        raise UsageError("blockvirt snapshot: choose an action: create, list, revert, delete, diff")
    base = f"/api/v1/volumes/{_q(args.volume)}/snapshots"
    if action == "create":
        out = api.post(base, {"name": args.snapshot})
        human = f"created snapshot {args.volume}@{args.snapshot}"
        if "warning" in out:
            print(f"blockvirt: warning: {out['warning']}", file=sys.stderr)
    elif action == "revert":
        out = api.post(f"{base}/{_q(args.snapshot)}/revert", {"force": args.force})
        human = f"reverted {args.volume} to {args.snapshot}"
    else:
        out = api.delete(f"{base}/{_q(args.snapshot)}")
        human = f"deleted snapshot {args.volume}@{args.snapshot}"
        if out.get("job"):
            human += f" (merging its data: job {out['job']})"
            if args.wait:
                job = _wait_job(args, api, out["job"])
                out["job_state"] = job["state"]
                human += f" {job['state']}"
        if out.get("note"):
            human += f"; {out['note']}"
    _emit(args, out, human)
    if action == "delete" and args.wait and out.get("job_state") is not None:
        return job_status(job)
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from blockvirt.service import check_data_dir

    report = check_data_dir(args.data_dir, repair=args.repair)
    _emit(args, report.to_dict(), report.text())
    return EXIT_ERROR if report.damaged else EXIT_OK


def _api_token(args: argparse.Namespace) -> str | None:
    """--token-file, else $BLOCKVIRT_API_TOKEN, else the file $BLOCKVIRT_API_TOKEN_FILE."""
    from blockvirt.api.auth import TokenError, read_token_file

    path = getattr(args, "token_file", None)
    token = os.environ.get("BLOCKVIRT_API_TOKEN", "").strip()
    if not path and not token:
        path = os.environ.get("BLOCKVIRT_API_TOKEN_FILE") or None
    if path:
        try:
            return read_token_file(path)
        except TokenError as e:
            raise ApiError(str(e)) from None
    return token or None


def _fail(as_json: bool, status: int, code: str, message: str, http_status: int | None = None) -> int:
    """Report an error: one line on stderr, and with --json a JSON object on stdout too."""
    if as_json:
        print(json.dumps({"error": {"code": code, "message": message, "status": http_status}}))
    print(message if code == "usage" else f"blockvirt: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 success, 1 the request (or a job waited for) failed, 2 bad usage; never
    a traceback."""
    words = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in words  # known before parsing, so usage errors can be JSON too
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        if args.command == "serve":
            return _serve(args)
        if args.command == "check":
            return _check(args)
        api = ApiClient(
            args.api or os.environ.get("BLOCKVIRT_API") or DEFAULT_API_URL, token=_api_token(args)
        )
        if args.command == "volume":
            return _volume(args, api)
        if args.command == "pool":
            return pools.run(args, api)
        if args.command == "snapshot":
            return _snapshot(args, api)
        if args.command == "job":
            return jobs.run_job(args, api)
        if args.command == "migrate":
            return jobs.run_migrate(args, api)
        if args.command == "qos":
            return qos.run(args, api)
        if args.command == "node":
            return nodes.run(args, api)
        raise UsageError(f"unknown command {args.command!r}")
    except UsageError as e:
        return _fail(as_json, EXIT_USAGE, "usage", str(e))
    except ApiError as e:
        return _fail(as_json, EXIT_ERROR, e.code or "error", e.message, e.status or None)
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # a local file: check's data directory, a token file, ...
        where = f": {e.filename}" if e.filename else ""
        return _fail(as_json, EXIT_ERROR, "os-error", f"{e.strerror or e}{where}")
    except Exception as e:  # a bug: still one line (the details are the exception's own)
        return _fail(as_json, EXIT_ERROR, "internal", f"internal error: {type(e).__name__}: {e}"[:500])
