"""Reading request bodies: JSON objects only, checked against the route's schema
(blockvirt.api.schema) before the handler runs, errors as 400s."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from blockvirt.api.schema import check, schema_for
from blockvirt.api.server import LIMITS, ApiLimits
from blockvirt.storage.catalog import CatalogError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Where the schema middleware leaves the checked body for the handler.
_CHECKED = "blockvirt.checked_body"


class _NotJson(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise _NotJson(f"{name} is not JSON")


def _loads(text: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and no setting wants them.
    return json.loads(text, parse_constant=_no_constants)


async def body(request: web.Request) -> dict[str, Any]:
    checked = request.get(_CHECKED)
    if checked is not None:
        return checked  # type: ignore[no-any-return]
    if not request.can_read_body:
        return {}  # no body: an empty object, the fields' defaults apply
    limits = request.app.get(LIMITS) or ApiLimits()
    try:
        async with asyncio.timeout(limits.body_timeout):
            body = await request.json(loads=_loads)
    except TimeoutError:
        # The rest of a body that did not come in time is not waited for either.
        request.protocol.force_close()
        raise web.HTTPRequestTimeout(reason="request body not received in time") from None
    except _NotJson as e:
        raise CatalogError("invalid", f"request body is not valid JSON: {e}") from None
    except (ValueError, RecursionError):
        # ValueError: bad JSON, bad UTF-8, or an integer with too many digits to parse;
        # RecursionError: nesting deeper than the parser goes.
        raise CatalogError("invalid", "request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise CatalogError("invalid", "request body must be a JSON object")
    return body


def field(body: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    if key not in body:
        if default is ...:
            raise CatalogError("invalid", f"missing field {key!r}")
        return default
    value = body[key]
    if kind is bool and not isinstance(value, bool):
        raise CatalogError("invalid", f"field {key!r} must be true or false")
    if kind is str and not isinstance(value, str):
        raise CatalogError("invalid", f"field {key!r} must be a string")
    if kind is dict and not isinstance(value, dict):
        raise CatalogError("invalid", f"field {key!r} must be a JSON object")
    return value


@web.middleware
async def schema_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Check the body of every route that takes one against its schema, before the handler."""
    if request.method in ("POST", "PUT", "PATCH"):
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else ""
        data = await body(request)
        schema = schema_for(request.method, route, data)
        if schema is not None:
            check(data, schema)
            request[_CHECKED] = data
    return await handler(request)
