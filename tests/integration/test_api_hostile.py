"""Hostile HTTP clients against a real server's management API: cross-site requests and DNS
rebinding against the tokenless loopback API, slow and idle connections, connection floods,
malformed bodies (see protocol/mgmt-api.md)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from blockvirt.testing import BlockvirtServer

MiB = 1 << 20
TOKEN = "t0ken-for-the-hostile-api-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockvirtServer]:
    with BlockvirtServer(tmp_path_factory.mktemp("api") / "data", log_level="info") as s:
        s.create_volume("vol", MiB)
        s.api.post("/api/v1/volumes/vol/snapshots", {"name": "snap"})
        yield s


def hostport(server: BlockvirtServer) -> tuple[str, int]:
    u = urlsplit(server.api_url)
    assert u.hostname is not None and u.port is not None
    return u.hostname, u.port


def raw(
    server: BlockvirtServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    host, port = hostport(server)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        hdrs = dict(headers or {})
        conn.putrequest(method, path, skip_host="Host" in hdrs, skip_accept_encoding=True)
        for k, v in hdrs.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data) if data else {}
        except ValueError:
            return resp.status, {"raw": data.decode(errors="replace")}
    finally:
        conn.close()


def api_socket(server: BlockvirtServer) -> socket.socket:
    return socket.create_connection(hostport(server), timeout=30)


# ---------------------------------------------------------------- cross-site requests


def test_text_plain_post_is_refused(server: BlockvirtServer) -> None:
    """A browser can send a text/plain POST cross-site without a preflight."""
    status, body = raw(
        server,
        "POST",
        "/api/v1/volumes/vol/snapshots/snap/revert",
        b'{"force": true}',
        {"Content-Type": "text/plain"},
    )
    assert status == 415, body
    assert body["error"]["code"] == "invalid"


def test_post_without_content_type_is_refused(server: BlockvirtServer) -> None:
    status, body = raw(server, "POST", "/api/v1/volumes/vol/flatten", b"")
    assert status == 415, body


def test_foreign_origin_is_refused(server: BlockvirtServer) -> None:
    status, body = raw(
        server,
        "POST",
        "/api/v1/volumes/vol/snapshots/snap/revert",
        b'{"force": true}',
        {"Content-Type": "application/json", "Origin": "http://evil.example"},
    )
    assert status == 403, body
    assert body["error"]["code"] == "forbidden"
    status, _ = raw(server, "GET", "/api/v1/volumes", headers={"Origin": "null"})
    assert status == 403


def test_same_origin_and_no_origin_are_served(server: BlockvirtServer) -> None:
    host, port = hostport(server)
    for origin in (None, f"http://{host}:{port}", f"http://localhost:{port}"):
        headers = {"Origin": origin} if origin else {}
        if origin and "localhost" in origin:
            headers["Host"] = f"localhost:{port}"
        status, body = raw(server, "GET", "/api/v1/volumes", headers=headers)
        assert status == 200, (origin, body)


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:{port}", "127.0.0.1:1", "attacker.localhost.example:{port}", ""],
)
def test_dns_rebinding_host_is_refused(server: BlockvirtServer, host: str) -> None:
    _, port = hostport(server)
    status, body = raw(server, "GET", "/api/v1/volumes", headers={"Host": host.format(port=port)})
    assert status == 403, body


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}"])
def test_loopback_host_names_are_served(server: BlockvirtServer, host: str) -> None:
    _, port = hostport(server)
    status, body = raw(server, "GET", "/api/v1/volumes", headers={"Host": host.format(port=port)})
    assert status == 200, body


def test_the_cli_still_works(server: BlockvirtServer) -> None:
    r = server.cli("volume", "flatten", "vol", "--json")
    assert r.returncode == 0, r.stderr
    r = server.cli("snapshot", "revert", "vol", "snap", "--force")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- slow and idle connections


def closed_after(s: socket.socket, limit: float) -> float:
    start = time.monotonic()
    s.settimeout(limit)
    try:
        while s.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {limit}s") from None
    return time.monotonic() - start


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockvirtServer]:
    args = ("--api-header-timeout", "1", "--api-body-timeout", "1", "--api-max-connections", "20")
    with BlockvirtServer(tmp_path_factory.mktemp("quick") / "data", extra_args=args, api_token=TOKEN) as s:
        yield s


def test_a_silent_connection_is_cut(quick: BlockvirtServer) -> None:
    s = api_socket(quick)
    assert closed_after(s, 10) < 5


def test_headers_that_never_end_are_cut(quick: BlockvirtServer) -> None:
    s = api_socket(quick)
    s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
    took = 0.0
    start = time.monotonic()
    try:
        for _ in range(20):  # a header line every 0.3 s does not keep it alive
            s.sendall(b"X-Slow: 1\r\n")
            time.sleep(0.3)
    except OSError:
        took = time.monotonic() - start
    if not took:
        took = closed_after(s, 10) + (time.monotonic() - start)
    assert took < 5, took


def test_a_body_that_never_ends_is_cut(quick: BlockvirtServer) -> None:
    s = api_socket(quick)
    s.sendall(
        b"POST /api/v1/volumes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    assert closed_after(s, 10) < 5


def test_connections_over_the_cap_are_refused_then_served_again(quick: BlockvirtServer) -> None:
    held = [api_socket(quick) for _ in range(20)]
    try:
        time.sleep(0.2)
        s = api_socket(quick)
        s.settimeout(5)
        data = s.recv(4096)
        assert data.startswith(b"HTTP/1.1 503"), data
        s.close()
    finally:
        for h in held:
            h.close()
    time.sleep(0.3)
    assert quick.api.get("/api/v1/health") == {"status": "ok"}


# ---------------------------------------------------------------- malformed bodies


def post_json(server: BlockvirtServer, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    return raw(server, method, path, body, {"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        (
            "POST",
            "/api/v1/volumes",
            b'{"name": "n", "size": ' + b"9" * 400 + b"}",
            "field 'size' must be bytes",
        ),
        (
            "POST",
            "/api/v1/volumes",
            b'{"name": "n", "size": "' + b"9" * 400 + b'"}',
            "field 'size' must be bytes",
        ),
        (
            "POST",
            "/api/v1/volumes/vol/resize",
            b'{"size": ' + b"9" * 400 + b"}",
            "field 'size' must be bytes",
        ),
        ("PATCH", "/api/v1/pools/default", b'{"iops_capacity": ' + b"9" * 4200 + b"}", "must be a number"),
        ("PATCH", "/api/v1/pools/default", b'{"cost_s0": ' + b"9" * 4200 + b"}", "must be a whole number"),
        ("PATCH", "/api/v1/volumes/vol/qos", b'{"limit": ' + b"9" * 4200 + b"}", "must be a number"),
        ("PATCH", "/api/v1/volumes/vol/qos", b'{"bps_limit": NaN}', "not valid JSON"),
        ("PATCH", "/api/v1/volumes/vol/qos", b'{"bps_limit": Infinity}', "not valid JSON"),
        ("PATCH", "/api/v1/volumes/vol/qos", b'{"bps_limit": 1e400}', "must be a number"),
        (
            "POST",
            "/api/v1/volumes/vol/migrate",
            b'{"pool": "default", "bps_limit": -Infinity}',
            "not valid JSON",
        ),
        ("POST", "/api/v1/qos/groups", b'{"name": "g", "shares": ' + b"9" * 4200 + b"}", "must be a number"),
        ("POST", "/api/v1/volumes/vol/resize", b'{"size": "2M", "frce": true}', "unknown field(s): 'frce'"),
        ("POST", "/api/v1/volumes", b'{"name": "n", "size": 512, "thin": true}', "unknown field(s): 'thin'"),
        ("POST", "/api/v1/volumes/vol/flatten", b'{"now": true}', "unknown field(s): 'now'"),
        (
            "POST",
            "/api/v1/pools",
            b'{"name": "p", "path": "/tmp/x", "settings": {"warn": 1}}',
            "in 'settings'",
        ),
    ],
)
def test_malformed_bodies_are_400_not_500(
    server: BlockvirtServer, method: str, path: str, body: bytes, message: str
) -> None:
    status, data = post_json(server, method, path, body)
    assert status == 400, data
    assert data["error"]["code"] == "invalid"
    assert message in data["error"]["message"], data
    assert server.api.get("/api/v1/volumes/vol")["size"] == MiB  # nothing was applied


def test_non_ascii_authorization_is_401(tmp_path: Path) -> None:
    with BlockvirtServer(tmp_path / "data", api_token=TOKEN) as s:
        host, port = hostport(s)
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(b"GET /api/v1/volumes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xc3\xa9\xff\r\n\r\n")
        head = sock.recv(65536)
        sock.close()
        assert head.startswith(b"HTTP/1.1 401"), head[:200]
        assert b'"unauthorized"' in head
        assert "Traceback" not in s.log()


def test_echoed_input_is_truncated(server: BlockvirtServer) -> None:
    name = "a" * 10_000
    status, data = post_json(
        server, "POST", "/api/v1/volumes", json.dumps({"name": name, "size": 512}).encode()
    )
    assert status == 400
    assert len(data["error"]["message"]) <= 300, len(data["error"]["message"])


def test_malformed_http_is_logged_without_a_traceback(server: BlockvirtServer) -> None:
    host, port = hostport(server)
    for payload in (
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    ):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(payload)
        assert s.recv(100).startswith(b"HTTP/1.")
        s.close()
    time.sleep(0.3)
    log = server.log()
    assert "malformed HTTP request from 127.0.0.1" in log
    assert "Traceback" not in log and "ERROR" not in log


def test_relative_pool_paths_are_refused(server: BlockvirtServer) -> None:
    status, data = post_json(server, "POST", "/api/v1/pools", b'{"name": "rel", "path": "pools/rel"}')
    assert status == 400 and "must be absolute" in data["error"]["message"], data
    assert not (Path.cwd() / "pools").exists()
