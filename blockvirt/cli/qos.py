"""`blockvirt qos ...`: per-volume shares, reservations and limits, groups, and the picture."""

from __future__ import annotations

import argparse
from typing import Any

from blockvirt.cli.client import ApiClient
from blockvirt.cli.common import EXIT_OK, Parser, UsageError, add_common, emit, human_size, q, size_arg


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 0 or v == float("inf"):  # NaN fails >= too
        raise argparse.ArgumentTypeError(f"must be 0 (none) or a positive number: {text!r}")
    return v


def _bytes_rate(text: str) -> float:
    try:
        return float(size_arg(text, "rate"))
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _knobs(p: argparse.ArgumentParser, *, volume: bool) -> None:
    p.add_argument("--shares", type=_rate, help="proportional share (default 1000; 0 resets)")
    p.add_argument("--reservation", type=_rate, metavar="IOPS", help="guaranteed 4 KiB IOPS (0 clears)")
    p.add_argument("--limit", type=_rate, metavar="IOPS", help="cap in 4 KiB IOPS (0 clears)")
    if volume:
        p.add_argument(
            "--bps-limit", type=_bytes_rate, metavar="BYTES", help="cap in bytes/s, e.g. 100M (0 clears)"
        )


def add_parser(sub: Any) -> None:
    qos = sub.add_parser("qos", help="storage I/O control: shares, reservations, limits, groups")
    add_common(qos, top=False)
    qsub = qos.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    s = qsub.add_parser("set", help="change a volume's QoS; connected clients feel it within a second")
    add_common(s, top=False)
    s.add_argument("volume")
    _knobs(s, volume=True)
    grp = s.add_mutually_exclusive_group()
    grp.add_argument("--group", help="put the volume in this group")
    grp.add_argument("--no-group", action="store_true", help="take it out of its group")
    sh = qsub.add_parser("show", help="pools, groups and volumes with their settings and what they get")
    add_common(sh, top=False)
    g = qsub.add_parser("group", help="manage QoS groups (nested: pool > group > volume)")
    add_common(g, top=False)
    gsub = g.add_subparsers(dest="group_action", metavar="ACTION", parser_class=Parser)
    for action, helptext in (("create", "create a group"), ("set", "change a group")):
        p = gsub.add_parser(action, help=helptext)
        add_common(p, top=False)
        p.add_argument("name")
        parent = p.add_mutually_exclusive_group()
        parent.add_argument("--parent", help="nest it in this group")
        if action == "set":
            parent.add_argument("--no-parent", action="store_true", help="move it to the top")
        _knobs(p, volume=False)
    p = gsub.add_parser("delete", help="delete an empty group")
    add_common(p, top=False)
    p.add_argument("name")


def _changes(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _fmt(v: float, unit: str = "") -> str:
    return "-" if not v else f"{v:g}{unit}"


def _settings_text(d: dict[str, Any]) -> str:
    parts = [f"shares {d['effective_shares']}"]
    if d.get("reservation"):
        parts.append(f"reservation {d['reservation']:g}")
    eff = d.get("effective_limit")
    if d.get("limit"):
        capped = f" (capped at {eff:g} above)" if eff and eff != d["limit"] else ""
        parts.append(f"limit {d['limit']:g}{capped}")
    elif eff:
        parts.append(f"limit {eff:g} (from above)")
    if d.get("bps_limit"):
        parts.append(f"bps-limit {human_size(d['bps_limit'])}/s")
    return ", ".join(parts)


def show_text(data: dict[str, Any]) -> str:
    lines: list[str] = []
    groups = {g["group"]: g for g in data["groups"]}
    for pool in data["pools"]:
        cap = pool["capacity"]
        eff = pool["effective_capacity"]
        head = f"pool {pool['pool']}: capacity " + (f"{cap:g} IOPS" if cap else "not capped")
        if pool["latency_target_ms"]:
            head += f", latency target {pool['latency_target_ms']:g} ms"
            if pool.get("latency_ms") is not None:
                head += f" (now {pool['latency_ms']:g} ms)"
        if eff != cap:
            head += f", effective {eff:g} IOPS" if eff else ", effective: not capped"
        if pool["reserved"]:
            head += f", reserved {pool['reserved']:g}"
        if pool["queued"]:
            head += f", {pool['queued']} waiting"
        lines.append(head)
        lines += [f"  warning: {w}" for w in pool["warnings"]]
        vols = [v for v in data["volumes"] if v.get("pool") == pool["pool"]]
        _walk(lines, None, "  ", groups, vols)
    for g in groups.values():
        used = any(v["group"] == g["group"] for v in data["volumes"])
        if not used and not any(x["parent"] == g["group"] for x in groups.values()):
            lines.append(f"(empty) group {g['group']}: {_settings_text(g)}")
    return "\n".join(lines)


def _walk(
    lines: list[str],
    group: str | None,
    indent: str,
    groups: dict[str, dict[str, Any]],
    vols: list[dict[str, Any]],
) -> None:
    for g in [g for g in groups.values() if g["parent"] == group]:
        if not _has_members(g["group"], groups, vols):
            continue
        lines.append(f"{indent}group {g['group']}: {_settings_text(g)}")
        _walk(lines, g["group"], indent + "  ", groups, vols)
    for v in [v for v in vols if v["group"] == group]:
        got = f"{v['iops']:g} IOPS" if v.get("iops") is not None else "idle"
        wait = f", waited {v['wait_seconds']:.1f} s" if v.get("wait_seconds") else ""
        lines.append(f"{indent}{v['volume']}: {_settings_text(v)}; now {got}{wait}")


def _has_members(group: str, groups: dict[str, dict[str, Any]], vols: list[dict[str, Any]]) -> bool:
    if any(v["group"] == group for v in vols):
        return True
    return any(_has_members(g["group"], groups, vols) for g in groups.values() if g["parent"] == group)


def run(args: argparse.Namespace, api: ApiClient) -> int:
    if args.action == "set":
        changes = _changes(args, ("shares", "reservation", "limit", "bps_limit"))
        if args.group:
            changes["group"] = args.group
        elif args.no_group:
            changes["group"] = None
        if not changes:
            raise UsageError("blockvirt qos set: give at least one setting (see --help)")
        out = api.request("PATCH", f"/api/v1/volumes/{q(args.volume)}/qos", changes)
        emit(
            args,
            out,
            f"qos of {args.volume}: {_settings_text(out)}"
            + (f", group {out['group']}" if out["group"] else ""),
        )
    elif args.action == "show":
        data = api.get("/api/v1/qos")
        emit(args, data, show_text(data))
    elif args.action == "group":
        act = getattr(args, "group_action", None)
        if act == "delete":
            api.delete(f"/api/v1/qos/groups/{q(args.name)}")
            emit(args, {"deleted": args.name}, f"deleted group {args.name}")
            return EXIT_OK
        if act not in ("create", "set"):
            raise UsageError("blockvirt qos group: choose an action: create, set, delete")
        changes = _changes(args, ("shares", "reservation", "limit"))
        if args.parent:
            changes["parent"] = args.parent
        elif getattr(args, "no_parent", False):
            changes["parent"] = None
        if act == "create":
            out = api.post("/api/v1/qos/groups", {"name": args.name, **changes})
        else:
            if not changes:
                raise UsageError("blockvirt qos group set: give at least one setting (see --help)")
            out = api.request("PATCH", f"/api/v1/qos/groups/{q(args.name)}", changes)
        parent = f" in group {out['parent']}" if out["parent"] else ""
        emit(args, out, f"group {out['group']}{parent}: {_settings_text(out)}")
    else:
        raise UsageError("blockvirt qos: choose an action: set, show, group")
    return EXIT_OK
