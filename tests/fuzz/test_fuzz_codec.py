"""Fuzzing the sans-I/O codec (tools/fuzz/targets.py): server handshake, server transmission,
client handshake, client transmission.

Every run replays the seed corpus in tests/fuzz/corpus/ (real exchanges, plus any input that
once found a bug), then Hypothesis mutates seeds: flipped and inserted bytes, cut streams,
length fields set to huge values, spliced seeds, other delivery modes. Only the protocol's own
`RemoteProtocolError` may escape a target; any other exception, or a broken invariant (chiefly
buffers bounded by what arrived, never by what a header declares), is a finding: add the
failing input to the corpus when fixing it.

Bounded in time: BLOCKVIRT_FUZZ_EXAMPLES (default 300) examples per target, a few seconds
each. Set it higher for a longer local campaign.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockvirt.nbd.exceptions import RemoteProtocolError
from tools.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"
EXAMPLES = int(os.environ.get("BLOCKVIRT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # leave no .hypothesis directory behind; failures print their input
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def seeds(target: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / target).glob("*.bin"))]


def run(target: str, data: bytes) -> None:
    try:
        TARGETS[target](data)
    except RemoteProtocolError:
        pass  # the peer broke the protocol: the adapter would close the connection


def test_every_target_has_seeds() -> None:
    assert set(TARGETS) == {p.name for p in CORPUS.iterdir() if p.is_dir()}
    for target in TARGETS:
        assert len(seeds(target)) >= 4, target


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*/*.bin")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_corpus_replays(path: Path) -> None:
    data = path.read_bytes()
    for ctl in (data[0], data[0] ^ 0x01, data[0] ^ 0x02, (data[0] + 8) % 256):  # other delivery modes
        run(path.parent.name, bytes([ctl]) + data[1:])


_HUGE = [0xFFFFFFFF, 0x80000000, 0x04000001, 0x00010001, 0x7FFFFFFF]


@st.composite
def mutated(draw: st.DrawFn, target: str) -> bytes:
    pool = seeds(target)
    data = bytearray(draw(st.sampled_from(pool)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "huge", "cut", "splice", "ctl", "dup"]))
        n = len(data)
        at = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n > 1:
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "huge" and n >= 5:  # a length or count field that promises a lot
            at = max(at, 1)
            data[at : at + 4] = struct.pack(">I", draw(st.sampled_from(_HUGE)))
        elif op == "cut":
            del data[max(at, 1) :]
        elif op == "splice":
            other = draw(st.sampled_from(pool))
            data[at:] = other[draw(st.integers(1, max(len(other) - 1, 1))) :]
        elif op == "ctl" and n:
            data[0] = draw(st.integers(0, 255))
        elif op == "dup" and n > 1:
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


def inputs(target: str) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated(target), st.binary(max_size=512))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz(target: str) -> None:
    @FUZZ
    @given(data=inputs(target))
    def check(data: bytes) -> None:
        run(target, data)

    check()
