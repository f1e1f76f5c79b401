"""Real NBD clients for the cluster tests: fio (crc32c verify), an interactive qemu-io, nbdinfo."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

from tests.needs import missing


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed")


def fio_args(uri: str, size: str, *, seed: int = 7) -> list[str]:
    """One fio job's parameters: the write phase and the verify phase must use the same."""
    return [
        "fio", "--name=cl", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
        f"--size={size}", "--iodepth=8", "--verify=crc32c", f"--randseed={seed}",
        "--verify_state_save=0", "--verify_fatal=1", "--eta=never",
    ]  # fmt: skip


def fio(args: list[str], cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def nbdinfo(uri: str, timeout: float = 30.0, *, debug: bool = False) -> subprocess.CompletedProcess[str]:
    """nbdinfo URI. libnbd prints a server's error message only in its debug output."""
    env = {**os.environ, "PATH": f"/usr/bin:/bin:{os.environ.get('PATH', '')}"}
    if debug:
        env["LIBNBD_DEBUG"] = "1"
    return subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=timeout, env=env)


class QemuIo:
    """qemu-io driven one command at a time on its stdin (it keeps one NBD connection, with
    its own reconnection logic, for the whole run)."""

    PROMPT = b"qemu-io> "

    def __init__(self, image_opts: str) -> None:
        self.image_opts = image_opts
        self.proc: asyncio.subprocess.Process | None = None
        self._buf = b""

    async def start(self) -> QemuIo:
        self.proc = await asyncio.create_subprocess_exec(
            "qemu-io", "--image-opts", self.image_opts,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        await self._until_prompt(30.0)
        return self

    async def _until_prompt(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while self.PROMPT not in self._buf:
                chunk = await self.proc.stdout.read(4096)
                if not chunk:
                    raise AssertionError(f"qemu-io exited: {self._buf.decode(errors='replace')}")
                self._buf += chunk
        out, _, self._buf = self._buf.partition(self.PROMPT)
        return out.decode(errors="replace")

    async def run(self, command: str, timeout: float = 60.0) -> str:
        """Run one qemu-io command; its output."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._until_prompt(timeout)

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        self.proc = None
