"""The dependency rules of docs/architecture.md, checked on the source: who may import whom.

Every `import` of a blockvirt module counts, wherever it is (inside functions and under
TYPE_CHECKING too: a type is a dependency). A new package must be given its rule here and in
the document before it may import anything.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "blockvirt"

#: Layer of each part of the package -> the parts it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "nbd": set(),
    "client": {"nbd"},
    "logs": set(),
    # storage core: nodes, the export root, the seam, the volume manager, the catalog
    "storage": set(),
    # each backend sits on the storage core and knows no other backend
    "storage.backends.cowfile": {"storage"},
    "storage.backends.rbd": {"storage"},
    "qos": {"storage"},
    "jobs": {"storage"},
    "server": {"nbd", "storage", "qos"},
    "metrics": {"storage", "jobs", "qos", "server"},
    "api": {"storage", "jobs", "qos", "server"},
    # the composition root: builds the process from every part
    "service": {
        *("nbd", "storage", "storage.backends.cowfile", "storage.backends.rbd"),
        *("qos", "jobs", "server", "metrics", "api", "logs"),
    },
    "cli": {"api", "server", "service", "storage", "logs"},
    "testing": {"cli"},
    "__main__": {"cli"},
}


def part(module: str) -> str:
    """blockvirt.storage.backends.cowfile.chain -> storage.backends.cowfile; blockvirt.nbd.x -> nbd."""
    parts = module.split(".")[1:]
    if parts[:2] == ["storage", "backends"] and len(parts) >= 3:
        return ".".join(parts[:3])
    return parts[0] if parts else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    name = ".".join(rel.parts)
    return name.removesuffix(".__init__")


def imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "blockvirt":  # from blockvirt import logs
                for alias in node.names:
                    yield node.lineno, f"blockvirt.{alias.name}"
            else:
                yield node.lineno, node.module


def violations() -> list[str]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        mine = part(module_name(path))
        for line, target in imports(path):
            if target != "blockvirt" and not target.startswith("blockvirt."):
                continue
            theirs = part(target)
            if theirs == mine:
                continue
            allowed = ALLOWED.get(mine)
            if allowed is None:
                out.append(f"{path.relative_to(ROOT.parent)}: part {mine!r} has no rule in ALLOWED")
            elif theirs not in allowed:
                out.append(f"{path.relative_to(ROOT.parent)}:{line}: {mine} may not import {target}")
    return out


def test_every_import_follows_the_dependency_rules() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("blockvirt.storage.backends.cowfile.chain", "storage.backends.cowfile"),
        ("blockvirt.storage.volumes", "storage"),
        ("blockvirt.storage.backends", "storage"),
        ("blockvirt.nbd.wire", "nbd"),
        ("blockvirt.service", "service"),
    ],
)
def test_parts(module: str, expected: str) -> None:
    assert part(module) == expected


def test_the_rule_checker_catches_a_storage_import_of_jobs(tmp_path: Path) -> None:
    """The checker is not vacuous: a storage module importing the job layer is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from blockvirt.jobs.manager import JobManager\n")
    found = [t for _, t in imports(bad)]
    assert found == ["blockvirt.jobs.manager"]
    assert part(found[0]) not in ALLOWED["storage"]
