"""Management API (aiohttp, same event loop as the NBD listener).

Every error is JSON: {"error": {"code": ..., "message": ...}} with a 4xx/5xx status; see
protocol/mgmt-api.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from blockvirt.api import cluster as cluster_api
from blockvirt.api import debug as debug_api
from blockvirt.api import qos as qos_api
from blockvirt.api import server as api_server
from blockvirt.api import views
from blockvirt.api.auth import auth_middleware
from blockvirt.api.forward import forward_middleware
from blockvirt.api.guard import guard_middleware
from blockvirt.api.keys import JOBS, QOS, VOLUMES
from blockvirt.api.request import body as _body
from blockvirt.api.request import field as _field
from blockvirt.api.request import schema_middleware
from blockvirt.jobs import migrate
from blockvirt.jobs.manager import JobManager
from blockvirt.qos.manager import QosManager
from blockvirt.server.acl import KINDS, AclError, normalize
from blockvirt.storage.catalog import DEFAULT_POOL, CatalogError, parse_size, validate_name
from blockvirt.storage.fileio import FileIO
from blockvirt.storage.stats import VolumeStats
from blockvirt.storage.volumes import VolumeManager

log = logging.getLogger("blockvirt.api")

_STATUS = {"invalid": 400, "not-found": 404, "conflict": 409, "no-space": 507, "unavailable": 503}
#: Error messages are cut here: they may echo what the client sent (a 10 KB name).
MAX_MESSAGE = 300

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str) -> web.Response:
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except CatalogError as e:
        return _error(_STATUS.get(e.kind, 400), e.kind, e.message)
    except web.HTTPException as e:
        if e.status >= 400:
            return _error(e.status, "http", e.reason)
        raise
    except Exception:
        log.exception("API error on %s %s", request.method, request.path)
        return _error(500, "internal", "internal server error (see the server log)")


def _volume_name(request: web.Request) -> str:
    """The {name} of the route, which must be a volume that exists."""
    name = validate_name(request.match_info["name"])
    if request.app[VOLUMES].record(name) is None:
        raise CatalogError("not-found", f"no volume named {name!r}")
    return name


def _rule_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise CatalogError("invalid", f"invalid rule id {raw!r}: expected a number from 'volume acl show'")
    return int(raw)


def _acl_answer(request: web.Request, name: str) -> dict[str, Any]:
    rules = [r.to_dict() for r in request.app[VOLUMES].acl_rules(name)]
    for r in rules:
        del r["volume"]
    # "open": no rules, anyone may connect; "restricted": only clients a rule matches.
    return {"volume": name, "mode": "restricted" if rules else "open", "rules": rules}


async def get_acl(request: web.Request) -> web.Response:
    return web.json_response(_acl_answer(request, _volume_name(request)))


async def add_acl_rule(request: web.Request) -> web.Response:
    name = _volume_name(request)
    body = await _body(request)
    unknown = set(body) - {"kind", "value", "read_only"}
    if unknown:
        raise CatalogError("invalid", f"unknown field(s): {', '.join(sorted(map(repr, unknown)))}")
    kind = _field(body, "kind", str)
    if kind not in KINDS:
        raise CatalogError("invalid", f"field 'kind' must be one of {', '.join(KINDS)}")
    try:
        value = normalize(kind, _field(body, "value", str))
    except AclError as e:
        raise CatalogError("invalid", str(e)) from None
    read_only = _field(body, "read_only", bool, False)
    rec = await request.app[VOLUMES].settings_of(name).add_acl_rule(name, kind, value, read_only)
    log.info(
        "access rule %d added to %s: %s %s%s",
        rec.id,
        name,
        kind,
        value,
        " (read-only)" if read_only else "",
        extra={"volume": name},
    )
    out = rec.to_dict()
    del out["volume"]
    return web.json_response(out, status=201)


async def remove_acl_rule(request: web.Request) -> web.Response:
    name = _volume_name(request)
    rule_id = _rule_id(request)
    if not await request.app[VOLUMES].settings_of(name).remove_acl_rule(name, rule_id):
        raise CatalogError("not-found", f"volume {name!r} has no access rule {rule_id}")
    log.info("access rule %d removed from %s", rule_id, name, extra={"volume": name})
    return web.json_response({"volume": name, "removed": [rule_id]})


async def clear_acl(request: web.Request) -> web.Response:
    name = _volume_name(request)
    before = [r.id for r in request.app[VOLUMES].acl_rules(name)]
    await request.app[VOLUMES].settings_of(name).clear_acl(name)
    log.info("access rules of %s cleared (%d)", name, len(before), extra={"volume": name})
    return web.json_response({"volume": name, "removed": before})


async def list_volumes(request: web.Request) -> web.Response:
    return web.json_response({"volumes": views.volume_list(request.app[VOLUMES], request.app[JOBS])})


def _info(request: web.Request, name: str) -> dict[str, Any]:
    return views.volume_info(request.app[VOLUMES], request.app[JOBS], name)


async def create_volume(request: web.Request) -> web.Response:
    body = await _body(request)
    name = _field(body, "name", str)
    source = _field(body, "source", str, None)
    if source is not None:  # a linked clone of VOLUME@SNAPSHOT
        rec = await request.app[VOLUMES].clone(source, name)
        return web.json_response(_info(request, rec.name), status=201)
    raw_size = body.get("size")
    if raw_size is None:
        raise CatalogError("invalid", "missing field 'size'")
    if isinstance(raw_size, bool) or not isinstance(raw_size, int | str):
        raise CatalogError("invalid", "field 'size' must be bytes or a string like '10G'")
    size = parse_size(raw_size)
    thick = _field(body, "thick", bool, False)
    pool = _field(body, "pool", str, DEFAULT_POOL)
    rec = await request.app[VOLUMES].create(name, size, thick=thick, pool=pool)
    return web.json_response(_info(request, rec.name), status=201)


async def get_volume(request: web.Request) -> web.Response:
    return web.json_response(_info(request, request.match_info["name"]))


async def volume_stats(request: web.Request) -> web.Response:
    """Absolute counters of one export (`NAME` or `NAME@SNAP`) since it was opened."""
    vm = request.app[VOLUMES]
    name = request.match_info["name"]
    if not vm.metrics:
        raise CatalogError("conflict", "per-volume accounting is off (the server runs with --no-metrics)")
    if not vm.exists(name):
        raise CatalogError("not-found", f"no volume or snapshot named {name!r}")
    # Never opens the export: one that was not opened yet has served nothing.
    vol_name, at, snap = name.partition("@")
    vol = vm.exports_cache.get(vol_name, snap if at else None)
    stats = vol.stats if vol is not None else VolumeStats()
    return web.json_response({"volume": name, "connections": vol.users if vol else 0, **stats.to_dict()})


async def delete_volume(request: web.Request) -> web.Response:
    await request.app[VOLUMES].delete(request.match_info["name"])
    return web.Response(status=204)


async def flatten_volume(request: web.Request) -> web.Response:
    job = await request.app[VOLUMES].flatten(request.match_info["name"])
    return web.json_response(request.app[JOBS].jobs[job.id].to_dict(), status=202)


async def list_snapshots(request: web.Request) -> web.Response:
    return web.json_response(
        {"snapshots": await views.snapshot_list(request.app[VOLUMES], request.match_info["name"])}
    )


async def create_snapshot(request: web.Request) -> web.Response:
    body = await _body(request)
    out = await request.app[VOLUMES].snapshot_create(request.match_info["name"], _field(body, "name", str))
    return web.json_response(out, status=201)


async def revert_snapshot(request: web.Request) -> web.Response:
    body = await _body(request)
    force = _field(body, "force", bool, False)
    out = await request.app[VOLUMES].snapshot_revert(
        request.match_info["name"], request.match_info["snap"], force=force
    )
    return web.json_response(out)


async def diff_snapshot(request: web.Request) -> web.Response:
    """What changed from snapshot {snap} to snapshot `until` (absent: the head now)."""
    name = _volume_name(request)
    until = request.query.get("until")
    out = await request.app[VOLUMES].snapshot_diff(name, request.match_info["snap"], until or None)
    return web.json_response(out)


async def delete_snapshot(request: web.Request) -> web.Response:
    name, snap = request.match_info["name"], request.match_info["snap"]
    result = await request.app[VOLUMES].snapshot_delete(name, snap)
    out: dict[str, Any] = {"volume": name, "deleted": snap}
    if result.job is not None:
        out["job"] = result.job.id
    elif result.note is not None:
        out["note"] = result.note
    return web.json_response(out)


async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response({"jobs": [j.to_dict() for j in request.app[JOBS].list()]})


async def get_job(request: web.Request) -> web.Response:
    job = request.app[JOBS].get(request.match_info["id"])
    if job is None:
        raise CatalogError("not-found", f"no job {request.match_info['id']!r}")
    if request.query.get("wait") in ("1", "true"):
        await request.app[JOBS].wait(job)
    return web.json_response(job.to_dict())


async def list_pools(request: web.Request) -> web.Response:
    return web.json_response({"pools": request.app[VOLUMES].pool_list()})


async def create_pool(request: web.Request) -> web.Response:
    body = await _body(request)
    settings = _field(body, "settings", dict, {})
    vm = request.app[VOLUMES]
    name = _field(body, "name", str)
    rbd = _field(body, "rbd", dict, None)
    if rbd is not None:  # an RBD pool: {"pool": CEPHPOOL, "namespace": NS, "conf": FILE, "user": ID}
        if "path" in body:
            raise CatalogError("invalid", "give either 'path' (a file pool) or 'rbd' (an RBD pool), not both")
        rec = await vm.pools.attach(name, "rbd", _rbd_config(rbd), settings)
    else:
        path = _field(body, "path", str)
        if path and not os.path.isabs(path):
            # Relative to what? The server's working directory is nobody's business.
            raise CatalogError("invalid", f"pool path {path!r} must be absolute")
        rec = vm.pools.create(name, path, settings)
    return web.json_response(vm.pool_info(rec.name), status=201)


def _rbd_config(raw: dict[str, Any]) -> dict[str, Any]:
    unknown = set(raw) - {"pool", "namespace", "conf", "user"}
    if unknown:
        raise CatalogError("invalid", f"unknown field(s) in 'rbd': {', '.join(sorted(map(repr, unknown)))}")
    pool = _field(raw, "pool", str)
    if not pool or len(pool) > 256 or "\0" in pool:
        raise CatalogError("invalid", "'rbd.pool' must name a Ceph pool")
    conf = _field(raw, "conf", str, None)
    if conf is not None and (not conf.startswith("/") or "\0" in conf):
        raise CatalogError("invalid", "'rbd.conf' must be an absolute path to a ceph.conf")
    user = _field(raw, "user", str, None)
    if user is not None and (not user or len(user) > 256 or "\0" in user):
        raise CatalogError("invalid", "'rbd.user' must be a Ceph client id (as in client.ID)")
    namespace = _field(raw, "namespace", str, "")
    if "/" in namespace or not namespace.isprintable() or len(namespace) > 255:
        raise CatalogError(
            "invalid", f"bad RBD namespace {namespace!r}: printable, no '/', at most 255 characters"
        )
    # No key for no namespace: the config of pools made before namespaces stays as it was.
    return {"pool": pool, "conf": conf, "user": user, **({"namespace": namespace} if namespace else {})}


async def get_pool(request: web.Request) -> web.Response:
    return web.json_response(request.app[VOLUMES].pool_info(request.match_info["name"]))


async def update_pool(request: web.Request) -> web.Response:
    """Change settings: the body holds the settings to change (see PoolSettings)."""
    body = await _body(request)
    vm = request.app[VOLUMES]
    rec = vm.pools.update(request.match_info["name"], body)  # QoS may refuse (reservations)
    return web.json_response(vm.pool_info(rec.name))


async def delete_pool(request: web.Request) -> web.Response:
    force = request.query.get("force") in ("1", "true")
    await request.app[VOLUMES].pools.delete(request.match_info["name"], force=force)
    return web.Response(status=204)


async def migrate_volume(request: web.Request) -> web.Response:
    body = await _body(request)
    pool = _field(body, "pool", str)
    provisioning = _field(body, "provisioning", str, None)
    raw = body.get("bps_limit", 0)
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise CatalogError("invalid", "field 'bps_limit' must be bytes per second or a string like '50M'")
    bps = parse_size(raw) if isinstance(raw, str) else raw
    job = await migrate.start(
        request.app[VOLUMES],
        request.app[JOBS],
        request.match_info["name"],
        pool,
        provisioning=provisioning,
        bps_limit=bps,
    )
    return web.json_response(job.to_dict(), status=202)


async def cancel_job(request: web.Request) -> web.Response:
    job = request.app[JOBS].cancel(request.match_info["id"])
    return web.json_response(job.to_dict())


async def reset_volume(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await request.app[VOLUMES].reset(name)
    return web.json_response(_info(request, name))


async def resize_volume(request: web.Request) -> web.Response:
    body = await _body(request)
    raw_size = body.get("size")
    if raw_size is None:
        raise CatalogError("invalid", "missing field 'size'")
    if isinstance(raw_size, bool) or not isinstance(raw_size, int | str):
        raise CatalogError("invalid", "field 'size' must be bytes or a string like '10G'")
    force = _field(body, "force", bool, False)
    name = request.match_info["name"]
    old, _ = await request.app[VOLUMES].resize(name, parse_size(raw_size), force=force)
    return web.json_response({**_info(request, name), "resized_from": old})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(
    volumes: VolumeManager,
    jobs: JobManager,
    qos: QosManager | None,
    registry: CollectorRegistry | None = None,
    *,
    token: str | None = None,
    fault_io: FileIO | None = None,
    limits: api_server.ApiLimits | None = None,
) -> web.Application:
    """The API; `/metrics` serves `registry`, or answers 404 without one (`serve
    --no-metrics`). With `token`, every request but the health check needs
    `Authorization: Bearer TOKEN` (see blockvirt.api.auth). `fault_io` is the pools' I/O
    when fault injection is on (the debug routes drive it). `limits` cap connections and
    time requests out; cross-site requests are refused (blockvirt.api.guard)."""
    middlewares: list[Middleware] = [
        api_server.deadline_middleware(),  # a request head is complete: stop its clock
        errors_middleware,  # every answer below is JSON, a crash included
        guard_middleware(loopback_only=token is None),
        schema_middleware,
        forward_middleware,  # tree edits of a volume another node serves go to that node
    ]
    if token is not None:
        middlewares.insert(3, auth_middleware(token))  # before the body is even read
    app = web.Application(middlewares=middlewares, client_max_size=1024 * 1024)
    api_server.install(app, limits if limits is not None else api_server.ApiLimits())
    app[VOLUMES] = volumes
    app[JOBS] = jobs
    if qos is not None:
        app[QOS] = qos

    async def metrics(request: web.Request) -> web.Response:
        if registry is None:
            return _error(404, "not-found", "metrics are off (the server runs with --no-metrics)")
        # On the loop, not in a thread: collectors read the catalog (SQLite, this thread's).
        resp = web.Response(body=generate_latest(registry))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    app.router.add_get("/api/v1/health", health)
    app.router.add_get("/api/v1/volumes", list_volumes)
    app.router.add_post("/api/v1/volumes", create_volume)
    app.router.add_get("/api/v1/volumes/{name}", get_volume)
    app.router.add_delete("/api/v1/volumes/{name}", delete_volume)
    app.router.add_get("/api/v1/volumes/{name}/stats", volume_stats)
    app.router.add_post("/api/v1/volumes/{name}/flatten", flatten_volume)
    app.router.add_post("/api/v1/volumes/{name}/resize", resize_volume)
    app.router.add_post("/api/v1/volumes/{name}/reset", reset_volume)
    app.router.add_post("/api/v1/volumes/{name}/migrate", migrate_volume)
    app.router.add_get("/api/v1/volumes/{name}/acl", get_acl)
    app.router.add_post("/api/v1/volumes/{name}/acl", add_acl_rule)
    app.router.add_delete("/api/v1/volumes/{name}/acl", clear_acl)
    app.router.add_delete("/api/v1/volumes/{name}/acl/{id}", remove_acl_rule)
    app.router.add_get("/api/v1/volumes/{name}/snapshots", list_snapshots)
    app.router.add_post("/api/v1/volumes/{name}/snapshots", create_snapshot)
    app.router.add_post("/api/v1/volumes/{name}/snapshots/{snap}/revert", revert_snapshot)
    app.router.add_delete("/api/v1/volumes/{name}/snapshots/{snap}", delete_snapshot)
    app.router.add_get("/api/v1/volumes/{name}/snapshots/{snap}/diff", diff_snapshot)
    app.router.add_get("/api/v1/jobs", list_jobs)
    app.router.add_get("/api/v1/jobs/{id}", get_job)
    app.router.add_post("/api/v1/jobs/{id}/cancel", cancel_job)
    app.router.add_get("/api/v1/pools", list_pools)
    app.router.add_post("/api/v1/pools", create_pool)
    app.router.add_get("/api/v1/pools/{name}", get_pool)
    app.router.add_patch("/api/v1/pools/{name}", update_pool)
    app.router.add_delete("/api/v1/pools/{name}", delete_pool)
    app.router.add_get("/metrics", metrics)
    qos_api.add_routes(app)
    cluster_api.add_routes(app)
    debug_api.add_routes(app, fault_io)
    return app
