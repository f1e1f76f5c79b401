"""Helpers for the metrics tests: scrape and parse /metrics, pull metric names out of PromQL
(as written in the Grafana dashboard), and read the deployment files."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "blockvirt.json"

#: Words in PromQL that are neither functions (always followed by "(") nor metric names.
_KEYWORDS = frozenset(
    {
        "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
        "group_left", "group_right", "inf", "nan", "Inf", "NaN",
    }
)  # fmt: skip


def fetch(api_url: str, path: str = "/metrics") -> str:
    with urllib.request.urlopen(api_url + path, timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return str(resp.read().decode())


def samples(text: str) -> list[Sample]:
    """Every sample of an exposition (parsed by prometheus_client's own parser)."""
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def sample_names(text: str) -> set[str]:
    return {s.name for s in samples(text)}


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample with exactly these labels, or None."""
    found = [s.value for s in samples(text) if s.name == name and s.labels == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def series(text: str, name: str, **labels: str) -> list[Sample]:
    """Samples of `name` whose labels include `labels`."""
    return [s for s in samples(text) if s.name == name and labels.items() <= s.labels.items()]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana `label_values(metric, label)`) reads."""
    s = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1", expr)
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', s)  # strings (label values, regexes)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors ($__rate_interval lives here)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # any other Grafana variable
    names: set[str] = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", s):
        word = m.group()
        if word in _KEYWORDS or s[m.end() :].lstrip().startswith("("):
            continue  # a keyword, or a function / aggregation
        names.add(word)
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and template-variable queries."""
    out = [t["expr"] for p in _panels(dash["panels"]) for t in p.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out
