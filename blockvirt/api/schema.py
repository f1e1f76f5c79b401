"""Request body schemas, one per route, as declared in protocol/mgmt-api.md.

A table-driven check of shape and type only (which fields, of which JSON type, within what
a number may be before it overflows anything): what a value means (a free pool name, a
watermark under its critical one) is checked where it is used. Unknown fields are errors,
so a typo (`"frce": true`) is refused instead of silently ignored. Pure: no aiohttp here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blockvirt.storage.catalog import CatalogError

#: Integers beyond this are refused before anything converts them (a 4200-digit integer
#: made float() raise OverflowError, a 500).
MAX_INT = 2**63 - 1
#: Numbers (rates, percents, shares) beyond this are refused as shapes go.
MAX_NUMBER = 1e15
#: Strings longer than this are refused (names are 64, paths and ACL values shorter).
MAX_STRING = 4096


@dataclass(frozen=True, slots=True)
class Field:
    """One field: `kind` is string, bool, integer, number, size (bytes or "10G"),
    rate (bytes per second or "100M"), enum, strings (a list of strings) or object."""

    kind: str
    required: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()
    fields: Mapping[str, Field] = field(default_factory=dict)


Schema = Mapping[str, Field]

_STR = Field("string")
_NUM = Field("number")

POOL_SETTINGS: Schema = {
    "warn_percent": _NUM,
    "critical_percent": _NUM,
    "iops_capacity": _NUM,
    "cost_s0": Field("integer"),
    "latency_target_ms": _NUM,
    "background_shares": _NUM,
    "alloc_unit": Field("integer"),
}

#: (method, route template) -> the body it takes. Routes not listed take no body.
SCHEMAS: dict[tuple[str, str], Schema] = {
    ("POST", "/api/v1/volumes"): {
        "name": Field("string", required=True),
        "size": Field("size", required=True),
        "thick": Field("bool"),
        "pool": _STR,
    },
    ("POST", "/api/v1/volumes/{name}/flatten"): {},
    ("POST", "/api/v1/volumes/{name}/reset"): {},
    ("POST", "/api/v1/volumes/{name}/resize"): {"size": Field("size", required=True), "force": Field("bool")},
    ("POST", "/api/v1/volumes/{name}/migrate"): {
        "pool": Field("string", required=True),
        "provisioning": Field("enum", nullable=True, choices=("thick", "thin")),
        "bps_limit": Field("rate"),
    },
    ("POST", "/api/v1/volumes/{name}/snapshots"): {"name": Field("string", required=True)},
    ("POST", "/api/v1/volumes/{name}/snapshots/{snap}/revert"): {"force": Field("bool")},
    ("POST", "/api/v1/volumes/{name}/acl"): {
        "kind": Field("enum", required=True, choices=("cn", "san", "address")),
        "value": Field("string", required=True),
        "read_only": Field("bool"),
    },
    ("POST", "/api/v1/jobs/{id}/cancel"): {},
    ("POST", "/api/v1/volumes/{name}/move"): {"node": Field("string", required=True), "wait": Field("bool")},
    ("POST", "/api/v1/nodes/{node}/drain"): {},
    ("POST", "/api/v1/pools"): {
        "name": Field("string", required=True),
        "path": _STR,  # a file pool; or:
        "rbd": Field(
            "object",
            fields={"pool": Field("string", required=True), "namespace": _STR, "conf": _STR, "user": _STR},
        ),
        "settings": Field("object", fields=POOL_SETTINGS),
    },
    ("PATCH", "/api/v1/pools/{name}"): POOL_SETTINGS,
    ("POST", "/api/v1/pools/{name}/calibrate"): {"seconds": _NUM, "apply": Field("bool")},
    ("PATCH", "/api/v1/volumes/{name}/qos"): {
        "shares": _NUM,
        "reservation": _NUM,
        "limit": _NUM,
        "bps_limit": _NUM,
        "group": Field("string", nullable=True),
    },
    ("POST", "/api/v1/qos/groups"): {
        "name": Field("string", required=True),
        "parent": Field("string", nullable=True),
        "shares": _NUM,
        "reservation": _NUM,
        "limit": _NUM,
    },
    ("PATCH", "/api/v1/qos/groups/{name}"): {
        "parent": Field("string", nullable=True),
        "shares": _NUM,
        "reservation": _NUM,
        "limit": _NUM,
    },
    ("PUT", "/api/v1/debug/faults"): {
        "pool": Field("string", required=True),
        "error": Field("string", nullable=True),
        "ops": Field("strings"),
        "rate": _NUM,
        "count": Field("integer", nullable=True),
        "delay_ms": _NUM,
        "device_iops": _NUM,
    },
}


#: A body with this field takes this schema instead (POST /api/v1/volumes with "source"
#: makes a linked clone).
VARIANTS: dict[tuple[str, str], tuple[str, Schema]] = {
    ("POST", "/api/v1/volumes"): (
        "source",
        {"name": Field("string", required=True), "source": Field("string", required=True)},
    ),
}


def schema_for(method: str, route: str, body: Mapping[str, Any]) -> Schema | None:
    """The schema of route `route` (its template, "/api/v1/volumes/{name}"), None if the
    route takes no body."""
    variant = VARIANTS.get((method, route))
    if variant is not None and variant[0] in body:
        return variant[1]
    return SCHEMAS.get((method, route))


def _bad(where: str, what: str) -> CatalogError:
    return CatalogError("invalid", f"field {where!r} must be {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(where: str, spec: Field, v: Any) -> None:
    kind = spec.kind
    if kind == "string" or kind == "enum":
        if not isinstance(v, str):
            raise _bad(where, "a string")
        if len(v) > MAX_STRING:
            raise _bad(where, f"at most {MAX_STRING} characters")
        if kind == "enum" and v not in spec.choices:
            raise _bad(where, "one of " + ", ".join(spec.choices))
    elif kind == "bool":
        if not isinstance(v, bool):
            raise _bad(where, "true or false")
    elif kind == "integer":
        if not _is_int(v) or not -MAX_INT <= v <= MAX_INT:
            raise _bad(where, "a whole number")
    elif kind == "number":
        if not (_is_int(v) or isinstance(v, float)) or not -MAX_NUMBER <= v <= MAX_NUMBER:
            raise _bad(where, "a number")  # NaN fails the comparison too
    elif kind in ("size", "rate"):
        what = "bytes or a string like '10G'" if kind == "size" else "bytes per second or a string like '50M'"
        if isinstance(v, str):
            if not 0 < len(v) <= 32:
                raise _bad(where, what)
        elif kind == "rate" and isinstance(v, float):
            if not math.isfinite(v) or not 0 <= v <= MAX_NUMBER:
                raise _bad(where, what)
        elif not _is_int(v) or not 0 <= v <= MAX_INT:
            raise _bad(where, what)
    elif kind == "strings":
        if not isinstance(v, list) or not all(isinstance(x, str) and len(x) <= MAX_STRING for x in v):
            raise _bad(where, "a list of strings")
    elif kind == "object":
        if not isinstance(v, dict):
            raise _bad(where, "a JSON object")
        check(v, spec.fields, prefix=f"{where}.")
    else:  # pragma: no cover - a schema bug
        raise AssertionError(kind)


def check(body: Mapping[str, Any], schema: Schema, *, prefix: str = "") -> None:
    """Raise CatalogError('invalid') unless `body` fits `schema`."""
    unknown = sorted(k for k in body if k not in schema)
    if unknown:
        shown = ", ".join(repr(k[:64]) for k in unknown[:5])
        known = ", ".join(schema) or "none"
        where = f" in {prefix[:-1]!r}" if prefix else ""
        raise CatalogError("invalid", f"unknown field(s): {shown}{where} (known: {known})")
    for key, spec in schema.items():
        where = prefix + key
        if key not in body or (body[key] is None and not spec.nullable):
            if spec.required:
                raise CatalogError("invalid", f"missing field {where!r}")
            if key in body:
                raise _bad(where, "a value, not null")
            continue
        if body[key] is not None:
            _check_value(where, spec, body[key])
