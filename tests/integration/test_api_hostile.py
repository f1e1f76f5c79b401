"""Hostile HTTP clients against a real server's management API: cross-site requests and DNS
rebinding against the tokenless loopback API, slow and idle connections, connection floods,
malformed bodies (see protocol/mgmt-api.md)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
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
