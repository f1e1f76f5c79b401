#!/usr/bin/env python3
"""Write the seed corpus of the NBD fuzz targets into tests/fuzz/corpus/<target>/.

Seeds are real exchanges: the client bytes of every golden vector (protocol/vectors) for the
server targets, and replies our own server codec produces for the client targets. Each file is
one control byte (see tools/fuzz/targets.py) and a byte stream. Inputs that found a bug are
kept beside them by hand (name them after the bug); this script never deletes files.

    python tools/fuzz/make_corpus.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from blockvirt.nbd import wire
from blockvirt.nbd.constants import IHAVEOPT, Cmd, Errno, HandshakeFlag, Info, Opt, Rep
from blockvirt.nbd.transmission import ServerTransmission
from tools.fuzz.targets import CLIENT_REQUESTS, EXPORT_SIZE

CORPUS = ROOT / "tests" / "fuzz" / "corpus"


def write(target: str, name: str, ctl: int, stream: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.bin").write_bytes(bytes([ctl]) + stream)


def vectors() -> list[tuple[str, dict[str, object]]]:
    return [
        (p.stem, json.loads(p.read_text())) for p in sorted((ROOT / "protocol" / "vectors").glob("*/*.json"))
    ]


def c2s(vector: dict[str, object]) -> bytes:
    out = b""
    for step in vector["steps"]:  # type: ignore[attr-defined]
        if step["dir"] == "c2s":
            out += bytes(step["zeros"]) if "zeros" in step else bytes.fromhex(step["hex"])
    return out


def server_seeds() -> None:
    for name, vec in vectors():
        stream = c2s(vec)
        if len(stream) > 70000:
            continue  # the big-payload vectors add size, not coverage
        write("server_handshake", name, 0x00, stream)
        # The requests after the handshake, for the transmission target: the vector's c2s
        # steps after the one that sent GO or EXPORT_NAME.
        tail = b""
        started = False
        for step in vec["steps"]:  # type: ignore[attr-defined]
            if step["dir"] != "c2s":
                continue
            raw = bytes.fromhex(step.get("hex", "")) if "hex" in step else bytes(step["zeros"])
            if started:
                tail += raw
            elif raw[:8] == IHAVEOPT.to_bytes(8, "big") and int.from_bytes(raw[8:12], "big") in (Opt.GO, 1):
                started = True
        if tail:
            structured = any(
                e.get("structured") for e in vec["expect"]["events"] if e["event"] == "negotiated"
            )  # type: ignore[index]
            write("server_transmission", name, 0x01 if structured else 0x00, tail)


def client_seeds() -> None:
    greeting = wire.greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
    sr = wire.option_reply(Opt.STRUCTURED_REPLY, Rep.ACK)
    lst = (
        wire.option_reply(Opt.LIST, Rep.SERVER, wire.lp_string("disk") + b"fuzz disk")
        + wire.option_reply(Opt.LIST, Rep.SERVER, wire.lp_string("ro"))
        + wire.option_reply(Opt.LIST, Rep.ACK)
    )
    meta = wire.option_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, wire.U32.pack(1) + b"base:allocation")
    meta += wire.option_reply(Opt.SET_META_CONTEXT, Rep.ACK)
    meta_list = wire.option_reply(
        Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, wire.U32.pack(0) + b"base:allocation"
    )
    meta_list += wire.option_reply(Opt.LIST_META_CONTEXT, Rep.ACK)

    def info(opt: int) -> bytes:
        out = wire.option_reply(opt, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, EXPORT_SIZE, 0x0DED))
        out += wire.option_reply(opt, Rep.INFO, wire.U16.pack(Info.NAME) + b"disk")
        out += wire.option_reply(opt, Rep.INFO, wire.U16.pack(Info.DESCRIPTION) + b"fuzz disk")
        out += wire.option_reply(opt, Rep.INFO, wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 1, 4096, 1 << 25))
        return out + wire.option_reply(opt, Rep.ACK)

    denied = wire.option_reply(Opt.GO, Rep.ERR_POLICY, b"access to export 'disk' is denied")
    write("client_handshake", "full", 0, greeting + sr + lst + meta + info(Opt.INFO) + info(Opt.GO))
    write("client_handshake", "list_go_denied", 1, greeting + lst + denied)
    write("client_handshake", "list_go", 1, greeting + lst + info(Opt.GO))
    write(
        "client_handshake",
        "meta_list_export_name",
        2,
        greeting + sr + meta_list + wire.EXPORT_NAME_REPLY.pack(EXPORT_SIZE, 0x0DED),
    )
    write(
        "client_handshake",
        "export_name_zeroes",
        3,
        wire.greeting(HandshakeFlag.FIXED_NEWSTYLE)
        + wire.EXPORT_NAME_REPLY.pack(EXPORT_SIZE, 0x0D6D)
        + bytes(124),
    )

    for structured in (False, True):
        tx = ServerTransmission(structured)
        out: list[bytes] = []
        for cookie, (cmd, offset, length) in enumerate(CLIENT_REQUESTS, 1):
            if cmd == Cmd.READ and length == 0:
                out.append(tx.read_empty(cookie))
            elif cmd == Cmd.READ:
                half = length // 2
                segs = [(offset, half, bytes([cookie]) * half), (offset + half, length - half, None)]
                out.append(b"".join(bytes(b) for b in tx.read_segments(cookie, segs)))
            elif cmd == Cmd.BLOCK_STATUS:
                if structured:
                    out.append(tx.block_status(cookie, {1: [(4096, 0), (EXPORT_SIZE - 4096, 3)]}))
                else:
                    out.append(tx.error(cookie, Errno.EINVAL, "no metadata context was negotiated"))
            elif cmd == Cmd.TRIM:
                out.append(tx.error(cookie, Errno.EPERM, "export is read-only"))
            else:
                out.append(tx.ok(cookie))
        kind = "structured" if structured else "simple"
        write("client_transmission", f"replies_{kind}", int(structured), b"".join(out))
        write(
            "client_transmission", f"replies_{kind}_reversed", int(structured) | 0x08, b"".join(reversed(out))
        )


def main() -> int:
    server_seeds()
    client_seeds()
    files = sorted(CORPUS.glob("*/*.bin"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:12]
    print(f"{len(files)} seed files in {CORPUS.relative_to(ROOT)} ({digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
