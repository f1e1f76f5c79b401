"""Connection limits, timeouts and the counters behind the security metrics. Pure: time is an
argument, nothing here touches a socket.

`Admission` decides whether a new connection may stay (total and per client address), the
session enforces the timeouts, and `SecurityCounters` holds plain counters that the metrics
collector reads at scrape time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1024 * 1024

#: Reasons a connection is refused at accept (the `reason` label of the refusal counter).
REFUSED_TOTAL = "max_connections"
REFUSED_PER_ADDRESS = "max_per_address"
REFUSED_SHUTTING_DOWN = "shutting_down"
REFUSAL_REASONS = (REFUSED_TOTAL, REFUSED_PER_ADDRESS, REFUSED_SHUTTING_DOWN)

#: Phases in which a session can be cut by a timeout (the `phase` label).
TIMEOUT_HANDSHAKE = "handshake"
TIMEOUT_REQUEST = "request"
TIMEOUT_IDLE = "idle"
#: The client left our replies unread (its socket full) for the request timeout.
TIMEOUT_REPLY = "reply"
TIMEOUT_PHASES = (TIMEOUT_HANDSHAKE, TIMEOUT_REQUEST, TIMEOUT_IDLE, TIMEOUT_REPLY)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one NBD listener allows (serve flags; 0 turns a timeout off)."""

    max_connections: int = 1024
    #: One hypervisor is one address: all its disks, each with multi-conn (nbdcopy opens 4
    #: connections, qemu up to 16 with multi-conn), so half the total: 128 disks x 4.
    max_connections_per_address: int = 512
    #: From connect to transmission, TLS handshake included.
    handshake_timeout: float = 30.0
    #: A request whose first byte is in must be complete (header and WRITE data) this long
    #: after; only time the server spends reading counts (its own backpressure does not).
    request_timeout: float = 60.0
    #: Transmission with nothing in flight and nothing arriving for this long ends the session.
    idle_timeout: float = 0.0
    max_inflight: int = 64
    max_inflight_bytes: int = 128 * MiB
    #: READ/WRITE bytes in flight over all connections, replies that wait in the buffers of
    #: clients that do not read them included; past it every connection stops reading.
    max_inflight_bytes_total: int = 1024 * MiB

    def __post_init__(self) -> None:
        names = ("max_connections", "max_connections_per_address", "max_inflight", "max_inflight_bytes",
                 "max_inflight_bytes_total")  # fmt: skip
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1")
        for name in ("handshake_timeout", "request_timeout", "idle_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must not be negative")
        if self.handshake_timeout == 0:
            raise ValueError("handshake-timeout must be positive")


class Admission:
    """Counts live connections in all and per address; refuses past the limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self.per_address: dict[str, int] = {}

    def admit(self, address: str) -> str | None:
        """Count a new connection, or return why it is refused (and count nothing)."""
        if self.total >= self.limits.max_connections:
            return REFUSED_TOTAL
        if self.per_address.get(address, 0) >= self.limits.max_connections_per_address:
            return REFUSED_PER_ADDRESS
        self.total += 1
        self.per_address[address] = self.per_address.get(address, 0) + 1
        return None

    def release(self, address: str) -> None:
        self.total -= 1
        n = self.per_address[address] - 1
        if n:
            self.per_address[address] = n
        else:
            del self.per_address[address]  # keep the map as small as the live set


class ByteBudget:
    """Bytes in flight over the whole process, against a limit. Taking never fails: callers
    stop reading new requests while `exhausted`, and are woken once usage is back under
    half the limit (hysteresis, so they do not flap)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    @property
    def exhausted(self) -> bool:
        return self.used >= self.limit

    @property
    def available(self) -> bool:
        """Low enough again for stopped readers to go on."""
        return self.used < self.limit // 2

    def take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, "gave back more than was taken"


@dataclass(slots=True)
class SecurityCounters:
    """Plain counters bumped by the listener and sessions, read by the metrics collector."""

    access_denied: dict[str, int] = field(default_factory=dict)  # volume -> refusals
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0))
    timed_out: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIMEOUT_PHASES, 0))

    def denied(self, volume: str) -> None:
        self.access_denied[volume] = self.access_denied.get(volume, 0) + 1


class LogThrottle:
    """At most one log line per key per `interval` seconds; says how many were held back."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str, now: float) -> int | None:
        """None: stay quiet. Otherwise log now, mentioning the returned count of held lines."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
