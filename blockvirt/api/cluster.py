"""Several nodes over shared RBD pools: who is there, who serves what, planned moves."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from blockvirt.api.keys import VOLUMES
from blockvirt.api.request import body as read_body
from blockvirt.api.request import field
from blockvirt.storage.catalog import CatalogError, validate_name
from blockvirt.storage.volumes import VolumeManager

#: How long a move with "wait" waits for the new node to hold the volume.
MOVE_WAIT = 30.0


def _owner(vm: VolumeManager, volume: str) -> str | None:
    for cluster in vm.cluster_view():
        for n in cluster["nodes"]:
            if volume in n["volumes"]:
                return str(n["name"])
    return None


async def list_nodes(request: web.Request) -> web.Response:
    vm = request.app[VOLUMES]
    me = vm.node
    return web.json_response({"node": me.name, "nbd": me.nbd, "api": me.api, "pools": vm.cluster_view()})


async def move_volume(request: web.Request) -> web.Response:
    """A planned move: the volume's owner hands it to `node` (no data is copied)."""
    vm = request.app[VOLUMES]
    name = request.match_info["name"]
    vm.require(name)
    body: dict[str, Any] = await read_body(request)
    node = validate_name(field(body, "node", str), "node")
    wait = field(body, "wait", bool, True)
    started = time.monotonic()
    moving = await vm.move(name, node)  # False: here already, nothing to wait for
    if wait and moving:
        deadline = started + MOVE_WAIT
        while _owner(vm, name) != node:
            if time.monotonic() > deadline:
                raise CatalogError(
                    "conflict", f"volume {name!r} did not reach node {node} in {MOVE_WAIT:g} s"
                )
            await asyncio.sleep(0.05)
    seconds = round(time.monotonic() - started, 3)
    return web.json_response({"volume": name, "node": node, "seconds": seconds, "done": wait or not moving})


async def drain_node(request: web.Request) -> web.Response:
    vm = request.app[VOLUMES]
    node = validate_name(request.match_info["node"], "node")
    moves = await vm.drain_node(node)
    return web.json_response({"node": node, "moves": [{"volume": v, "to": t} for v, t in moves]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/nodes", list_nodes)
    app.router.add_post("/api/v1/nodes/{node}/drain", drain_node)
    app.router.add_post("/api/v1/volumes/{name}/move", move_volume)
