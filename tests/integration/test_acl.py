"""Per-volume access rules over real sockets: our NBD client connects from 127.0.0.1 or
127.0.0.2 (both loopback), against a `blockvirt serve` process; rules are managed through
the API and the CLI."""

from __future__ import annotations

import json
import re
import socket
import struct
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvirt.cli.client import ApiError
from blockvirt.client import NbdClient, NbdClientError, list_exports
from blockvirt.nbd.constants import Errno, Rep
from blockvirt.testing import BlockvirtServer

MiB = 1 << 20
A1, A2 = "127.0.0.1", "127.0.0.2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockvirtServer]:
    data = tmp_path_factory.mktemp("acl") / "data"
    with BlockvirtServer(data, extra_args=("--log-format", "json"), log_level="info") as s:
        yield s


def acl(server: BlockvirtServer, name: str) -> dict[str, Any]:
    out: dict[str, Any] = server.api.get(f"/api/v1/volumes/{name}/acl")
    return out


def add_rule(server: BlockvirtServer, name: str, kind: str, value: str, read_only: bool = False) -> int:
    rule = server.api.post(
        f"/api/v1/volumes/{name}/acl", {"kind": kind, "value": value, "read_only": read_only}
    )
    return int(rule["id"])


def denied_total(server: BlockvirtServer, volume: str) -> float:
    with urllib.request.urlopen(server.api_url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    m = re.search(rf'^blockvirt_access_denied_total\{{volume="{re.escape(volume)}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def opens(server: BlockvirtServer, export: str, local: str) -> NbdClient:
    return await NbdClient.connect(server.uri(export), local_host=local)


async def test_a_volume_without_rules_is_open_to_everyone(server: BlockvirtServer) -> None:
    server.create_volume("open1", MiB)
    assert acl(server, "open1") == {"volume": "open1", "mode": "open", "rules": []}
    for local in (A1, A2):
        async with await opens(server, "open1", local) as c:
            await c.write(0, b"x" * 512)
        names = [n for n, _ in await list_exports(server.nbd_host, server.nbd_port, local_host=local)]
        assert "open1" in names


async def test_address_rule_admits_one_source_and_refuses_the_other(server: BlockvirtServer) -> None:
    server.create_volume("addr1", MiB)
    rid = add_rule(server, "addr1", "address", "127.0.0.2")
    got = acl(server, "addr1")
    assert got["mode"] == "restricted"
    [rule] = got["rules"]
    assert rule == {"id": rid, "kind": "address", "value": "127.0.0.2/32", "read_only": False} | {
        "created": rule["created"]
    }
    before = denied_total(server, "addr1")

    async with await opens(server, "addr1", A2) as c:  # allowed: full access
        assert not c.export.read_only
        await c.write(0, b"from .2")
        assert await c.read(0, 7) == b"from .2"

    with pytest.raises(NbdClientError) as e:
        await opens(server, "addr1", A1)
    assert e.value.reply == Rep.ERR_UNKNOWN  # as if it did not exist (spec §3.7)
    assert "no export named 'addr1' for this client" in str(e.value)
    with pytest.raises(NbdClientError) as e:
        await NbdClient.info(server.uri("addr1"), local_host=A1)
    assert e.value.reply == Rep.ERR_UNKNOWN
    assert "access to export 'addr1' denied" in server.log()  # the real reason, server-side
    # One per refused session (the first tried SET_META_CONTEXT, then GO: one attempt).
    assert denied_total(server, "addr1") == before + 2

    # LIST shows only what the client may open.
    seen1 = [n for n, _ in await list_exports(server.nbd_host, server.nbd_port, local_host=A1)]
    seen2 = [n for n, _ in await list_exports(server.nbd_host, server.nbd_port, local_host=A2)]
    assert "addr1" not in seen1 and "addr1" in seen2

    # A CIDR covering both admits both again; removing the rules reopens the volume.
    rid2 = add_rule(server, "addr1", "address", "127.0.0.0/30")
    async with await opens(server, "addr1", A1):
        pass
    server.api.delete(f"/api/v1/volumes/addr1/acl/{rid2}")
    with pytest.raises(NbdClientError):
        await opens(server, "addr1", A1)
    out = server.api.delete("/api/v1/volumes/addr1/acl")
    assert out == {"volume": "addr1", "removed": [rid]}
    async with await opens(server, "addr1", A1):
        pass


async def test_read_only_rule_advertises_read_only_and_refuses_writes(server: BlockvirtServer) -> None:
    server.create_volume("ro1", MiB)
    add_rule(server, "ro1", "address", "127.0.0.2/32")  # .2 writes
    add_rule(server, "ro1", "address", "127.0.0.0/8", read_only=True)  # the rest of loopback reads
    async with await opens(server, "ro1", A2) as c:
        assert not c.export.read_only
        await c.write(0, b"data")
    async with await opens(server, "ro1", A1) as c:
        assert c.export.read_only and not c.export.can_trim and not c.export.can_zero
        assert await c.read(0, 4) == b"data"
        with pytest.raises(NbdClientError) as e:
            await c.write(0, b"nope")
        assert e.value.errno == Errno.EPERM
        with pytest.raises(NbdClientError) as e:
            await c.trim(0, 4096)
        assert e.value.errno == Errno.EPERM
        assert await c.read(0, 4) == b"data"


async def test_snapshot_exports_follow_the_volume_rules(server: BlockvirtServer) -> None:
    server.create_volume("snapacl", MiB)
    server.api.post("/api/v1/volumes/snapacl/snapshots", {"name": "s1"})
    async with await opens(server, "snapacl@s1", A1):
        pass
    add_rule(server, "snapacl", "address", "127.0.0.2")
    with pytest.raises(NbdClientError) as e:
        await opens(server, "snapacl@s1", A1)
    assert e.value.reply == Rep.ERR_UNKNOWN
    async with await opens(server, "snapacl@s1", A2) as c:
        assert c.export.read_only
    seen1 = [n for n, _ in await list_exports(server.nbd_host, server.nbd_port, local_host=A1)]
    assert "snapacl@s1" not in seen1


def test_denied_and_unknown_exports_look_the_same(server: BlockvirtServer) -> None:
    """A refused client cannot probe names: a denied export, a missing snapshot of it and a
    name that does not exist get the same reply."""
    server.create_volume("unk", MiB)
    add_rule(server, "unk", "address", "127.0.0.2")

    async def go(name: str) -> int:
        with pytest.raises(NbdClientError) as e:
            await opens(server, name, A1)
        return e.value.reply

    import asyncio

    assert asyncio.run(go("unk@nosnap")) == Rep.ERR_UNKNOWN
    assert asyncio.run(go("nothere")) == Rep.ERR_UNKNOWN
    assert asyncio.run(go("unk")) == Rep.ERR_UNKNOWN


def _raw(server: BlockvirtServer, local: str) -> socket.socket:
    s = socket.create_connection((server.nbd_host, server.nbd_port), timeout=10, source_address=(local, 0))
    greeting = b""
    while len(greeting) < 18:
        greeting += s.recv(18 - len(greeting))
    s.sendall(struct.pack(">I", 3))
    return s


def test_export_name_for_a_denied_export_closes(server: BlockvirtServer) -> None:
    server.create_volume("exn", MiB)
    add_rule(server, "exn", "address", "127.0.0.2")
    ihave = 0x49484156454F5054
    with _raw(server, A1) as s:
        s.sendall(struct.pack(">QII", ihave, 1, 3) + b"exn")
        assert s.recv(100) == b""  # closed without a word
    with _raw(server, A2) as s:
        s.sendall(struct.pack(">QII", ihave, 1, 3) + b"exn")
        reply = s.recv(10)
        assert len(reply) == 10 and struct.unpack(">Q", reply[:8])[0] == MiB


def test_denial_is_logged_with_peer_identity_and_export(server: BlockvirtServer) -> None:
    server.create_volume("logged", MiB)
    add_rule(server, "logged", "cn", "alice")
    import asyncio

    with pytest.raises(NbdClientError):
        asyncio.run(opens(server, "logged", A2))
    lines = [json.loads(ln) for ln in server.log().splitlines() if ln.startswith("{")]
    hits = [ln for ln in lines if ln.get("export") == "logged" and "denied" in ln["msg"]]
    assert hits, server.log()
    hit = hits[-1]
    assert hit["level"] == "warning" and hit["peer"].startswith("127.0.0.2:")
    assert "option" in hit and "session" in hit
    assert "no access rule matches 127.0.0.2 (no client certificate)" in hit["msg"]


def test_rules_go_away_with_their_volume(server: BlockvirtServer) -> None:
    server.create_volume("gone", MiB)
    add_rule(server, "gone", "address", "10.0.0.0/8")
    add_rule(server, "gone", "cn", "bob", read_only=True)
    server.api.delete("/api/v1/volumes/gone")
    server.create_volume("gone", MiB)
    assert acl(server, "gone")["rules"] == []
    catalog_rows = _catalog_rows(server.data_dir, "gone")
    assert catalog_rows == 0


def _catalog_rows(data_dir: Path, volume: str) -> int:
    import sqlite3

    db = sqlite3.connect(f"file:{data_dir / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        (n,) = db.execute("SELECT count(*) FROM acl_rules WHERE volume = ?", (volume,)).fetchone()
        (version,) = db.execute("PRAGMA user_version").fetchone()
        assert version >= 2
        return int(n)
    finally:
        db.close()


def test_rule_api_errors(server: BlockvirtServer) -> None:
    server.create_volume("apierr", MiB)
    base = "/api/v1/volumes/apierr/acl"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"kind": "ip", "value": "1.2.3.4"}, "field 'kind' must be one of cn, san, address"),
        ({"kind": "address", "value": "1.2.3.400"}, "is not an IP address or CIDR"),
        ({"kind": "address", "value": 7}, "field 'value' must be a string"),
        ({"kind": "cn", "value": ""}, "a CN must be a non-empty string"),
        ({"kind": "cn", "value": "a\nb"}, "control characters"),
        ({"kind": "cn", "value": "x" * 300}, "longer than 256"),
        ({"kind": "san", "value": "IP:nope"}, "is not an IP address"),
        ({"kind": "cn", "value": "alice", "read_only": "yes"}, "field 'read_only' must be true or false"),
        ({"kind": "cn", "value": "alice", "extra": 1}, "unknown field(s): 'extra'"),
        ({"value": "alice"}, "missing field 'kind'"),
    ]
    for body, message in cases:
        with pytest.raises(ApiError) as e:
            server.api.post(base, body)
        assert e.value.status == 400 and e.value.code == "invalid", body
        assert message in e.value.message, (body, e.value.message)
    assert acl(server, "apierr")["rules"] == []

    add_rule(server, "apierr", "san", "dns:Host.Example")
    with pytest.raises(ApiError) as e:  # the same rule, normalized the same way
        server.api.post(base, {"kind": "san", "value": "DNS:host.example"})
    assert e.value.status == 409
    for path, status in (
        ("/api/v1/volumes/nope/acl", 404),
        ("/api/v1/volumes/bad%20name/acl", 400),
        ("/api/v1/volumes/apierr/acl/999999", 404),
        ("/api/v1/volumes/apierr/acl/x1", 400),
    ):
        with pytest.raises(ApiError) as e:
            server.api.delete(path) if "/acl/" in path else server.api.get(path)
        assert e.value.status == status, (path, e.value.message)


def test_cli_acl_commands(server: BlockvirtServer) -> None:
    server.create_volume("clia", MiB)
    r = server.cli("volume", "acl", "show", "clia")
    assert r.returncode == 0 and "no access rules (open to every client)" in r.stdout
    r = server.cli("volume", "acl", "add", "clia", "--cn", "alice")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"added rule \d+ to clia: cn alice \(read-write\)\n", r.stdout)
    r = server.cli("volume", "acl", "add", "clia", "--address", "10.1.2.3/16", "--read-only", "--json")
    assert r.returncode == 0, r.stderr
    rule = json.loads(r.stdout)
    assert rule["value"] == "10.1.0.0/16" and rule["read_only"] is True
    r = server.cli("volume", "acl", "show", "clia")
    assert "only clients matching a rule may connect" in r.stdout
    assert re.search(r"address\s+10\.1\.0\.0/16\s+read-only", r.stdout), r.stdout
    r = server.cli("volume", "acl", "remove", "clia", str(rule["id"]))
    assert r.returncode == 0 and f"removed rule {rule['id']} from clia" in r.stdout
    r = server.cli("volume", "acl", "show", "clia", "--json")
    assert [x["value"] for x in json.loads(r.stdout)["rules"]] == ["alice"]
    r = server.cli("volume", "acl", "clear", "clia")
    assert r.returncode == 0 and "removed 1 rule(s) from clia" in r.stdout
    # Usage errors: no identity, two identities, bad value (one line from the API).
    r = server.cli("volume", "acl", "add", "clia")
    assert r.returncode == 2 and "one of the arguments --cn --san --address is required" in r.stderr
    r = server.cli("volume", "acl", "add", "clia", "--cn", "a", "--address", "::1")
    assert r.returncode == 2
    r = server.cli("volume", "acl", "add", "clia", "--address", "300.1.1.1")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not an IP address or CIDR" in r.stderr
    r = server.cli("volume", "acl", "remove", "clia", "12345")
    assert r.returncode == 1 and "has no access rule 12345" in r.stderr
