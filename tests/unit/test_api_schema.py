"""The API's request schemas: the checker itself, and that protocol/mgmt-api.md documents
exactly the fields each route's schema takes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from blockvirt.api.schema import SCHEMAS, VARIANTS, Field, check, schema_for
from blockvirt.storage.catalog import CatalogError

DOC = Path(__file__).resolve().parents[2] / "protocol" / "mgmt-api.md"


def doc_rows() -> dict[tuple[str, str], list[set[str]]]:
    """(method, path) -> the field sets of the rows that document it."""
    rows: dict[tuple[str, str], list[set[str]]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)]
        if len(cells) < 4 or cells[0] != "":
            continue
        m = re.fullmatch(r"`(GET|POST|PUT|PATCH|DELETE) ([^` ]+)`( \(\w+\))?", cells[1])
        if m:
            method, path, _ = m.groups()
            path = path.split("[")[0]
            # Field names: quoted, right after "{" or ", ", before "?", ":", "," or "}".
            body = re.sub(r"\[[^]]*\]", "[]", cells[2])  # list values are no field names
            fields = set(re.findall(r'(?:\{|, )"([a-z_0-9]+)"(?=\??[:,}])', body))
            rows.setdefault((method, path), []).append(fields)
    return rows


@pytest.mark.parametrize(("method", "route"), sorted(SCHEMAS))
def test_every_schema_is_documented_with_its_fields(method: str, route: str) -> None:
    rows = doc_rows()
    assert (method, route) in rows, f"{method} {route} is not in protocol/mgmt-api.md"
    expected = [set(SCHEMAS[(method, route)])]
    if (method, route) in VARIANTS:
        expected.append(set(VARIANTS[(method, route)][1]))
    for fields in expected:
        assert fields in rows[(method, route)], (fields, rows[(method, route)])


def test_every_documented_body_has_a_schema() -> None:
    for (method, path), bodies in doc_rows().items():
        if method in ("POST", "PUT", "PATCH"):
            assert (method, path) in SCHEMAS, f"{method} {path}: documented, no schema"
        else:
            assert bodies == [set()], f"{method} {path} documents a body"


@pytest.mark.parametrize(
    "body",
    [
        {"size": 512},  # name missing
        {"name": "x", "size": 512, "frce": True},
        {"name": 7, "size": 512},
        {"name": "x", "size": True},
        {"name": "x", "size": 10**400},
        {"name": "x", "size": -1},
        {"name": "x", "size": 1.5},
        {"name": "x", "size": "9" * 400},
        {"name": "x", "size": None},
        {"name": "x", "size": 512, "thick": "yes"},
        {"name": "x" * 5000, "size": 512},
    ],
)
def test_bad_volume_bodies(body: dict[str, Any]) -> None:
    with pytest.raises(CatalogError) as e:
        check(body, SCHEMAS[("POST", "/api/v1/volumes")])
    assert e.value.kind == "invalid"
    assert len(e.value.message) < 400


def test_good_bodies_and_the_clone_variant() -> None:
    check({"name": "x", "size": "10G", "thick": False, "pool": "p"}, SCHEMAS[("POST", "/api/v1/volumes")])
    clone = {"name": "x", "source": "v@s"}
    check(clone, schema_for("POST", "/api/v1/volumes", clone) or {})
    with pytest.raises(CatalogError, match="unknown field"):
        check({**clone, "size": 5}, schema_for("POST", "/api/v1/volumes", clone) or {})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10**4200, True, "1", [1]])
def test_numbers_must_be_finite_and_bounded(value: object) -> None:
    with pytest.raises(CatalogError, match="must be a number"):
        check({"limit": value}, {"limit": Field("number")})


def test_nested_objects_and_nullable() -> None:
    schema = SCHEMAS[("POST", "/api/v1/pools")]
    with pytest.raises(CatalogError, match="in 'settings'"):
        check({"name": "p", "path": "/x", "settings": {"bogus": 1}}, schema)
    check({"name": "p", "path": "/x", "settings": {"cost_s0": 4096}}, schema)
    qos = SCHEMAS[("PATCH", "/api/v1/volumes/{name}/qos")]
    check({"group": None}, qos)
    with pytest.raises(CatalogError, match="not null"):
        check({"limit": None}, qos)
