"""protocol/spec.md and blockvirt/nbd/constants.py must name the same values.

Every markdown table in spec.md whose header starts `| Name | Value |` is a constant table. Each
one must equal exactly one of the expected tables below (same names, same values), and every
expected table must appear once. Tables are matched by their set of names, so headings and
order in spec.md can change freely.
"""

from __future__ import annotations

import enum
from pathlib import Path

import pytest

from blockvirt.nbd import constants as c
from blockvirt.nbd.events import ExportInfo
from blockvirt.nbd.handshake import CONTEXT_IDS, MAX_META_QUERIES
from blockvirt.storage.node import Capabilities

SPEC = Path(__file__).resolve().parents[2] / "protocol" / "spec.md"

Table = dict[str, int]


def parse_tables(text: str) -> list[tuple[int, Table]]:
    """(line number, {name: value}) for every `| Name | Value |` table."""
    tables: list[tuple[int, Table]] = []
    current: Table | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("| Name | Value |"):
            current = {}
            tables.append((lineno, current))
            continue
        if current is None:
            continue
        if not line.startswith("|"):
            current = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if set(cells[0]) <= {"-", ":"}:
            continue
        name = cells[0].strip("`")
        assert name not in current, f"spec.md:{lineno}: {name} twice in one table"
        current[name] = int(cells[1], 0)
    return tables


def from_enum(prefix: str, members: type[enum.Enum], *, skip: tuple[str, ...] = ()) -> Table:
    return {f"{prefix}{m.name}": int(m.value) for m in members if m.name not in skip}


def expected_tables() -> dict[str, Table]:
    return {
        "magic numbers": {
            "NBDMAGIC": c.NBDMAGIC,
            "IHAVEOPT": c.IHAVEOPT,
            "NBD_OPT_REPLY_MAGIC": c.OPT_REPLY_MAGIC,
            "NBD_REQUEST_MAGIC": c.REQUEST_MAGIC,
            "NBD_SIMPLE_REPLY_MAGIC": c.SIMPLE_REPLY_MAGIC,
            "NBD_STRUCTURED_REPLY_MAGIC": c.STRUCTURED_REPLY_MAGIC,
        },
        "HandshakeFlag": from_enum("NBD_FLAG_", c.HandshakeFlag),
        "ClientFlag": from_enum("NBD_FLAG_", c.ClientFlag),
        "Opt": from_enum("NBD_OPT_", c.Opt),
        "Rep": from_enum("NBD_REP_", c.Rep),
        "Info": from_enum("NBD_INFO_", c.Info),
        "TransmissionFlag": from_enum("NBD_FLAG_", c.TransmissionFlag),
        "Cmd": from_enum("NBD_CMD_", c.Cmd),
        "CmdFlag": from_enum("NBD_CMD_FLAG_", c.CmdFlag),
        "Errno": from_enum("NBD_", c.Errno, skip=("OK",)),
        "ReplyType": from_enum("NBD_REPLY_TYPE_", c.ReplyType),
        "ReplyFlag": from_enum("NBD_REPLY_FLAG_", c.ReplyFlag),
        "BlockState": from_enum("NBD_STATE_", c.BlockState),
        "DirtyState": from_enum("NBD_STATE_", c.DirtyState),
        "context ids": dict(CONTEXT_IDS),
        "limits": {
            "MAX_STRING": c.MAX_STRING,
            "MAX_OPTION_LENGTH": c.MAX_OPTION_LENGTH,
            "MAX_META_QUERIES": MAX_META_QUERIES,
            "MAX_PAYLOAD_ADVERTISED": c.MAX_PAYLOAD_ADVERTISED,
            "MAX_PAYLOAD_SERVED": c.MAX_PAYLOAD_SERVED,
        },
        "block sizes": {
            "minimum": Capabilities().min_block,
            "preferred": Capabilities().pref_block,
            "maximum": Capabilities().max_block,
        },
    }


SPEC_TABLES = parse_tables(SPEC.read_text(encoding="utf-8"))
EXPECTED = expected_tables()


def test_spec_has_constant_tables() -> None:
    assert len(SPEC_TABLES) == len(EXPECTED), [line for line, _ in SPEC_TABLES]


@pytest.mark.parametrize("what", sorted(EXPECTED))
def test_table_matches_code(what: str) -> None:
    want = EXPECTED[what]
    same_names = [(line, table) for line, table in SPEC_TABLES if table.keys() == want.keys()]
    if not same_names:
        line, best = max(SPEC_TABLES, key=lambda lt: len(lt[1].keys() & want.keys()))
        pytest.fail(
            f"no table in spec.md lists exactly the {what} names; closest is at line {line}: "
            f"missing {sorted(want.keys() - best.keys())}, extra {sorted(best.keys() - want.keys())}"
        )
    assert len(same_names) == 1, f"{what} appears in several tables: {[line for line, _ in same_names]}"
    line, table = same_names[0]
    wrong = {name: (table[name], value) for name, value in want.items() if table[name] != value}
    assert not wrong, f"spec.md:{line}: (spec, code) values differ: {wrong}"


def test_every_spec_table_is_checked() -> None:
    names = [set(t) for t in EXPECTED.values()]
    unchecked = [line for line, table in SPEC_TABLES if set(table) not in names]
    assert not unchecked, f"constant tables in spec.md with no counterpart in code, at lines {unchecked}"


def test_codec_defaults_agree() -> None:
    """What an export advertises by default is what the storage layer reports by default."""
    info, caps = ExportInfo("x", 0), Capabilities()
    assert (info.min_block, info.pref_block, info.max_block) == (
        caps.min_block,
        caps.pref_block,
        caps.max_block,
    )
    assert caps.max_block == c.MAX_PAYLOAD_ADVERTISED
