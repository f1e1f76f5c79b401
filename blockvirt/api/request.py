"""Reading request bodies: JSON objects only, fields checked, errors as 400s."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from blockvirt.api.server import LIMITS, process_limits
from blockvirt.storage.catalog import CatalogError


async def body(request: web.Request) -> dict[str, Any]:
    limits = request.app.get(LIMITS) or process_limits()
    try:
        async with asyncio.timeout(limits.body_timeout):
            body = await request.json()
    except TimeoutError:
        # The rest of a body that did not come in time is not waited for either.
        request.protocol.force_close()
        raise web.HTTPRequestTimeout(reason="request body not received in time") from None
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
