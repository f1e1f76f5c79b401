"""Management API authentication (bearer token), and input the API must refuse cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvirt.testing import BlockvirtServer

TOKEN = "s3cret-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockvirtServer]:
    with BlockvirtServer(tmp_path_factory.mktemp("auth") / "data", api_token=TOKEN) as s:
        yield s


def http(
    server: BlockvirtServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    req = urllib.request.Request(server.api_url + path, data=body, method=method, headers=headers or {})
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw, status, hdrs = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, dict(e.headers)
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return status, parsed, hdrs


BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789abcdef"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer "},
    ],
    ids=["none", "wrong", "longer", "basic", "no-scheme", "empty"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/volumes"),
        ("POST", "/api/v1/volumes"),
        ("DELETE", "/api/v1/volumes/x"),
        ("GET", "/api/v1/volumes/x/acl"),
        ("GET", "/metrics"),
        ("GET", "/no/such/route"),
    ],
)
def test_requests_without_the_token_are_401(
    server: BlockvirtServer, headers: dict[str, str], method: str, path: str
) -> None:
    body = b'{"name": "x", "size": "1M"}' if method == "POST" else None
    status, data, hdrs = http(server, method, path, body, headers)
    assert status == 401
    assert data == {"error": {"code": "unauthorized", "message": "missing or invalid bearer token"}}
    assert hdrs.get("WWW-Authenticate") == 'Bearer realm="blockvirt"'


def test_the_token_opens_everything_and_health_needs_none(server: BlockvirtServer) -> None:
    status, data, _ = http(server, "GET", "/api/v1/health")
    assert (status, data) == (200, {"status": "ok"})
    status, data, _ = http(server, "POST", "/api/v1/volumes", b'{"name": "t1", "size": "1M"}', BEARER)
    assert status == 201 and data["name"] == "t1"
    status, text, _ = http(server, "GET", "/metrics", headers={"Authorization": f"bearer {TOKEN}"})
    assert status == 200 and 'blockvirt_volume_size_bytes{volume="t1"} 1.048576e+06' in text
    status, data, _ = http(server, "GET", "/no/such/route", headers=BEARER)
    assert status == 404 and data["error"]["code"] == "http"


def _cli(server: BlockvirtServer, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVIRT_API")}
    return subprocess.run(
        [sys.executable, "-m", "blockvirt", *args, "--api", server.api_url],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_token_sources(server: BlockvirtServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    r = _cli(server, "volume", "list", env={})
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "blockvirt: error: missing or invalid bearer token "
        "(use --token-file FILE, or set BLOCKVIRT_API_TOKEN or BLOCKVIRT_API_TOKEN_FILE)"
    )
    assert _cli(server, "volume", "list", env={"BLOCKVIRT_API_TOKEN": TOKEN}).returncode == 0
    assert _cli(server, "volume", "list", env={"BLOCKVIRT_API_TOKEN_FILE": str(token_file)}).returncode == 0
    assert _cli(server, "volume", "list", "--token-file", str(token_file), env={}).returncode == 0
    assert _cli(server, "--token-file", str(token_file), "pool", "list", env={}).returncode == 0
    # --token-file wins over the environment.
    r = _cli(server, "volume", "list", "--token-file", str(token_file), env={"BLOCKVIRT_API_TOKEN": "x" * 20})
    assert r.returncode == 0
    r = _cli(server, "volume", "list", env={"BLOCKVIRT_API_TOKEN": "y" * 20})
    assert r.returncode == 1 and "(the token was refused)" in r.stderr
    r = _cli(server, "volume", "list", "--token-file", str(tmp_path / "missing"), env={})
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cannot read API token file" in r.stderr


# ---------------------------------------------------------------- serve refuses to start


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "blockvirt",
        "serve",
        "--data-dir",
        str(tmp_path / "d"),
        "--nbd",
        "127.0.0.1:0",
    ]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "192.0.2.1:0", "example.org:0"])
def test_non_loopback_api_needs_a_token_file(tmp_path: Path, address: str) -> None:
    r = _serve(tmp_path, "--api", address)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not loopback: give --api-token-file FILE" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read API token file"),
        ("", "is empty"),
        ("short\n", "at least 16 characters"),
        ("has a space in the middle!!\n", "printable ASCII without spaces"),
        ("caf\u00e9-0123456789abcdef", "printable ASCII"),
    ],
)
def test_bad_token_files_are_one_line_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    r = _serve(tmp_path, "--api", "127.0.0.1:0", "--api-token-file", str(path))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/api/v1/volumes", b"[" * 100000, 400, "request body must be a JSON object"),
        (
            "POST",
            "/api/v1/volumes",
            b'{"name": "n", "size": ' + b"9" * 5000 + b"}",
            400,
            "must be a JSON object",
        ),
        ("POST", "/api/v1/volumes", b'{"name": "n", "size": 1e400}', 400, "field 'size' must be bytes"),
        ("POST", "/api/v1/volumes", b'{"name": "n", "size": null}', 400, "missing field 'size'"),
        ("POST", "/api/v1/volumes", b'{"name": ["n"], "size": 512}', 400, "field 'name' must be a string"),
        ("POST", "/api/v1/volumes", b'{"name": "n", "size": 512, "thick": 1}', 400, "must be true or false"),
        (
            "POST",
            "/api/v1/volumes",
            b'{"name": "n", "size": 512, "pool": 7}',
            400,
            "field 'pool' must be a string",
        ),
        ("POST", "/api/v1/volumes", b'{"name": "a\\u0000b", "size": 512}', 400, "invalid volume name"),
        ("POST", "/api/v1/volumes", b"\xff\xfe", 400, "request body must be a JSON object"),
        ("POST", "/api/v1/volumes", b'"just a string"', 400, "request body must be a JSON object"),
        ("POST", "/api/v1/pools", b'{"name": "p", "path": 5}', 400, "field 'path' must be a string"),
        ("POST", "/api/v1/pools", b'{"name": "p", "path": ""}', 400, "non-empty directory path"),
        ("GET", "/api/v1/volumes/..%2F..%2Fetc", None, 404, "no volume named"),
        ("GET", "/api/v1/volumes/a%00b/acl", None, 400, "invalid volume name"),
        ("GET", "/api/v1/jobs/%00", None, 404, "no job"),
        ("PUT", "/api/v1/volumes", b"{}", 405, "Method Not Allowed"),
    ],
)
def test_malformed_input_gets_a_clear_4xx(
    server: BlockvirtServer, method: str, path: str, body: bytes | None, status: int, message: str
) -> None:
    got, data, _ = http(server, method, path, body, BEARER)
    assert got == status, data
    assert isinstance(data, dict) and set(data) == {"error"}, data
    assert message in data["error"]["message"], data
    assert "Traceback" not in json.dumps(data)


def test_huge_body_is_refused(server: BlockvirtServer) -> None:
    body = b'{"name": "' + b"a" * (2 * 1024 * 1024) + b'", "size": 512}'
    status, data, _ = http(server, "POST", "/api/v1/volumes", body, BEARER)
    assert status == 413 and data["error"]["code"] == "http"


def test_errors_do_not_leak_server_paths(server: BlockvirtServer, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    body = json.dumps({"name": "p2", "path": str(blocker / "sub")}).encode()
    status, data, _ = http(server, "POST", "/api/v1/pools", body, BEARER)
    assert status == 400
    assert (
        data["error"]["message"] == f"cannot create pool directory {str(blocker / 'sub')!r}: Not a directory"
    )
    # A relative path is echoed as given, not resolved against the server's directory.
    status, data, _ = http(server, "POST", "/api/v1/pools", b'{"name": "p3", "path": "a\\u0000b"}', BEARER)
    assert status == 400 and str(server.data_dir) not in json.dumps(data)
    for path in ("/api/v1/volumes", "/api/v1/jobs", "/api/v1/volumes/t1/acl"):
        status, data, _ = http(server, "GET", path, headers=BEARER)
        assert status in (200, 404)
        assert TOKEN not in json.dumps(data)
