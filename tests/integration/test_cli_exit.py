"""The CLI's exit status is what README promises: 0 success, 1 the request (or a job waited
for) failed, 2 bad usage; never a traceback; with --json, errors are JSON on stdout."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvirt.client import NbdClient
from blockvirt.testing import BlockvirtServer

MiB = 1 << 20
HUGE = "9" * 400


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockvirtServer]:
    with BlockvirtServer(tmp_path_factory.mktemp("cli") / "data", extra_args=("--fault-injection",)) as s:
        yield s


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("volume", "create", "x", "--size", HUGE),
        ("volume", "resize", "x", HUGE),
        ("migrate", "x", "--pool", "default", "--bps-limit", HUGE),
        ("qos", "set", "x", "--bps-limit", HUGE),
        ("qos", "set", "x", "--limit", "1e400"),
        ("volume", "bogus"),
        ("serve", "--max-inflight-bytes", HUGE),
    ],
)
def test_bad_usage_is_2_and_json_with_json(server: BlockvirtServer, args: tuple[str, ...]) -> None:
    r = server.cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    no_traceback(r)
    r = server.cli(*args, "--json")
    assert r.returncode == 2, r.stderr
    no_traceback(r)
    assert json.loads(r.stdout)["error"]["code"] == "usage", r.stdout


def test_api_errors_are_1_and_json_with_json(server: BlockvirtServer) -> None:
    r = server.cli("volume", "info", "nope", "--json")
    assert r.returncode == 1
    err = json.loads(r.stdout)["error"]
    assert err["code"] == "not-found" and err["status"] == 404


def run_as_nobody(args: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "blockvirt", *args]
    if os.geteuid() == 0:  # root reads everything: drop to nobody, as an operator would be
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd="/")


def test_check_on_an_unreadable_pool_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with BlockvirtServer(data) as s:
        s.create_volume("v", MiB)
    for p in [tmp_path, *tmp_path.parents]:
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | 0o005)  # nobody may reach the data directory...
    for root, dirs, files in os.walk(data):  # SQLite wants to write next to its file
        for n in dirs + files:
            (Path(root) / n).chmod(0o777 if n in dirs else 0o666)
    data.chmod(0o777)
    (data / "pools" / "default").chmod(0o700)  # ... but not list the pool
    for extra in ([], ["--json"]):
        r = run_as_nobody(["check", "--data-dir", str(data), *extra])
        assert r.returncode == 1, (r.stdout, r.stderr)
        no_traceback(r)
        assert "Permission denied" in r.stderr, r.stderr
        if extra:
            assert json.loads(r.stdout.splitlines()[-1])["error"]["code"] == "os-error"


# ---------------------------------------------------------------- jobs waited for


def fault(server: BlockvirtServer, **rule: Any) -> None:
    server.api.request("PUT", "/api/v1/debug/faults", {"pool": "default", **rule})


def clear_fault(server: BlockvirtServer) -> None:
    server.api.request("DELETE", "/api/v1/debug/faults/default")


async def filled(server: BlockvirtServer, name: str, size: int) -> None:
    server.create_volume(name, size)
    async with await NbdClient.connect(server.uri(name)) as c:
        await c.write(0, os.urandom(size))
        await c.flush()


async def test_failed_snapshot_delete_and_flatten_exit_1(server: BlockvirtServer) -> None:
    await filled(server, "m1", 4 * MiB)
    server.api.post("/api/v1/volumes/m1/snapshots", {"name": "s"})
    async with await NbdClient.connect(server.uri("m1")) as c:  # the child has data too
        await c.write(0, b"x" * 65536)
    await filled(server, "m3", 4 * MiB)
    server.api.post("/api/v1/volumes/m3/snapshots", {"name": "s"})
    server.api.post("/api/v1/volumes", {"name": "c1", "source": "m3@s"})
    fault(server, error="EIO", ops=["write"])
    try:
        r = server.cli("volume", "flatten", "c1", "--wait")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "failed" in r.stderr
        r = server.cli("snapshot", "delete", "m1", "s", "--wait", "--json")
        no_traceback(r)
        out = json.loads(r.stdout)
        assert out.get("job_state") == "failed", out
        assert r.returncode == 1, r.stderr
        r = server.cli("job", "show", out["job"], "--wait")
        assert r.returncode == 1 and "failed" in r.stdout
    finally:
        clear_fault(server)


async def test_cancelled_jobs_exit_1(server: BlockvirtServer) -> None:
    await filled(server, "m2", 16 * MiB)
    server.api.post("/api/v1/volumes/m2/snapshots", {"name": "s"})
    server.api.post("/api/v1/volumes", {"name": "c2", "source": "m2@s"})
    fault(server, ops=["write"], delay_ms=50)  # slow enough to cancel in flight
    try:
        env = {**os.environ, "BLOCKVIRT_API": server.api_url}
        proc = subprocess.Popen(
            [sys.executable, "-m", "blockvirt", "volume", "flatten", "c2", "--wait"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        job_id = None
        deadline = time.monotonic() + 30
        while job_id is None and time.monotonic() < deadline:
            jobs = server.api.get("/api/v1/jobs")["jobs"]
            job_id = next((j["id"] for j in jobs if j["volume"] == "c2" and j["state"] == "running"), None)
            time.sleep(0.05)
        assert job_id is not None
        server.api.post(f"/api/v1/jobs/{job_id}/cancel", {})
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, (out, err)
        assert "cancelled" in err
        r = server.cli("job", "show", job_id, "--wait")
        assert r.returncode == 1 and "cancelled" in r.stderr
        r = server.cli("job", "show", job_id)  # not waiting: showing it succeeded
        assert r.returncode == 0
    finally:
        clear_fault(server)


# ---------------------------------------------------------------- the token and redirects


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]]
    target = ""

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.target:
            self.send_response(307)
            self.send_header("Location", self.target + self.path)
            self.end_headers()
            return
        body = b'{"volumes": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(host: str, seen: list[tuple[str, str | None]], target: str = "") -> http.server.HTTPServer:
    handler = type("H", (_Recorder,), {"seen": seen, "target": target})
    srv = http.server.HTTPServer((host, 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_the_token_does_not_follow_a_redirect_to_another_origin() -> None:
    first: list[tuple[str, str | None]] = []
    final: list[tuple[str, str | None]] = []
    other = _serve("127.0.0.2", final)
    entry = _serve("127.0.0.1", first, target=f"http://127.0.0.2:{other.server_address[1]}")
    try:
        env = {**os.environ, "BLOCKVIRT_API_TOKEN": "s3cret-token-not-for-others"}
        env.pop("BLOCKVIRT_API_TOKEN_FILE", None)
        url = f"http://127.0.0.1:{entry.server_address[1]}"
        r = subprocess.run(
            [sys.executable, "-m", "blockvirt", "volume", "list", "--api", url],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert first == [("/api/v1/volumes", "Bearer s3cret-token-not-for-others")]
        assert final == [("/api/v1/volumes", None)], final  # followed, without the token
    finally:
        other.shutdown()
        entry.shutdown()
