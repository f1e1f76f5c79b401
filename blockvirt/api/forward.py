"""Tree edits of a volume another node serves are done by that node (it holds the image's
lock): the request is passed to its API and its answer returned as ours. Settings (access
rules, QoS) live in the shared catalog and are changed wherever they are asked.

A forwarded request carries a header naming this node; one arriving with it is never
forwarded again (two nodes that disagree about the owner answer 409 instead of looping).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from blockvirt.api.keys import VOLUMES
from blockvirt.storage.catalog import CatalogError

log = logging.getLogger("blockvirt.api")

FORWARDED = "X-Blockvirt-Forwarded-By"
#: (method, route) of the edits the serving node must make.
OWNER_ROUTES = frozenset(
    {
        ("DELETE", "/api/v1/volumes/{name}"),
        ("POST", "/api/v1/volumes/{name}/flatten"),
        ("POST", "/api/v1/volumes/{name}/resize"),
        ("POST", "/api/v1/volumes/{name}/reset"),
        ("POST", "/api/v1/volumes/{name}/migrate"),
        ("POST", "/api/v1/volumes/{name}/snapshots"),
        ("POST", "/api/v1/volumes/{name}/snapshots/{snap}/revert"),
        ("DELETE", "/api/v1/volumes/{name}/snapshots/{snap}"),
    }
)
#: A forwarded request may take this long (a snapshot or a resize is quick; a wait is not
#: forwarded).
TIMEOUT = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def forward_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    info = request.match_info.route.resource
    template = info.canonical if info is not None else ""
    if (request.method, template) not in OWNER_ROUTES:
        return await handler(request)
    vm = request.app[VOLUMES]
    name = request.match_info.get("name", "")
    url = vm.owner_api(name)
    if url is None:
        return await handler(request)
    if FORWARDED in request.headers:
        raise CatalogError("conflict", vm.served_elsewhere(name) or f"volume {name!r} is served elsewhere")
    headers = {
        FORWARDED: vm.node.name,
        "Content-Type": request.headers.get("Content-Type", "application/json"),
    }
    if "Authorization" in request.headers:  # one cluster, one token
        headers["Authorization"] = request.headers["Authorization"]
    body = await request.read()  # cached by aiohttp: the schema check read it already
    target = url.rstrip("/") + str(request.rel_url)
    log.info("%s %s: forwarded to the node serving %s (%s)", request.method, request.path, name, url)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
            session.request(request.method, target, data=body, headers=headers) as resp,
        ):
            payload = await resp.read()
            return web.Response(
                status=resp.status, body=payload, content_type=resp.content_type or "application/json"
            )
    except (aiohttp.ClientError, TimeoutError) as e:
        raise CatalogError("unavailable", f"the node serving {name!r} ({url}) did not answer: {e}") from None
