"""Address-based access rules seen by real clients over plain NBD. They connect from 127.0.0.1;
our own client stands in for a second host from 127.0.0.2 (both are loopback). Certificate
(CN, SAN) rules are in test_tls.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

from .conftest import nbdsh_env, need, run

pytestmark = pytest.mark.interop


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BlockvirtServer]:
    with BlockvirtServer(tmp_path / "data") as s:
        s.create_volume("private", "4M")
        s.create_volume("shared", "4M")
        s.create_volume("public", "4M")
        for args in (
            ("private", "--address", "127.0.0.2"),
            ("shared", "--address", "127.0.0.2"),
            ("shared", "--address", "127.0.0.1", "--read-only"),
        ):
            r = s.cli("volume", "acl", "add", args[0], *args[1:])
            assert r.returncode == 0, r.stderr
        yield s


def test_nbdinfo_list_shows_only_what_this_client_may_open(server: BlockvirtServer) -> None:
    need("nbdinfo")
    out = run(["nbdinfo", "--list", "--json", f"nbd://{server.nbd_host}:{server.nbd_port}"]).stdout
    exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
    assert set(exports) == {"shared", "public"}
    assert exports["shared"]["is_read_only"] is True
    assert exports["public"]["is_read_only"] is False


def test_denied_client_gets_a_clear_error(server: BlockvirtServer) -> None:
    need("nbdinfo", "qemu-io", "nbdcopy")
    r = run(["nbdinfo", server.uri("private")], check=False)
    assert r.returncode != 0
    assert "server replied with error to opt_go request" in r.stderr, r.stderr
    r = run(["nbdinfo", server.uri("private")], check=False, env={**nbdsh_env(), "LIBNBD_DEBUG": "1"})
    assert "server error message: no export named 'private' for this client" in r.stderr
    r = run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", server.uri("private")], check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "no export named 'private' for this client" in out, out
    r = run(["nbdcopy", server.uri("private"), "null:"], check=False)
    assert r.returncode != 0


async def test_read_only_grant_seen_by_qemu_io_and_nbdcopy(server: BlockvirtServer, tmp_path: Path) -> None:
    need("qemu-io", "nbdcopy", "nbdinfo")
    # The writer at 127.0.0.2 (our client) puts data in; 127.0.0.1 may only read it.
    async with await NbdClient.connect(server.uri("shared"), local_host="127.0.0.2") as c:
        await c.write(0, b"\x5a" * 65536)
        await c.flush()
    assert run(["nbdinfo", "--is", "read-only", server.uri("shared")], check=False).returncode == 0
    r = run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k", server.uri("shared")], check=False)
    assert r.returncode != 0 and "wrote" not in r.stdout, r.stdout + r.stderr
    r = run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0x5a 0 64k",
            "-c",
            "write -P 0x11 0 4k",
            server.uri("shared"),
        ],
        check=False,
    )
    assert "read 65536/65536" in r.stdout and "wrote" not in r.stdout, r.stdout + r.stderr
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x11" * 65536)
    assert run(["nbdcopy", str(src), server.uri("shared")], check=False).returncode != 0
    back = tmp_path / "back.raw"
    run(["nbdcopy", server.uri("shared"), str(back)])
    assert back.read_bytes()[:65536] == b"\x5a" * 65536
