"""QoS endpoints: volume settings, groups, the whole picture, pool calibration."""

from __future__ import annotations

import asyncio

from aiohttp import web

from blockvirt.api.keys import QOS, VOLUMES
from blockvirt.api.request import body as _body
from blockvirt.qos.calibrate import calibrate
from blockvirt.qos.manager import QosManager
from blockvirt.storage import executor
from blockvirt.storage.catalog import FILE_BACKEND, CatalogError


def _qos(request: web.Request) -> QosManager:
    qos = request.app.get(QOS)
    if qos is None:
        raise CatalogError("conflict", "storage I/O control is not running in this server")
    return qos


async def show(request: web.Request) -> web.Response:
    return web.json_response(_qos(request).show())


async def get_volume_qos(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    qos = _qos(request)
    if request.app[VOLUMES].record(name) is None:
        raise CatalogError("not-found", f"no volume named {name!r}")
    qos.volume_qos(name)
    return web.json_response(qos.volume_view(name))


async def set_volume_qos(request: web.Request) -> web.Response:
    body = await _body(request)
    return web.json_response(await _qos(request).set_volume(request.match_info["name"], body))


async def list_groups(request: web.Request) -> web.Response:
    qos = _qos(request)
    return web.json_response({"groups": [qos.group_view(g) for g in sorted(qos.groups)]})


async def create_group(request: web.Request) -> web.Response:
    body = await _body(request)
    name = body.pop("name", None)
    if not isinstance(name, str):
        raise CatalogError("invalid", "missing field 'name' (a string)")
    return web.json_response(_qos(request).set_group(name, body, create=True), status=201)


async def update_group(request: web.Request) -> web.Response:
    body = await _body(request)
    return web.json_response(_qos(request).set_group(request.match_info["name"], body, create=False))


async def delete_group(request: web.Request) -> web.Response:
    _qos(request).delete_group(request.match_info["name"])
    return web.Response(status=204)


_calibrating: set[str] = set()


async def calibrate_pool(request: web.Request) -> web.Response:
    """Measure the pool's device; with "apply" (the default) its capacity and cost model
    become the measured ones."""
    vm = request.app[VOLUMES]
    name = request.match_info["name"]
    rec = vm.pools.require(name)
    if rec.backend != FILE_BACKEND:
        raise CatalogError(
            "conflict", f"pool {name!r} is a {rec.backend} pool: calibration measures a file pool's device"
        )
    body = await _body(request)
    seconds = body.get("seconds", 4.0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0.5 <= seconds <= 120:
        raise CatalogError("invalid", "seconds must be a number between 0.5 and 120")
    apply = body.get("apply", True)
    if not isinstance(apply, bool):
        raise CatalogError("invalid", "apply must be true or false")
    if name in _calibrating:
        raise CatalogError("conflict", f"pool {name!r} is being calibrated already")
    _calibrating.add(name)
    try:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(executor.pool(), calibrate, rec.path, float(seconds))
        except OSError as e:
            raise CatalogError("conflict", f"cannot calibrate pool {name!r}: {e.strerror or e}") from None
    finally:
        _calibrating.discard(name)
    result["applied"] = False
    if apply:
        changes = {"iops_capacity": float(result["iops_capacity"]), "cost_s0": int(result["cost_s0"])}
        vm.pools.update(name, changes)  # QoS may refuse (reservations), and is told
        result["applied"] = True
    return web.json_response({"pool": name, **result})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/qos", show)
    app.router.add_get("/api/v1/volumes/{name}/qos", get_volume_qos)
    app.router.add_patch("/api/v1/volumes/{name}/qos", set_volume_qos)
    app.router.add_get("/api/v1/qos/groups", list_groups)
    app.router.add_post("/api/v1/qos/groups", create_group)
    app.router.add_patch("/api/v1/qos/groups/{name}", update_group)
    app.router.add_delete("/api/v1/qos/groups/{name}", delete_group)
    app.router.add_post("/api/v1/pools/{name}/calibrate", calibrate_pool)
