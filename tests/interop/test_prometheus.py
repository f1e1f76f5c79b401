"""A real Prometheus (Debian's `prometheus`) scraping a live blockvirt: fio writes and reads,
and the per-volume values come back through Prometheus' HTTP query API. Also `promtool
check config` on the compose stack's Prometheus config, and every dashboard expression
evaluated by the real PromQL engine."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvirt.testing import BlockvirtServer
from tests.promql import REPO_ROOT, dashboard, dashboard_exprs

from .conftest import MiB, need, run

pytestmark = pytest.mark.interop

PROM_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"


def test_promtool_checks_the_compose_prometheus_config(tmp_path: Path) -> None:
    """promtool wants the token file the config names to exist: the compose stack mounts it
    as a secret at /run/secrets/api_token; here a stand-in takes its place."""
    need("promtool")
    secret = "/run/secrets/api_token"
    text = PROM_CONFIG.read_text()
    assert f"credentials_file: {secret}" in text, "the blockvirt job must send the API token"
    token = tmp_path / "api_token"
    token.write_text("t" * 32 + "\n")
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace(secret, str(token)))
    r = run(["promtool", "check", "config", config], timeout=60)
    assert "SUCCESS" in r.stdout + r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A prometheus process of our own on 127.0.0.1, its data in a directory we remove."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: blockvirt\n"
            "    metrics_path: /metrics\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.tsdb = workdir / "tsdb"
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.tsdb}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after {timeout}s: {self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.proc = None
        shutil.rmtree(self.tsdb, ignore_errors=True)

    def query(self, promql: str) -> dict[str, Any]:
        """An instant query; the answer's `data` (fails the test on a PromQL error)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
        assert body["status"] == "success", f"{promql!r}: {body}"
        data: dict[str, Any] = body["data"]
        return data

    def wait_value(self, promql: str, want: float, timeout: float = 60.0) -> None:
        """Poll until the query gives exactly one series whose value is `want`."""
        deadline = time.monotonic() + timeout
        got: Any = None
        while time.monotonic() < deadline:
            got = self.query(promql)["result"]
            if len(got) == 1 and float(got[0]["value"][1]) == want:
                return
            time.sleep(0.5)
        pytest.fail(f"{promql!r} did not reach {want} in {timeout}s; last answer: {got}\n{self.log()}")

    def wait_nonempty(self, promql: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result: list[dict[str, Any]] = self.query(promql)["result"]
            if result:
                return result
            time.sleep(0.5)
        pytest.fail(f"{promql!r} stayed empty for {timeout}s\n{self.log()}")


@pytest.fixture
def prometheus(blockvirt_server: BlockvirtServer, tmp_path: Path) -> Iterator[Prometheus]:
    need("prometheus")
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    prom = Prometheus(workdir, blockvirt_server.api_url.removeprefix("http://"))
    try:
        prom.start()
        yield prom
    finally:
        prom.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _fio(uri: str, rw: str, size: int, cwd: Path) -> None:
    run(
        [
            "fio",
            f"--name={rw}",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            "--bs=64k",
            f"--size={size}",
            "--iodepth=8",
            "--eta=never",
        ],
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.slow
def test_prometheus_reads_back_per_volume_values(
    blockvirt_server: BlockvirtServer, prometheus: Prometheus, tmp_path: Path
) -> None:
    need("fio")
    server = blockvirt_server
    uri = server.create_volume("prom", 64 * MiB)
    _fio(uri, "write", 4 * MiB, tmp_path)
    _fio(uri, "read", 2 * MiB, tmp_path)

    sel = '{job="blockvirt",volume="prom"}'
    prometheus.wait_value(f"blockvirt_volume_write_bytes_total{sel}", 4 * MiB)
    prometheus.wait_value(f"blockvirt_volume_read_bytes_total{sel}", 2 * MiB)
    prometheus.wait_value('blockvirt_volume_ops_total{job="blockvirt",volume="prom",op="write"}', 64)
    prometheus.wait_value('blockvirt_volume_latency_seconds_count{volume="prom",op="read"}', 32)
    prometheus.wait_value(f"blockvirt_volume_size_bytes{sel}", 64 * MiB)
    prometheus.wait_value('up{job="blockvirt"}', 1)
    # The same numbers as the stats API gives.
    stats = server.api.get("/api/v1/volumes/prom/stats")
    assert (stats["write_bytes"], stats["read_bytes"]) == (4 * MiB, 2 * MiB)

    # PromQL over the histogram works on real data: a p99 between 0 and 5 s.
    [p99] = prometheus.wait_nonempty(
        'histogram_quantile(0.99, sum by (le) (blockvirt_volume_latency_seconds_bucket{volume="prom"}))'
    )
    assert 0 < float(p99["value"][1]) <= 5.0

    # Every dashboard expression is valid PromQL for the real engine (Grafana variables filled).
    for expr in dashboard_exprs(dashboard()):
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL (its metric is checked in test_metrics.py)
        promql = expr.replace("$__rate_interval", "10s").replace("$volume", ".*").replace("$pool", ".*")
        assert "$" not in promql, promql
        prometheus.query(promql)
    # ...and the throughput panel's query shows the volume.
    result = prometheus.wait_nonempty(
        'sum by (volume) (rate(blockvirt_volume_write_bytes_total{volume=~".*"}[1m]))'
    )
    assert "prom" in {r["metric"]["volume"] for r in result}
