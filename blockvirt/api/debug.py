"""Fault injection endpoints (only with `serve --fault-injection`; 404 otherwise)."""

from __future__ import annotations

from aiohttp import web

from blockvirt.api.keys import VOLUMES
from blockvirt.api.request import body as read_body
from blockvirt.storage.catalog import CatalogError
from blockvirt.storage.faults import FaultyFileIO, parse_rule
from blockvirt.storage.fileio import FileIO

FAULT_IO = web.AppKey("fault_io", FileIO)


def _io(request: web.Request) -> FaultyFileIO:
    io = request.app.get(FAULT_IO)
    if not isinstance(io, FaultyFileIO):
        raise CatalogError("not-found", "fault injection is off (serve --fault-injection turns it on)")
    return io


async def list_faults(request: web.Request) -> web.Response:
    io = _io(request)
    vm = request.app[VOLUMES]
    out = []
    for p in vm.catalog.pools():  # faults are set on file pools' directories
        rule = io.rules.get(p.path)
        if rule is not None:
            out.append({"pool": p.name, **rule.to_dict()})
    return web.json_response({"faults": out})


async def set_fault(request: web.Request) -> web.Response:
    io = _io(request)
    body = await read_body(request)
    pool = body.get("pool")
    if not isinstance(pool, str):
        raise CatalogError("invalid", "missing field 'pool' (a pool name)")
    rec = request.app[VOLUMES].pools.require(pool)
    rule = parse_rule(body)
    io.set_rule(rec.path, rule)
    return web.json_response({"pool": pool, **rule.to_dict()})


async def clear_fault(request: web.Request) -> web.Response:
    io = _io(request)
    rec = request.app[VOLUMES].pools.require(request.match_info["pool"])
    io.set_rule(rec.path, None)
    return web.Response(status=204)


def add_routes(app: web.Application, io: FileIO | None) -> None:
    if io is not None:
        app[FAULT_IO] = io
    app.router.add_get("/api/v1/debug/faults", list_faults)
    app.router.add_put("/api/v1/debug/faults", set_fault)
    app.router.add_delete("/api/v1/debug/faults/{pool}", clear_fault)
