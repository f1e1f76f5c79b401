"""Pure security logic without a loop or sockets: access rules, admission, log throttling,
the API token helpers."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from blockvirt.api.auth import TokenError, bearer_matches, is_loopback, read_token_file, readable_by_others
from blockvirt.jobs.manager import public_error
from blockvirt.server.acl import (
    Access,
    AclError,
    ClientIdentity,
    Rule,
    certificate_names,
    decide,
    matches,
    normalize,
    parse_address,
)
from blockvirt.server.limits import Admission, Limits, LogThrottle

ALICE = ClientIdentity(
    "10.1.2.3", "alice", (("DNS", "Alice.Example"), ("IP", "192.0.2.7"), ("email", "a@x.org"))
)
ANON = ClientIdentity("10.1.2.3")


@pytest.mark.parametrize(
    ("kind", "value", "stored"),
    [
        ("cn", "alice", "alice"),
        ("address", "10.1.2.3", "10.1.2.3/32"),
        ("address", "10.1.2.3/8", "10.0.0.0/8"),
        ("address", "2001:DB8::1/32", "2001:db8::/32"),
        ("address", "::1", "::1/128"),
        ("san", "DNS:Host.Example", "DNS:host.example"),
        ("san", "dns:host", "DNS:host"),
        ("san", "ip:192.0.2.7", "IP:192.0.2.7"),
        ("san", "IP:2001:0db8::0001", "IP:2001:db8::1"),
        ("san", "email:a@x.org", "email:a@x.org"),
        ("san", "URI:spiffe://x/y", "URI:spiffe://x/y"),
        ("san", "bare-value", "bare-value"),
        ("san", "other:thing", "other:thing"),
    ],
)
def test_normalize(kind: str, value: str, stored: str) -> None:
    assert normalize(kind, value) == stored


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("cn", "", "non-empty"),
        ("cn", " alice", "surrounding spaces"),
        ("cn", "a\x00b", "control characters"),
        ("cn", "x" * 257, "longer than 256"),
        ("address", "10.0.0.256", "not an IP address or CIDR"),
        ("address", "10.0.0.0/33", "not an IP address or CIDR"),
        ("address", "host.example", "not an IP address or CIDR"),
        ("san", "DNS:", "no value after"),
        ("san", "IP:nope", "is not an IP address"),
        ("group", "x", "unknown rule kind"),
    ],
)
def test_normalize_refuses(kind: str, value: str, message: str) -> None:
    with pytest.raises(AclError, match=message):
        normalize(kind, value)


def rule(kind: str, value: str, read_only: bool = False) -> Rule:
    return Rule(kind, normalize(kind, value), read_only)


def test_matching() -> None:
    assert matches(rule("cn", "alice"), ALICE)
    assert not matches(rule("cn", "Alice"), ALICE)  # CNs are exact
    assert not matches(rule("cn", "alice"), ANON)
    assert matches(rule("san", "DNS:alice.example"), ALICE)  # DNS names ignore case
    assert matches(rule("san", "alice.example"), ALICE)  # bare: any type
    assert matches(rule("san", "IP:192.0.2.7"), ALICE)
    assert matches(rule("san", "email:a@x.org"), ALICE)
    assert not matches(rule("san", "email:A@x.org"), ALICE)
    assert not matches(rule("san", "URI:a@x.org"), ALICE)  # the right value under another type
    assert not matches(rule("san", "DNS:alice.example"), ANON)
    assert matches(rule("address", "10.0.0.0/8"), ANON)
    assert not matches(rule("address", "10.1.2.4"), ANON)
    assert not matches(rule("address", "::/0"), ANON)  # an IPv4 client is not in an IPv6 net
    assert matches(rule("address", "127.0.0.0/8"), ClientIdentity("::ffff:127.0.0.2"))
    assert not matches(rule("address", "0.0.0.0/0"), ClientIdentity("/run/sock"))


def test_decide() -> None:
    assert decide([], ANON) is Access.FULL
    assert decide([rule("cn", "bob")], ANON) is Access.DENIED
    assert decide([rule("cn", "bob"), rule("address", "10.0.0.0/8", True)], ANON) is Access.READ_ONLY
    # The best matching rule wins, in any order.
    both = [rule("address", "10.0.0.0/8", True), rule("cn", "alice")]
    assert decide(both, ALICE) is Access.FULL
    assert decide(list(reversed(both)), ALICE) is Access.FULL
    assert decide(both, ANON) is Access.READ_ONLY
    assert decide([rule("cn", "alice", True)], ALICE) is Access.READ_ONLY


def test_parse_address() -> None:
    assert str(parse_address("::ffff:10.0.0.1")) == "10.0.0.1"
    assert str(parse_address("fe80::1%eth0")) == "fe80::1"
    assert parse_address("not an address") is None


def test_certificate_names() -> None:
    cert = {
        "subject": ((("countryName", "FR"),), (("commonName", "alice"),), (("commonName", "second"),)),
        "subjectAltName": (
            ("DNS", "alice.example"),
            ("IP Address", "2001:DB8:0:0:0:0:0:1\n"),
            ("email", "a@x"),
        ),
    }
    cn, sans = certificate_names(cert)  # type: ignore[arg-type]
    assert cn == "alice"
    assert sans == (("DNS", "alice.example"), ("IP", "2001:DB8:0:0:0:0:0:1"), ("email", "a@x"))
    client = ClientIdentity("1.2.3.4", cn, sans)
    assert matches(rule("san", "IP:2001:db8::1"), client)  # IPs compare as addresses
    assert client.describe() == "CN=alice, DNS:alice.example, IP:2001:DB8:0:0:0:0:0:1, email:a@x"
    assert certificate_names(None) == ("", ())
    assert ANON.describe() == ""


def test_admission_counts_per_address_and_in_total() -> None:
    adm = Admission(Limits(max_connections=3, max_connections_per_address=2))
    assert adm.admit("a") is None and adm.admit("a") is None
    assert adm.admit("a") == "max_per_address"
    assert adm.admit("b") is None
    assert adm.admit("c") == "max_connections"
    assert adm.total == 3 and adm.per_address == {"a": 2, "b": 1}
    adm.release("a")
    adm.release("b")
    assert adm.per_address == {"a": 1}  # no entry left behind for gone addresses
    assert adm.admit("c") is None


@pytest.mark.parametrize(
    "kw",
    [
        {"max_connections": 0},
        {"max_connections_per_address": 0},
        {"max_inflight": 0},
        {"max_inflight_bytes": 0},
        {"handshake_timeout": 0},
        {"request_timeout": -1},
        {"idle_timeout": -0.5},
    ],
)
def test_limits_validate(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kw)).replace("_", "-")):
        Limits(**kw)  # type: ignore[arg-type]


def test_log_throttle() -> None:
    t = LogThrottle(interval=1.0)
    assert t.allow("k", 10.0) == 0
    assert t.allow("k", 10.5) is None
    assert t.allow("k", 10.9) is None
    assert t.allow("other", 10.9) == 0
    assert t.allow("k", 11.0) == 2  # two lines were held back since
    assert t.allow("k", 12.5) == 0


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.3.4.5", "::1", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.0.2.1", "example.org", "localhost.example", ""):
        assert not is_loopback(host), host


def test_bearer_matches() -> None:
    token = "t" * 20
    assert bearer_matches(f"Bearer {token}", token)
    assert bearer_matches(f"bearer  {token} ", token)
    for header in (None, "", token, f"Basic {token}", f"Bearer {token}x", "Bearer", f"Bearer {token[:-1]}"):
        assert not bearer_matches(header, token), header


def test_read_token_file(tmp_path: Path) -> None:
    p = tmp_path / "tok"
    p.write_text("  abcdefghijklmnop0123\n")
    p.chmod(0o600)
    assert read_token_file(str(p)) == "abcdefghijklmnop0123"
    assert not readable_by_others(str(p))
    p.chmod(0o640)
    assert readable_by_others(str(p))
    p.write_bytes(b"\xff" * 20)
    with pytest.raises(TokenError, match="printable ASCII"):
        read_token_file(str(p))
    p.write_text("x" * 5000)
    with pytest.raises(TokenError, match="at most 4096"):
        read_token_file(str(p))
    with pytest.raises(TokenError, match=r"cannot read API token file .*No such file"):
        read_token_file(str(tmp_path / "none"))


def test_public_error_hides_file_names() -> None:
    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/secret/pool/abc.data")
    assert "/secret" in str(e)
    assert public_error(e) == "No space left on device"
    assert public_error(ValueError("bad thing")) == "bad thing"
    assert public_error(RuntimeError()) == "RuntimeError"


# ---------------------------------------------------------------- API: cross-site guards

from blockvirt.api.guard import content_type_ok, host_allowed, origin_allowed  # noqa: E402


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1:9810", True),
        ("localhost:9810", True),
        ("LocalHost:9810", True),
        ("[::1]:9810", True),
        ("127.0.0.2:9810", True),
        ("127.0.0.1:9811", False),
        ("127.0.0.1", False),  # port 80 is not ours
        ("evil.example:9810", False),
        ("localhost.evil.example:9810", False),
        ("user@localhost:9810", False),
        ("", False),
        (None, False),
        ("localhost:99999", False),
    ],
)
def test_host_allowed_on_a_tokenless_api(host: str | None, ok: bool) -> None:
    assert host_allowed(host, 9810, loopback_only=True) is ok
    assert host_allowed(host, 9810, loopback_only=False)  # with a token any name is fine


@pytest.mark.parametrize(
    ("origin", "host", "ok"),
    [
        (None, "127.0.0.1:9810", True),
        ("http://127.0.0.1:9810", "127.0.0.1:9810", True),
        ("http://localhost:9810", "localhost:9810", True),
        ("http://evil.example", "127.0.0.1:9810", False),
        ("http://127.0.0.1:9811", "127.0.0.1:9810", False),
        ("null", "127.0.0.1:9810", False),
        ("http://localhost:9810", "127.0.0.1:9810", False),  # another origin, though the same machine
        ("https://api.example", "api.example:443", True),
        ("http://api.example", "api.example", True),
        ("file://", "127.0.0.1:9810", False),
    ],
)
def test_origin_must_be_the_api_itself(origin: str | None, host: str, ok: bool) -> None:
    assert origin_allowed(origin, host) is ok


def test_bodies_must_be_json() -> None:
    assert content_type_ok("POST", "application/json", True)
    assert not content_type_ok("POST", "text/plain", True)
    assert not content_type_ok("POST", "application/octet-stream", False)  # no body: still JSON
    assert not content_type_ok("PATCH", "application/x-www-form-urlencoded", True)
    assert content_type_ok("GET", "application/octet-stream", False)
    assert not content_type_ok("DELETE", "text/plain", True)
    assert content_type_ok("DELETE", "application/octet-stream", False)
