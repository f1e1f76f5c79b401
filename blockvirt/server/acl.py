"""Per-volume access rules: who may open an export, and how. Pure: no I/O, no clock.

A rule names a client by the common name (CN) of its TLS client certificate, by one of the
certificate's subject alternative names (SAN), or by its source address in a CIDR. A volume
without rules is open to every client. Once it has rules, only a client that matches one may
open it: a matching rule without `read_only` grants full access, and a client matched only by
read-only rules gets the export read-only. `VOL@SNAP` follows `VOL`'s rules.

Certificate names count only once TLS is up with a certificate our CA signed (the session
learns them after STARTTLS); before that, only address rules can match.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

KINDS = ("cn", "san", "address")
#: SAN types a rule may name, as `TYPE:value` (Python's getpeercert() spells IP as "IP Address").
SAN_TYPES = {"dns": "DNS", "ip": "IP", "email": "email", "uri": "URI"}
MAX_VALUE = 256

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AclError(ValueError):
    """A rule that cannot be stored; the message is for the operator."""


class Access(enum.Enum):
    FULL = "full"
    READ_ONLY = "read-only"
    DENIED = "denied"


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """What the server knows about a client: its address, then its verified certificate."""

    address: str  # an IP address without port ("" if unknown, e.g. a Unix socket)
    cn: str = ""
    #: Subject alternative names as (type, value): ("DNS", "host"), ("IP", "10.0.0.1"), ...
    sans: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """For logs: the certificate's names, or "" for a client without one."""
        parts = [f"CN={self.cn}"] if self.cn else []
        parts += [f"{t}:{v}" for t, v in self.sans]
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Rule:
    kind: str  # one of KINDS
    value: str  # normalized (see normalize)
    read_only: bool = False


def parse_address(text: str) -> IPAddress | None:
    """An IP address as the socket reports it; IPv4-mapped IPv6 becomes IPv4."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _text(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise AclError(f"{what} must be a non-empty string without surrounding spaces")
    if len(value) > MAX_VALUE:
        raise AclError(f"{what} is longer than {MAX_VALUE} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise AclError(f"{what} contains control characters")
    return value


def normalize(kind: str, value: str) -> str:
    """The stored form of a rule's value; raises AclError with a clear message."""
    if kind == "cn":
        return _text(value, "a CN")
    if kind == "san":
        value = _text(value, "a SAN")
        prefix, sep, rest = value.partition(":")
        san_type = SAN_TYPES.get(prefix.lower()) if sep else None
        if san_type is None:
            return value  # matches that value in a SAN of any type
        if not rest:
            raise AclError(f"SAN {value!r} has no value after {prefix}:")
        if san_type == "IP":
            addr = parse_address(rest)
            if addr is None:
                raise AclError(f"SAN {value!r}: {rest!r} is not an IP address")
            rest = str(addr)
        elif san_type == "DNS":
            rest = rest.lower()
        return f"{san_type}:{rest}"
    if kind == "address":
        value = _text(value, "an address")
        try:
            net = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise AclError(
                f"{value!r} is not an IP address or CIDR (e.g. 10.0.0.0/8, 2001:db8::/32)"
            ) from None
        return str(net)
    raise AclError(f"unknown rule kind {kind!r}: use one of {', '.join(KINDS)}")


def _san_matches(rule_value: str, sans: Iterable[tuple[str, str]]) -> bool:
    prefix, sep, rest = rule_value.partition(":")
    san_type = SAN_TYPES.get(prefix.lower()) if sep else None
    for typ, val in sans:
        if san_type is None:  # any type, the value as written
            if val == rule_value or (typ == "DNS" and val.lower() == rule_value.lower()):
                return True
        elif typ == san_type:
            if typ == "IP":
                addr = parse_address(val)
                if addr is not None and str(addr) == rest:
                    return True
            elif (val.lower() if typ == "DNS" else val) == rest:
                return True
    return False


def matches(rule: Rule, client: ClientIdentity) -> bool:
    if rule.kind == "cn":
        return bool(client.cn) and client.cn == rule.value
    if rule.kind == "san":
        return _san_matches(rule.value, client.sans)
    if rule.kind == "address":
        addr = parse_address(client.address)
        if addr is None:
            return False
        net = ipaddress.ip_network(rule.value, strict=False)
        return addr.version == net.version and addr in net
    return False


def decide(rules: Iterable[Rule], client: ClientIdentity) -> Access:
    """The most a client is granted: no rules is FULL; else the best matching rule, or DENIED."""
    any_rule = False
    best = Access.DENIED
    for rule in rules:
        any_rule = True
        if matches(rule, client):
            if not rule.read_only:
                return Access.FULL
            best = Access.READ_ONLY
    return best if any_rule else Access.FULL


def certificate_names(cert: dict[str, object] | None) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(CN, SANs) from `SSLObject.getpeercert()`; empty without a certificate."""
    if not cert:
        return "", ()
    cn = ""
    for rdn in cert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName" and not cn:
                cn = str(value)
    sans: list[tuple[str, str]] = []
    for typ, value in cert.get("subjectAltName", ()):  # type: ignore[attr-defined]
        typ = "IP" if typ == "IP Address" else str(typ)
        sans.append((typ, str(value).strip()))
    return cn, tuple(sans)
