"""nbdinfo (libnbd) against blockvirt: export flags, listing, size, and the allocation map."""

from __future__ import annotations

import json
from typing import Any

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import MiB, need, qemu_io, run, volume_info

pytestmark = pytest.mark.interop

HOLE_ZERO, ZERO, DATA = 3, 2, 0


def nbdinfo_json(*args: str) -> Any:
    return json.loads(run(["nbdinfo", "--json", *args]).stdout)


def extents(uri: str) -> list[tuple[int, int, int]]:
    """`nbdinfo --map --json` as (offset, length, type), neighbours of one type merged."""
    out: list[tuple[int, int, int]] = []
    for e in json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout):
        off, length, typ = e["offset"], e["length"], e["type"]
        assert length > 0
        if out and out[-1][2] == typ:
            assert out[-1][0] + out[-1][1] == off, "extents must be contiguous"
            out[-1] = (out[-1][0], out[-1][1] + length, typ)
        else:
            if out:
                assert out[-1][0] + out[-1][1] == off, "extents must be contiguous"
            out.append((off, length, typ))
    return out


def test_nbdinfo_json_flags(blockvirt_server: BlockvirtServer) -> None:
    need("nbdinfo")
    uri = blockvirt_server.create_volume("vol", 64 * MiB)
    info = nbdinfo_json(uri)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    [exp] = info["exports"]
    assert exp["export-name"] == "vol"
    assert exp["export-size"] == 64 * MiB
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_df"):
        assert exp[flag] is True, flag
    assert exp["is_read_only"] is False
    assert "base:allocation" in exp["contexts"]
    assert exp["block_size_minimum"] <= exp["block_size_preferred"] <= exp["block_size_maximum"]


def test_nbdinfo_size(blockvirt_server: BlockvirtServer) -> None:
    need("nbdinfo")
    for name, size in (("small", 1 * MiB), ("odd", 100 * MiB + 4096)):
        uri = blockvirt_server.create_volume(name, size)
        assert run(["nbdinfo", "--size", uri]).stdout.strip() == str(size)


def test_nbdinfo_list(blockvirt_server: BlockvirtServer) -> None:
    need("nbdinfo")
    sizes = {"alpha": 8 * MiB, "beta": 16 * MiB, "gamma": 32 * MiB}
    for name, size in sizes.items():
        blockvirt_server.create_volume(name, size)
    base = f"nbd://{blockvirt_server.nbd_host}:{blockvirt_server.nbd_port}"
    listed = nbdinfo_json("--list", base)
    got = {e["export-name"]: e["export-size"] for e in listed["exports"]}
    assert got == sizes
    text = run(["nbdinfo", "--list", base]).stdout
    for name in sizes:
        assert f'export="{name}"' in text


def test_nbdinfo_map_data_holes_and_trim(blockvirt_server: BlockvirtServer) -> None:
    need("nbdinfo", "qemu-io")
    size = 64 * MiB
    uri = blockvirt_server.create_volume("vol", size)
    assert extents(uri) == [(0, size, HOLE_ZERO)]
    assert volume_info(blockvirt_server, "vol")["allocated"] == 0

    qemu_io(uri, "write -P 0x11 0 1M", "write -P 0x22 8M 2M", "write -P 0x33 32M 1M", "flush")
    assert extents(uri) == [
        (0, 1 * MiB, DATA),
        (1 * MiB, 7 * MiB, HOLE_ZERO),
        (8 * MiB, 2 * MiB, DATA),
        (10 * MiB, 22 * MiB, HOLE_ZERO),
        (32 * MiB, 1 * MiB, DATA),
        (33 * MiB, 31 * MiB, HOLE_ZERO),
    ]
    before = volume_info(blockvirt_server, "vol")["allocated"]
    assert before >= 4 * MiB

    # Trim the 2 MiB range at 8M: it must map as a hole and its blocks must be freed.
    qemu_io(uri, "discard 8M 2M", "flush", "read -P 0 8M 2M", "read -P 0x33 32M 1M")
    assert extents(uri) == [
        (0, 1 * MiB, DATA),
        (1 * MiB, 31 * MiB, HOLE_ZERO),
        (32 * MiB, 1 * MiB, DATA),
        (33 * MiB, 31 * MiB, HOLE_ZERO),
    ]
    text = run(["nbdinfo", "--map", uri]).stdout.splitlines()
    rows = [ln.split(None, 3) for ln in text]
    assert [str(1 * MiB), str(31 * MiB), "3", "hole,zero"] in rows, text
    after = volume_info(blockvirt_server, "vol")["allocated"]
    assert after <= before - 2 * MiB, (before, after)

    # A zeroed range must be reported as reading zeros (hole or not: WRITE_ZEROES may punch).
    qemu_io(uri, "write -z -u 0 1M")
    off, length, typ = extents(uri)[0]
    assert (off, typ & ZERO) == (0, ZERO) and length >= 1 * MiB
