"""Helpers for the interop suite: real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh,
fio, nbdfuse + ext4) and raw sockets against a real `blockvirt serve` process.

A missing tool skips its test, unless BLOCKVIRT_REQUIRE_INTEROP=1 (set by CI), when it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from blockvirt.testing import BlockvirtServer
from tests.needs import missing, need_root

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The project's shared notes and tools sit beside the clone (../shared), also in CI.
SHARED_DIR = (REPO_ROOT / ".." / "shared").resolve()

KiB = 1024
MiB = 1024 * KiB


def _missing(what: str) -> None:
    missing(what)


def need(*tools: str) -> None:
    """Skip (or, with BLOCKVIRT_REQUIRE_INTEROP=1, fail) unless every tool is on PATH."""
    for tool in tools:
        if shutil.which(tool, path=nbdsh_env()["PATH"]) is None:
            _missing(f"{tool} is not installed")


def need_nbdsh() -> None:
    """nbdsh runs `python3 -m nbd`: it needs a python3 that has libnbd's binding."""
    need("nbdsh")
    try:
        r = subprocess.run(
            ["nbdsh", "-c", "pass"], env=nbdsh_env(), capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        _missing("nbdsh did not start")
        return
    if r.returncode != 0:
        _missing(f"nbdsh does not work: {r.stderr.strip()}")


def need_root_fuse() -> None:
    """FUSE and loop mounts need root, /dev/fuse and loop devices (a skip on a developer's
    machine; under BLOCKVIRT_REQUIRE_INTEROP=1 a failure, like a missing tool)."""
    need_root("FUSE and loop mounts")
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            _missing(f"{dev} is missing")


def nbdsh_env() -> dict[str, str]:
    """Debian's python3 first: that is the interpreter libnbd's Python binding is built for."""
    return {**os.environ, "PATH": f"/usr/bin:/usr/sbin:/bin:/sbin:{os.environ.get('PATH', '')}"}


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 60.0,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a bounded time; on failure show its output in the assertion."""
    argv = [str(c) for c in cmd]
    try:
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env if env is not None else nbdsh_env(),
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout}s: {' '.join(argv)}\n{e.stdout!r}\n{e.stderr!r}")
    if check and r.returncode != 0:
        pytest.fail(f"rc={r.returncode}: {' '.join(argv)}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def volume_info(server: BlockvirtServer, name: str) -> dict[str, Any]:
    """`blockvirt volume info NAME --json` through the CLI."""
    r = server.cli("volume", "info", name, "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    info: dict[str, Any] = json.loads(r.stdout)
    return info


def qemu_io(uri: str, *commands: str, cache: str | None = None, check: bool = True) -> str:
    """qemu-io -f raw [-t CACHE] -c CMD ... URI; returns stdout."""
    argv = ["qemu-io", "-f", "raw"]
    if cache is not None:
        argv += ["-t", cache]
    for c in commands:
        argv += ["-c", c]
    argv.append(uri)
    r = run(argv, check=check)
    return r.stdout + r.stderr


# ---------------------------------------------------------------- raw sockets
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 3, 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN = 0x80000001, 0x80000003, 0x80000006
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
EINVAL, ENOSPC = 22, 28


class Closed(Exception):
    """The server closed the connection."""


class RawNbd:
    """A blocking, byte-exact NBD client for malformed-input tests (simple replies only)."""

    def __init__(self, server: BlockvirtServer, *, cflags: int = 3, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((server.nbd_host, server.nbd_port), timeout=timeout)
        magic, ihave, self.hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, ihave) == (NBDMAGIC, IHAVEOPT), "not a fixed-newstyle greeting"
        self.send(struct.pack(">I", cflags))
        self.cookie = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawNbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                d = self.sock.recv(n - len(buf))
            except ConnectionResetError as e:
                raise Closed() from e
            if not d:
                raise Closed()
            buf += d
        return bytes(buf)

    def assert_closed(self, timeout: float = 10.0) -> None:
        """The server must drop the connection (EOF or RST) within `timeout`, sending nothing."""
        self.sock.settimeout(timeout)
        try:
            while True:
                d = self.sock.recv(65536)
                if not d:
                    return
                raise AssertionError(f"server sent {d[:64]!r} instead of closing")
        except (ConnectionResetError, BrokenPipeError):
            return
        except TimeoutError as e:
            raise AssertionError(f"server kept the connection open for {timeout}s") from e

    # handshake
    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return opt, rep, self.recv(length) if length else b""

    def final_reply(self, opt: int) -> tuple[int, list[tuple[int, bytes]]]:
        """Collect replies to `opt` up to the final one; (final reply type, all replies)."""
        got: list[tuple[int, bytes]] = []
        while True:
            o, rep, data = self.option_reply()
            assert o == opt, f"reply for option {o}, expected {opt}"
            got.append((rep, data))
            if rep not in (REP_SERVER, REP_INFO, 4):
                return rep, got

    def go(self, export: str, opt: int = OPT_GO) -> tuple[int, int]:
        """GO (or INFO); returns (final reply type, export size), size -1 when refused."""
        name = export.encode()
        self.option(opt, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        rep, replies = self.final_reply(opt)
        size = -1
        for r, d in replies:
            if r == REP_INFO and struct.unpack(">H", d[:2])[0] == 0:
                size = struct.unpack(">QH", d[2:12])[0]
        return rep, size

    # transmission (no structured replies negotiated: every reply is simple)
    def request(self, cmd: int, offset: int, length: int, payload: bytes = b"", flags: int = 0) -> int:
        self.cookie += 1
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self.cookie, offset, length) + payload)
        return self.cookie

    def simple_reply(self, cookie: int, read_len: int = 0) -> tuple[int, bytes]:
        magic, err, got = struct.unpack(">IIQ", self.recv(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        assert got == cookie, (got, cookie)
        return err, self.recv(read_len) if err == 0 and read_len else b""

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        return self.simple_reply(self.request(CMD_READ, offset, length), length)

    def write(self, offset: int, data: bytes) -> int:
        return self.simple_reply(self.request(CMD_WRITE, offset, len(data), data))[0]


def raw_session(server: BlockvirtServer, export: str) -> RawNbd:
    """A raw connection already in transmission (GO accepted, simple replies)."""
    c = RawNbd(server)
    rep, _ = c.go(export)
    assert rep == REP_ACK, hex(rep)
    return c
