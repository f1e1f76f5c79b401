"""The CLI (in process via main(), and as a real subprocess) and the management API."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvirt.cli.main import main
from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

MiB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockvirtServer]:
    """One server for the module: every test uses its own volume names."""
    with BlockvirtServer(tmp_path_factory.mktemp("cli") / "data") as s:
        yield s


class Run:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def cli(server: BlockvirtServer, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run blockvirt.cli.main.main([...] + --api URL) in process; returns a Run."""

    def run(*args: str, api: str | None = None) -> Run:
        capsys.readouterr()
        code = main([*args, "--api", api or server.api_url])
        cap = capsys.readouterr()
        return Run(code, cap.out, cap.err)

    return run


def http(
    server: BlockvirtServer,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, Any, str]:
    """Raw HTTP to the API: (status, parsed JSON body or None, content type)."""
    req = urllib.request.Request(server.api_url + path, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw, status, ctype = resp.read(), resp.status, resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    parsed = json.loads(raw) if raw and "json" in ctype else None
    return status, parsed, ctype


def assert_one_line_error(run: Run) -> None:
    assert run.code != 0
    assert "Traceback" not in run.err
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    assert len(lines) == 1, run.err
    assert len(lines[0]) < 400


def metrics(server: BlockvirtServer) -> str:
    with urllib.request.urlopen(server.api_url + "/metrics", timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return str(resp.read().decode())


def metric_value(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{([^}]*)\} (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted(m.group(2).split(","))) == want:
            return float(m.group(3))
    return None


# ---------------------------------------------------------------- volume lifecycle through the CLI


def test_volume_create_list_info_delete_json(cli: Any) -> None:
    r = cli("volume", "create", "cj1", "--size", "64M", "--json")
    assert r.code == 0, r.err
    info = r.json()
    assert info["name"] == "cj1" and info["size"] == 64 * MiB and info["thick"] is False
    assert info["pool"] == "default" and info["connections"] == 0
    assert info["allocated"] < MiB

    r = cli("volume", "list", "--json")
    assert r.code == 0
    names = [v["name"] for v in r.json()]
    assert "cj1" in names

    r = cli("volume", "info", "cj1", "--json")
    assert r.code == 0 and r.json()["size"] == 64 * MiB

    r = cli("volume", "delete", "cj1", "--json")
    assert r.code == 0 and r.json() == {"deleted": "cj1"}
    r = cli("volume", "info", "cj1", "--json")
    assert r.code == 1
    assert r.json()["error"]["code"] == "not-found"
    assert "cj1" in r.err


def test_volume_commands_human_output(cli: Any) -> None:
    r = cli("volume", "create", "ch1", "--size", "1.5G")
    assert r.code == 0, r.err
    assert r.out.strip() == "created thin volume ch1 (1.5 GiB)"
    r = cli("volume", "list")
    assert r.code == 0
    header, *rows = r.out.splitlines()
    assert header.split() == ["NAME", "SIZE", "ALLOCATED", "TYPE", "POOL", "CONNECTIONS"]
    row = next(x for x in rows if x.split()[0] == "ch1")
    assert "1.5 GiB" in row and "thin" in row and "default" in row
    r = cli("volume", "info", "ch1")
    assert r.code == 0
    assert "size:        1.5 GiB (1610612736 bytes)" in r.out
    assert "type:        thin" in r.out
    r = cli("volume", "delete", "ch1")
    assert r.code == 0 and r.out.strip() == "deleted volume ch1"


def test_global_options_before_the_command(
    server: BlockvirtServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--api", server.api_url, "--json", "volume", "create", "cg1", "--size", "1M"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["name"] == "cg1"
    assert main(["--api", server.api_url, "volume", "delete", "cg1"]) == 0


def test_thick_volume_is_allocated(cli: Any) -> None:
    r = cli("volume", "create", "ck1", "--size", "32M", "--thick", "--json")
    assert r.code == 0, r.err
    info = r.json()
    assert info["thick"] is True
    assert info["allocated"] >= 32 * MiB
    r = cli("volume", "info", "ck1")
    assert "type:        thick" in r.out
    assert cli("volume", "delete", "ck1").code == 0


@pytest.mark.parametrize("name", ["../etc", "a/b", "x@y", "-x", "a" * 65, ".."])
def test_bad_names_are_refused(cli: Any, name: str) -> None:
    r = cli("volume", "create", name, "--size", "1M")
    assert_one_line_error(r)
    assert "name" in r.err


@pytest.mark.parametrize("size", ["abc", "0", "-1G", "100", "1.5", "1e6", "17T"])
def test_bad_sizes_are_refused(cli: Any, size: str) -> None:
    r = cli("volume", "create", "cs1", "--size", size)
    assert_one_line_error(r)
    assert "size" in r.err
    assert cli("volume", "info", "cs1").code == 1  # nothing was created


def test_duplicate_create_is_a_conflict(cli: Any) -> None:
    assert cli("volume", "create", "cd1", "--size", "1M").code == 0
    r = cli("volume", "create", "cd1", "--size", "2M")
    assert_one_line_error(r)
    assert "already exists" in r.err
    r = cli("volume", "create", "cd1", "--size", "2M", "--json")
    assert r.json()["error"]["code"] == "conflict"
    assert cli("volume", "info", "cd1", "--json").json()["size"] == MiB
    assert cli("volume", "delete", "cd1").code == 0


def test_delete_unknown_is_not_found(cli: Any) -> None:
    r = cli("volume", "delete", "nosuchvol")
    assert r.code == 1
    assert_one_line_error(r)
    assert "no volume named 'nosuchvol'" in r.err
    r = cli("volume", "delete", "nosuchvol", "--json")
    assert r.json()["error"]["status"] == 404


def test_info_with_a_slash_in_the_name_is_a_clean_error(cli: Any) -> None:
    r = cli("volume", "info", "../etc")
    assert_one_line_error(r)


async def test_delete_while_a_client_is_connected_is_refused(server: BlockvirtServer, cli: Any) -> None:
    assert cli("volume", "create", "cc1", "--size", "4M").code == 0
    c = await NbdClient.connect(server.uri("cc1"))
    try:
        await c.write(0, b"in use")
        r = await asyncio.to_thread(cli, "volume", "delete", "cc1")
        assert_one_line_error(r)
        assert "connected" in r.err
        info = (await asyncio.to_thread(cli, "volume", "info", "cc1", "--json")).json()
        assert info["connections"] == 1
        assert await c.read(0, 6) == b"in use"  # the client is unaffected
    finally:
        await c.close()
    for _ in range(600):  # the server drops the session after the client's DISC
        r = await asyncio.to_thread(cli, "volume", "delete", "cc1")
        if r.code == 0:
            break
        await asyncio.sleep(0.05)
    assert r.code == 0, r.err


def test_unreachable_api_is_a_clear_error(cli: Any) -> None:
    r = cli("volume", "list", api="http://127.0.0.1:1")
    assert r.code == 1
    assert_one_line_error(r)
    assert "cannot reach the blockvirt API" in r.err


def test_usage_errors(cli: Any) -> None:
    r = cli("volume", "create", "cu1")  # --size missing
    assert r.code == 2
    assert_one_line_error(r)
    r = cli("volume")
    assert r.code == 2 and "choose an action" in r.err
    r = cli("frobnicate")
    assert r.code == 2 and "Traceback" not in r.err


# ---------------------------------------------------------------- the real executable


def test_cli_subprocess_success_and_errors(server: BlockvirtServer, tmp_path: Path) -> None:
    p = server.cli("volume", "create", "cp1", "--size", "2M", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["size"] == 2 * MiB
    for args in (
        ("volume", "create", "../etc", "--size", "1M"),
        ("volume", "create", "cp2", "--size", "abc"),
        ("volume", "create", "cp1", "--size", "1M"),
        ("volume", "delete", "cp-none"),
    ):
        p = server.cli(*args)
        assert p.returncode != 0, args
        assert "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = server.cli("volume", "list", "--api", "http://127.0.0.1:1")
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and "cannot reach" in p.stderr
    assert server.cli("volume", "delete", "cp1").returncode == 0


# ---------------------------------------------------------------- pools


def test_pool_create_and_list(cli: Any, tmp_path: Path, server: BlockvirtServer) -> None:
    pool_dir = tmp_path / "fastpool"
    r = cli("pool", "create", "fast", "--path", str(pool_dir), "--json")
    assert r.code == 0, r.err
    assert r.json()["name"] == "fast" and Path(r.json()["path"]) == pool_dir
    assert pool_dir.is_dir()
    r = cli("pool", "list", "--json")
    assert {p["name"] for p in r.json()} >= {"default", "fast"}
    r = cli("pool", "list")
    assert r.out.splitlines()[0].split()[:4] == ["NAME", "PATH", "CAPACITY", "FREE"]
    assert any(line.split()[0] == "fast" for line in r.out.splitlines()[1:])
    # a volume in the new pool lives in its directory
    r = cli("volume", "create", "inpool", "--size", "1M", "--pool", "fast", "--json")
    assert r.code == 0 and r.json()["pool"] == "fast"
    assert {p.suffix for p in pool_dir.iterdir()} == {".data", ".map"}  # one layer: data + map
    assert cli("volume", "delete", "inpool").code == 0
    assert list(pool_dir.iterdir()) == []
    # errors
    r = cli("pool", "create", "fast", "--path", str(tmp_path / "other"))
    assert_one_line_error(r)
    r = cli("pool", "create", "../bad", "--path", str(tmp_path / "bad"))
    assert_one_line_error(r)
    r = cli("volume", "create", "nopool", "--size", "1M", "--pool", "missing")
    assert_one_line_error(r)
    assert "missing" in r.err


# ---------------------------------------------------------------- the API directly


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"string"', b"null"])
def test_api_bad_json_is_400(server: BlockvirtServer, body: bytes) -> None:
    status, parsed, ctype = http(server, "POST", "/api/v1/volumes", body)
    assert status == 400
    assert ctype.startswith("application/json")
    assert parsed["error"]["code"] == "invalid"
    assert parsed["error"]["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"size": "1M"}, "name"),
        ({"name": "api1"}, "size"),
        ({"name": 5, "size": "1M"}, "name"),
        ({"name": "api1", "size": True}, "size"),
        ({"name": "api1", "size": [1]}, "size"),
        ({"name": "api1", "size": "lots"}, "size"),
        ({"name": "api1", "size": "1M", "thick": "yes"}, "thick"),
        ({"name": "api1", "size": "1M", "pool": 3}, "pool"),
        ({"name": "api1", "size": 1000}, "size"),
    ],
)
def test_api_missing_or_bad_fields_are_400(
    server: BlockvirtServer, body: dict[str, Any], needle: str
) -> None:
    status, parsed, _ = http(server, "POST", "/api/v1/volumes", json.dumps(body).encode())
    assert status == 400, parsed
    assert parsed["error"]["code"] == "invalid"
    assert needle in parsed["error"]["message"]


def test_api_pool_missing_fields(server: BlockvirtServer) -> None:
    status, parsed, _ = http(server, "POST", "/api/v1/pools", b'{"name": "p"}')
    assert status == 400 and "path" in parsed["error"]["message"]


def test_api_unknown_route_and_method_are_json(server: BlockvirtServer) -> None:
    status, parsed, ctype = http(server, "GET", "/api/v1/nothing")
    assert status == 404 and ctype.startswith("application/json")
    assert parsed["error"]["code"] == "http"
    status, parsed, _ = http(server, "PUT", "/api/v1/volumes", b"{}")
    assert status == 405 and parsed["error"]["code"] == "http"
    status, parsed, _ = http(server, "GET", "/api/v1/volumes/ghost")
    assert status == 404 and parsed["error"]["code"] == "not-found"


def test_api_create_with_byte_size_and_health(server: BlockvirtServer) -> None:
    status, parsed, _ = http(server, "GET", "/api/v1/health")
    assert status == 200 and parsed == {"status": "ok"}
    status, parsed, _ = http(
        server, "POST", "/api/v1/volumes", json.dumps({"name": "api2", "size": 4 * MiB}).encode()
    )
    assert status == 201 and parsed["size"] == 4 * MiB
    status, _, _ = http(server, "DELETE", "/api/v1/volumes/api2")
    assert status == 204
    status, parsed, _ = http(server, "DELETE", "/api/v1/volumes/api2")
    assert status == 404 and parsed["error"]["code"] == "not-found"


def test_api_oversized_body_is_refused(server: BlockvirtServer) -> None:
    status, parsed, _ = http(server, "POST", "/api/v1/volumes", b'{"name": "' + b"x" * (2 * MiB) + b'"}')
    assert status == 413
    assert parsed is not None and "error" in parsed


# ---------------------------------------------------------------- metrics


async def test_metrics_follow_io_and_deletion(server: BlockvirtServer) -> None:
    server.create_volume("met1", 8 * MiB)
    text = await asyncio.to_thread(metrics, server)
    assert metric_value(text, "blockvirt_volume_read_bytes_total", volume="met1") == 0
    assert metric_value(text, "blockvirt_volume_size_bytes", volume="met1") == 8 * MiB
    async with await NbdClient.connect(server.uri("met1")) as c:
        await c.write(0, b"m" * 8192)
        await c.read(0, 4096)
        await c.read(4096, 4096)
        await c.flush()
        text = await asyncio.to_thread(metrics, server)
        assert metric_value(text, "blockvirt_connections", volume="met1") == 1
    assert metric_value(text, "blockvirt_volume_read_bytes_total", volume="met1") == 8192
    assert metric_value(text, "blockvirt_volume_write_bytes_total", volume="met1") == 8192
    assert metric_value(text, "blockvirt_volume_ops_total", volume="met1", op="read") == 2
    assert metric_value(text, "blockvirt_volume_ops_total", volume="met1", op="write") == 1
    assert metric_value(text, "blockvirt_volume_ops_total", volume="met1", op="flush") == 1
    alloc = metric_value(text, "blockvirt_volume_allocated_bytes", volume="met1")
    assert alloc is not None and alloc >= 8192
    for _ in range(600):  # wait for the session to end before deleting
        status, _, _ = await asyncio.to_thread(http, server, "DELETE", "/api/v1/volumes/met1")
        if status == 204:
            break
        await asyncio.sleep(0.05)
    assert status == 204
    text = await asyncio.to_thread(metrics, server)
    assert 'volume="met1"' not in text
    assert "blockvirt_volume_read_bytes_total" in text  # the family stays, empty
