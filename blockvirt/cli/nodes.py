"""`blockvirt node ...` and `volume move`: the nodes sharing RBD pools (docs/cluster.md)."""

from __future__ import annotations

import argparse
from typing import Any

from blockvirt.cli.client import ApiClient
from blockvirt.cli.common import EXIT_OK, Parser, UsageError, add_common, emit, print_table, q


def add_parser(sub: Any) -> None:
    node = sub.add_parser("node", help="the nodes sharing RBD pools: list, drain")
    add_common(node, top=False)
    nsub = node.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    nl = nsub.add_parser("list", help="the nodes of each pool's cluster: addresses, liveness, volumes")
    add_common(nl, top=False)
    nd = nsub.add_parser("drain", help="move every volume a node serves to the other live nodes")
    add_common(nd, top=False)
    nd.add_argument("name")


def add_move(vsub: Any) -> None:
    vm = vsub.add_parser("move", help="hand a volume on an RBD pool to another node (no data copied)")
    add_common(vm, top=False)
    vm.add_argument("name")
    vm.add_argument("--node", required=True, help="the node that serves it from now on")


def run(args: argparse.Namespace, api: ApiClient) -> int:
    if args.action == "list":
        view = api.get("/api/v1/nodes")
        if args.json:
            emit(args, view)
            return EXIT_OK
        rows = []
        for pool in view["pools"]:
            for n in pool["nodes"]:
                age = n["heartbeat_age"]
                rows.append(
                    {
                        "pool": pool["pool"],
                        "name": n["name"] + (" (this)" if n["me"] else ""),
                        "nbd": n["nbd"] or "-",
                        "state": (
                            "heartbeats failing"
                            if n.get("heartbeat_error")
                            else "alive"
                            if n["alive"]
                            else "dead"
                        ),
                        "age": f"{age:.1f}s" if age is not None else "?",
                        "volumes": ",".join(n["volumes"]) or "-",
                    }
                )
        if not rows:
            print(f"node {view['node']}: no RBD pool is shared with other nodes")
            return EXIT_OK
        print_table(
            rows,
            [("pool", "POOL"), ("name", "NODE"), ("nbd", "NBD"), ("state", "STATE"), ("age", "HEARTBEAT"),
             ("volumes", "VOLUMES")],
        )  # fmt: skip
        for pool in view["pools"]:
            for n in pool["nodes"]:
                if n.get("heartbeat_error"):
                    print(f"pool {pool['pool']}: this node's heartbeat failed: {n['heartbeat_error']}")
    elif args.action == "drain":
        out = api.post(f"/api/v1/nodes/{q(args.name)}/drain", {})
        moves = ", ".join(f"{m['volume']} -> {m['to']}" for m in out["moves"]) or "nothing to move"
        emit(args, out, f"draining node {args.name}: {moves}")
    else:
        raise UsageError("blockvirt node: choose an action: list, drain")
    return EXIT_OK


def run_move(args: argparse.Namespace, api: ApiClient) -> int:
    out = api.post(f"/api/v1/volumes/{q(args.name)}/move", {"node": args.node})
    emit(args, out, f"volume {args.name} is served by node {args.node} ({out['seconds'] * 1000:.0f} ms)")
    return EXIT_OK
