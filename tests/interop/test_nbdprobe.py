"""The shared raw-socket conformance probe (../shared/tools/nbdprobe.py) against blockvirt.

The probe prints one markdown row per check: `| check | what the spec expects | what happened |`.
"""

from __future__ import annotations

import re
import sys

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import SHARED_DIR, MiB, run

pytestmark = pytest.mark.interop

PROBE = SHARED_DIR / "tools" / "nbdprobe.py"
SIZE = 64 * MiB

# check label -> regular expression the "got" column must match in full
EXPECT: dict[str, str] = {
    "greeting handshake flags": r"0x3",
    "client flags with unknown bit 0x4": r"closed",
    "unknown option 0x4242, then LIST": r"\['ERR_UNSUP'\] then \['SERVER:vol', 'ACK'\]",
    "LIST": r"\['SERVER:vol', 'ACK'\]",
    "LIST with payload": r"\['ERR_INVALID'\]",
    "STARTTLS on server without TLS": r"\['ERR_(UNSUP|POLICY)'\]",
    "STRUCTURED_REPLY twice": r"\['ACK'\] \['(ACK|ERR_INVALID)'\]",
    "STRUCTURED_REPLY with payload": r"\['ERR_INVALID'\]",
    "EXTENDED_HEADERS (11)": r"\['ERR_UNSUP'\]",
    "SET_META_CONTEXT before STRUCTURED_REPLY": r"\['ERR_INVALID'\]",
    "LIST_META_CONTEXT (no queries)": (
        r"\[('META_CONTEXT:[^']+', )*'META_CONTEXT:base:allocation'(, 'META_CONTEXT:[^']+')*, 'ACK'\]"
    ),
    "LIST_META_CONTEXT 'base:'": r"\['META_CONTEXT:base:allocation', 'ACK'\]",
    "SET_META_CONTEXT unknown ns 'x-nope:foo'": r"\['ACK'\]",
    "SET_META_CONTEXT truncated payload": r"\['ERR_INVALID'\]",
    "INFO unknown export": r"\['ERR_UNKNOWN'\]",
    "INFO with BLOCK_SIZE+NAME+DESC": r"\['INFO:EXPORT'(, 'INFO:(NAME|DESC|BLOCK_SIZE)')*, 'ACK'\]",
    "GO with nameLen > optLen-6": r"\['ERR_INVALID'\]",
    "GO unknown export then GO good": r"\['ERR_UNKNOWN'\] then \['INFO:EXPORT'(, 'INFO:[A-Z_]+')*, 'ACK'\]",
    "ABORT": r"\['ACK'\]",
    "EXPORT_NAME unknown": r"closed",
    "EXPORT_NAME good (no NO_ZEROES)": rf"size={SIZE} tflags=(0x[0-9a-f]+) zeroes=True",
    "simple: READ 4k @0": r"simple err=0",
    "simple: READ past EOF": r"simple err=22",
    "simple: WRITE past EOF (payload sent)": r"simple err=28; next READ -> simple err=0",
    "simple: unknown command 42": r"simple err=22",
    "simple: unknown cmd flag 0x100 on READ": r"simple err=22",
    "simple: BLOCK_STATUS w/o meta context": r"\['simple err=22'\]",
    "simple: READ len 0": r"simple err=(0|22)",  # unspecified, but the connection must stay
    "bad request magic": r"closed",
    "structured: READ 64k @0": r"\['(OFFSET_DATA|OFFSET_HOLE|NONE)'(, '(OFFSET_DATA|OFFSET_HOLE|NONE)')*\]",
    "structured: READ past EOF": r"\['ERROR\(22\)'\]",
    "structured: BLOCK_STATUS base:allocation": r"\['BLOCK_STATUS'\]",
    "DISC": r"closed",
}


def test_nbdprobe(blockvirt_server: BlockvirtServer) -> None:
    if not PROBE.exists():
        pytest.skip(f"{PROBE} is absent (shared/ sits beside the clone)")
    blockvirt_server.create_volume("vol", SIZE)
    r = run(
        [sys.executable, PROBE, blockvirt_server.nbd_host, str(blockvirt_server.nbd_port), "vol"],
        timeout=120,
    )
    rows: dict[str, str] = {}
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3, f"unexpected probe output line: {line!r}"
        rows[cells[0]] = cells[2]
    assert not [g for g in rows.values() if g.startswith("exception")], r.stdout
    missing = sorted(set(EXPECT) - set(rows))
    assert not missing, f"probe no longer runs checks {missing}:\n{r.stdout}"
    wrong = {label: rows[label] for label, pat in EXPECT.items() if not re.fullmatch(pat, rows[label])}
    assert not wrong, f"checks that failed: {wrong}\n{r.stdout}"

    # EXPORT_NAME without structured replies: HAS_FLAGS, flush/fua/trim/zero/multi-conn, no DF.
    m = re.fullmatch(EXPECT["EXPORT_NAME good (no NO_ZEROES)"], rows["EXPORT_NAME good (no NO_ZEROES)"])
    assert m is not None
    tflags = int(m.group(1), 16)
    for bit in (0x1, 0x4, 0x8, 0x20, 0x40, 0x100):
        assert tflags & bit, f"transmission flags {tflags:#x} lack {bit:#x}"
    assert not tflags & 0x2 and not tflags & 0x80, f"{tflags:#x}: read-only or DF without SR"
    assert blockvirt_server.proc is not None and blockvirt_server.proc.poll() is None
