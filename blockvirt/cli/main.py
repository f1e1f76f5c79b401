"""`blockvirt` command line. main(argv) -> exit status; errors are one clear line, never a
traceback. Every command takes --api URL (default $BLOCKVIRT_API) and --json."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

from blockvirt.cli.client import ApiClient, ApiError

DEFAULT_API_URL = "http://127.0.0.1:9810"

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _common(p: argparse.ArgumentParser, top: bool) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="blockvirt", description="blockvirt storage virtualization service")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--data-dir", default="./blockvirt-data", help="data directory (default %(default)s)")
    serve.add_argument("--nbd", default="127.0.0.1:10809", metavar="HOST:PORT", help="NBD listen address")
    serve.add_argument(
        "--api",
        dest="api_listen",
        default="127.0.0.1:9810",
        metavar="HOST:PORT",
        help="API and /metrics listen address",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--ready-file", help="write {nbd, api, pid} as JSON here once listening")
    serve.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="event loop")
    serve.add_argument("--shutdown-deadline", type=float, default=10.0, metavar="SECONDS")

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
    for action, helptext in (("info", "show one volume"), ("delete", "delete a volume and its data")):
        p = vsub.add_parser(action, help=helptext)
        _common(p, top=False)
        p.add_argument("name")

    pool = sub.add_parser("pool", help="manage storage pools")
    _common(pool, top=False)
    psub = pool.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    pc = psub.add_parser("create", help="add a pool backed by a directory")
    _common(pc, top=False)
    pc.add_argument("name")
    pc.add_argument("--path", required=True)
    pl = psub.add_parser("list", help="list pools")
    _common(pl, top=False)
    return parser


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _print_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> None:
    cells = [[h for _, h in cols]] + [[str(r.get(k, "")) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _emit(args: argparse.Namespace, data: Any, human: str | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif human is not None:
        print(human)


def _volume_row(v: dict[str, Any]) -> dict[str, Any]:
    return {
        **v,
        "size_h": _human_size(v["size"]),
        "alloc_h": _human_size(v["allocated"]),
        "kind": "thick" if v["thick"] else "thin",
    }


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from blockvirt.server.service import Service, ServiceConfig, parse_hostport

    try:
        nbd_host, nbd_port = parse_hostport(args.nbd, "--nbd")
        api_host, api_port = parse_hostport(args.api_listen, "--api")
    except ValueError as e:
        raise UsageError(str(e)) from None
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    cfg = ServiceConfig(
        data_dir=args.data_dir,
        nbd_host=nbd_host,
        nbd_port=nbd_port,
        api_host=api_host,
        api_port=api_port,
        shutdown_deadline=args.shutdown_deadline,
        ready_file=args.ready_file,
    )
    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(Service(cfg).run())
        else:
            asyncio.run(Service(cfg).run())
    except OSError as e:
        print(f"blockvirt serve: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _volume(args: argparse.Namespace, api: ApiClient) -> int:
    from blockvirt.storage.catalog import CatalogError, parse_size

    action = args.action
    if action == "create":
        try:
            size = parse_size(args.size)
        except CatalogError as e:
            raise UsageError(e.message) from None
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
                    f"connections: {v['connections']}",
                ]
            ),
        )
    elif action == "delete":
        api.delete(f"/api/v1/volumes/{_q(args.name)}")
        _emit(args, {"deleted": args.name}, f"deleted volume {args.name}")
    else:
        raise UsageError("blockvirt volume: choose an action: create, list, info, delete")
    return EXIT_OK


def _pool(args: argparse.Namespace, api: ApiClient) -> int:
    if args.action == "create":
        rec = api.post("/api/v1/pools", {"name": args.name, "path": args.path})
        _emit(args, rec, f"created pool {rec['name']} at {rec['path']}")
    elif args.action == "list":
        pools = api.get("/api/v1/pools")["pools"]
        if args.json:
            _emit(args, pools)
        else:
            _print_table(pools, [("name", "NAME"), ("path", "PATH")])
    else:
        raise UsageError("blockvirt pool: choose an action: create, list")
    return EXIT_OK


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        if args.command == "serve":
            return _serve(args)
        api = ApiClient(args.api or os.environ.get("BLOCKVIRT_API") or DEFAULT_API_URL)
        if args.command == "volume":
            return _volume(args, api)
        if args.command == "pool":
            return _pool(args, api)
        raise UsageError(f"unknown command {args.command!r}")
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except ApiError as e:
        if getattr(args, "json", False):
            print(json.dumps({"error": {"message": e.message, "code": e.code, "status": e.status}}))
        print(f"blockvirt: error: {e.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
