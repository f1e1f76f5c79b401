"""Run a real blockvirt server from tests (a pytest plugin, loaded automatically once
blockvirt is installed).

    def test_my_code(blockvirt_volume):          # nbd://127.0.0.1:PORT/vol, a 64 MiB volume
        subprocess.run(["qemu-img", "info", blockvirt_volume], check=True)

    def test_more(blockvirt_server):
        uri = blockvirt_server.create_volume("disk", "1G", thick=True)

The server is a separate process (`python -m blockvirt serve`) on 127.0.0.1 with ports the
kernel picks, and a data directory under pytest's tmp_path; it is stopped after the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from blockvirt.cli.client import ApiClient


class BlockvirtServer:
    """A `blockvirt serve` child process. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        extra_args: tuple[str, ...] = (),
        log_level: str = "warning",
        startup_timeout: float = 30.0,
        api_token: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.extra_args = extra_args
        #: With a token the server requires it (`--api-token-file`); .api and .cli send it.
        self.api_token = api_token
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.nbd_host = "127.0.0.1"
        self.nbd_port = 0
        self.api_url = ""
        self._log: Any = None

    @property
    def node_name(self) -> str:
        """Its `--node-name`: as given in extra_args, else one per data directory. Two test
        servers on one host that attach the same RBD pool must not share the host name (the
        pool would refuse the second), while a server restarted on its data directory comes
        back as the node it was."""
        args = list(self.extra_args)
        if "--node-name" in args:
            return args[args.index("--node-name") + 1]
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:12]
        return f"test-{digest}"

    def _node_args(self) -> list[str]:
        return [] if "--node-name" in self.extra_args else ["--node-name", self.node_name]

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.server.log"

    def start(self) -> BlockvirtServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ready = self.data_dir.parent / f"{self.data_dir.name}.ready.json"
        ready.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        token_args: list[str] = []
        if self.api_token is not None:
            token_file = self.data_dir.parent / f"{self.data_dir.name}.api-token"
            token_file.write_text(self.api_token + "\n")
            token_file.chmod(0o600)
            token_args = ["--api-token-file", str(token_file)]
        cmd = [
            sys.executable,
            "-m",
            "blockvirt",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--nbd",
            f"{self.nbd_host}:{self.nbd_port}",
            "--api",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
            "--log-level",
            self.log_level,
            *token_args,
            *self._node_args(),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"blockvirt serve exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"blockvirt serve did not start in time: {self.log()}")
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        ready.unlink()
        host, _, port = info["nbd"].rpartition(":")
        self.nbd_host, self.nbd_port = host, int(port)
        self.api_url = info["api"]
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: in-flight requests finish, volumes flush), then SIGKILL."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.stop()

    @property
    def api(self) -> ApiClient:
        return ApiClient(self.api_url, token=self.api_token)

    def uri(self, export: str) -> str:
        return f"nbd://{self.nbd_host}:{self.nbd_port}/{export}"

    def create_volume(self, name: str, size: int | str, *, thick: bool = False, pool: str = "default") -> str:
        self.api.post("/api/v1/volumes", {"name": name, "size": size, "thick": thick, "pool": pool})
        return self.uri(name)

    def cli(
        self, *args: str, check: bool = False, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `blockvirt ARGS --api URL` and capture its output."""
        env = {**os.environ, "BLOCKVIRT_API": self.api_url}
        for var in ("BLOCKVIRT_API_TOKEN", "BLOCKVIRT_API_TOKEN_FILE"):
            env.pop(var, None)
        if self.api_token is not None:
            env["BLOCKVIRT_API_TOKEN"] = self.api_token
        return subprocess.run(
            [sys.executable, "-m", "blockvirt", *args],
            env=env,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def __enter__(self) -> BlockvirtServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@pytest.fixture
def blockvirt_server(tmp_path: Path) -> Iterator[BlockvirtServer]:
    """A running blockvirt server with an empty data directory."""
    with BlockvirtServer(tmp_path / "blockvirt-data") as server:
        yield server


@pytest.fixture
def blockvirt_volume(blockvirt_server: BlockvirtServer) -> str:
    """The nbd:// URI of a fresh, empty 64 MiB thin volume named `vol`."""
    return blockvirt_server.create_volume("vol", 64 * 1024 * 1024)


def temporary_server() -> BlockvirtServer:
    """A server whose data lives in a fresh temporary directory (for scripts and benches)."""
    return BlockvirtServer(Path(tempfile.mkdtemp(prefix="blockvirt-")) / "data")
