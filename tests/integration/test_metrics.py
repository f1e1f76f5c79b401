"""/metrics, `volume stats`, JSON logs, `--no-metrics`, and the deployment files (compose,
Prometheus and Grafana provisioning, the dashboard's PromQL against a live /metrics)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockvirt.client import NbdClient, NbdClientError
from blockvirt.storage.stats import LATENCY_BOUNDS
from blockvirt.testing import BlockvirtServer
from tests.promql import (
    REPO_ROOT,
    dashboard,
    dashboard_exprs,
    fetch,
    metric_names,
    sample_names,
    series,
    value,
)

MiB = 1 << 20
OPS = {"read", "write", "flush", "trim", "write_zeroes", "cache", "block_status"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockvirtServer]:
    """One server for the module (JSON logs at info level); tests use their own volume names."""
    data = tmp_path_factory.mktemp("metrics") / "data"
    with BlockvirtServer(data, extra_args=("--log-format", "json"), log_level="info") as s:
        yield s


async def scrape(server: BlockvirtServer) -> str:
    return await asyncio.to_thread(fetch, server.api_url)


def http_json(server: BlockvirtServer, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(server.api_url + path, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def wait_idle(server: BlockvirtServer, volume: str) -> None:
    """Sessions end a little after the client closes: wait until none is left."""
    for _ in range(400):
        if value(await scrape(server), "blockvirt_connections", volume=volume) == 0:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{volume} still has connections")


async def wait_job(server: BlockvirtServer, job_id: str) -> None:
    status, job = await asyncio.to_thread(http_json, server, f"/api/v1/jobs/{job_id}?wait=1")
    assert status == 200 and job["state"] == "done", job


# ---------------------------------------------------------------- volume traffic


async def test_counters_and_latency_histograms_follow_io(server: BlockvirtServer) -> None:
    server.create_volume("io1", 8 * MiB)
    text = await scrape(server)
    # A volume nobody opened yet: zero counters, its size, no latency series.
    assert value(text, "blockvirt_volume_read_bytes_total", volume="io1") == 0
    assert value(text, "blockvirt_volume_busy_seconds_total", volume="io1") == 0
    assert value(text, "blockvirt_volume_size_bytes", volume="io1") == 8 * MiB
    assert value(text, "blockvirt_volume_chain_depth", volume="io1") == 1
    assert value(text, "blockvirt_connections", volume="io1") == 0
    assert not series(text, "blockvirt_volume_latency_seconds_count", volume="io1")

    async with await NbdClient.connect(server.uri("io1")) as c:
        await c.write(0, b"w" * 65536)
        for i in range(10):
            await c.read(i * 4096, 4096)
        await c.trim(1 * MiB, 65536)
        await c.zero(2 * MiB, 65536)
        await c.flush()
        with pytest.raises(NbdClientError):
            await c.read(8 * MiB, 4096)  # past the end: an error reply
        text = await scrape(server)
        assert value(text, "blockvirt_connections", volume="io1") == 1

    assert value(text, "blockvirt_volume_read_bytes_total", volume="io1") == 40960
    assert value(text, "blockvirt_volume_write_bytes_total", volume="io1") == 65536
    assert value(text, "blockvirt_volume_errors_total", volume="io1") == 1
    ops = {s.labels["op"]: s.value for s in series(text, "blockvirt_volume_ops_total", volume="io1")}
    assert ops == {"read": 10, "write": 1, "trim": 1, "write_zeroes": 1, "flush": 1}
    assert set(ops) <= OPS

    lat_sum = 0.0
    for op, n in ops.items():
        buckets = series(text, "blockvirt_volume_latency_seconds_bucket", volume="io1", op=op)
        les = [b.labels["le"] for b in buckets]
        assert les[-1] == "+Inf" and len(les) == len(LATENCY_BOUNDS) + 1, les
        bounds = [float(le) for le in les[:-1]]
        assert bounds == sorted(bounds) and bounds[0] == 5e-05 and bounds[-1] == 5.0
        counts = [b.value for b in buckets]
        assert counts == sorted(counts), f"buckets of {op} are not cumulative: {counts}"
        assert counts[-1] == n == value(text, "blockvirt_volume_latency_seconds_count", volume="io1", op=op)
        s = value(text, "blockvirt_volume_latency_seconds_sum", volume="io1", op=op)
        assert s is not None and s > 0
        lat_sum += s
    busy = value(text, "blockvirt_volume_busy_seconds_total", volume="io1")
    assert busy == pytest.approx(lat_sum, rel=1e-6)
    alloc = value(text, "blockvirt_volume_allocated_bytes", volume="io1")
    assert alloc is not None and alloc >= 65536


async def test_snapshot_exports_have_their_own_label_and_deleted_volumes_vanish(
    server: BlockvirtServer,
) -> None:
    server.create_volume("sn1", 4 * MiB)
    async with await NbdClient.connect(server.uri("sn1")) as c:
        await c.write(0, b"s" * 8192)
    await wait_idle(server, "sn1")
    server.api.post("/api/v1/volumes/sn1/snapshots", {"name": "a"})
    server.api.post("/api/v1/volumes/sn1/snapshots", {"name": "b"})
    async with await NbdClient.connect(server.uri("sn1@a")) as c:
        assert await c.read(0, 4096) == b"s" * 4096
        text = await scrape(server)
        assert value(text, "blockvirt_connections", volume="sn1@a") == 1
        assert value(text, "blockvirt_connections", volume="sn1") == 0
    assert value(text, "blockvirt_volume_read_bytes_total", volume="sn1@a") == 4096
    assert value(text, "blockvirt_volume_read_bytes_total", volume="sn1") == 0  # not folded in
    assert value(text, "blockvirt_volume_write_bytes_total", volume="sn1") == 8192
    assert value(text, "blockvirt_volume_snapshots", volume="sn1") == 2
    assert value(text, "blockvirt_volume_chain_depth", volume="sn1") == 3
    # Space is per volume only; a snapshot export has no size series of its own.
    assert value(text, "blockvirt_volume_size_bytes", volume="sn1@a") is None
    alloc = value(text, "blockvirt_volume_allocated_bytes", volume="sn1")
    assert alloc is not None and alloc >= 8192  # the data sits in snapshot a's layer

    await wait_idle(server, "sn1@a")
    out = server.api.delete("/api/v1/volumes/sn1/snapshots/a")
    if out.get("job"):  # a's data is merged into its child
        await wait_job(server, out["job"])
    text = await scrape(server)
    assert 'volume="sn1@a"' not in text
    assert value(text, "blockvirt_volume_snapshots", volume="sn1") == 1

    server.api.delete("/api/v1/volumes/sn1")
    text = await scrape(server)
    assert not re.search(r'volume="sn1[@"]', text), "a deleted volume is still exported"
    assert "blockvirt_volume_read_bytes_total" in text  # the families stay


async def test_pool_metrics(server: BlockvirtServer, tmp_path: Path) -> None:
    pool_dir = tmp_path / "pool2"
    server.api.post("/api/v1/pools", {"name": "p2", "path": str(pool_dir)})
    server.create_volume("pv1", 64 * MiB, pool="p2")
    server.create_volume("pv2", 32 * MiB, pool="p2", thick=True)
    text = await scrape(server)
    st = os.statvfs(pool_dir)
    cap = value(text, "blockvirt_pool_capacity_bytes", pool="p2")
    assert cap == st.f_blocks * st.f_frsize
    used = value(text, "blockvirt_pool_used_bytes", pool="p2")
    free = value(text, "blockvirt_pool_free_bytes", pool="p2")
    assert used is not None and free is not None and 0 < used <= cap and 0 < free <= cap
    assert value(text, "blockvirt_pool_provisioned_bytes", pool="p2") == 96 * MiB
    assert value(text, "blockvirt_pool_overcommit_ratio", pool="p2") == pytest.approx(96 * MiB / cap)
    allocated = value(text, "blockvirt_pool_allocated_bytes", pool="p2")
    assert allocated is not None and allocated >= 32 * MiB  # the thick volume
    assert value(text, "blockvirt_pool_provisioned_bytes", pool="default") is not None
    server.api.delete("/api/v1/volumes/pv1")
    server.api.delete("/api/v1/volumes/pv2")
    text = await scrape(server)
    assert value(text, "blockvirt_pool_provisioned_bytes", pool="p2") == 0


async def test_job_progress_loop_lag_and_process_metrics(server: BlockvirtServer) -> None:
    server.create_volume("jb1", 4 * MiB)
    async with await NbdClient.connect(server.uri("jb1")) as c:
        await c.write(0, b"j" * 65536)
    await wait_idle(server, "jb1")
    server.api.post("/api/v1/volumes/jb1/snapshots", {"name": "base"})
    server.api.post("/api/v1/volumes", {"name": "jb1c", "source": "jb1@base"})
    job = server.api.post("/api/v1/volumes/jb1c/flatten", {})
    await wait_job(server, job["id"])
    text = await scrape(server)
    prog = value(text, "blockvirt_job_progress_ratio", job=job["id"], volume="jb1c", kind="flatten")
    assert prog == 1.0
    lag = value(text, "blockvirt_event_loop_lag_seconds_count")
    deadline = time.monotonic() + 10
    while not lag and time.monotonic() < deadline:  # the lag probe samples periodically
        await asyncio.sleep(0.2)
        text = await scrape(server)
        lag = value(text, "blockvirt_event_loop_lag_seconds_count")
    assert lag is not None and lag > 0
    buckets = [s.value for s in series(text, "blockvirt_event_loop_lag_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == lag
    names = sample_names(text)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert name in names
    assert series(text, "python_info")
    assert series(text, "blockvirt_build_info")


# ---------------------------------------------------------------- volume stats


async def test_volume_stats_api_and_cli(server: BlockvirtServer) -> None:
    server.create_volume("st1", 4 * MiB)
    status, st = await asyncio.to_thread(http_json, server, "/api/v1/volumes/st1/stats")
    assert status == 200
    assert st["ops"] == {} and st["read_bytes"] == 0 and st["busy_seconds"] == 0
    async with await NbdClient.connect(server.uri("st1")) as c:
        await c.write(0, b"x" * 8192)
        await c.read(0, 4096)
        await c.read(4096, 4096)
        await c.flush()
    await wait_idle(server, "st1")
    status, st = await asyncio.to_thread(http_json, server, "/api/v1/volumes/st1/stats")
    assert status == 200
    assert st["volume"] == "st1"
    assert st["ops"] == {"write": 1, "read": 2, "flush": 1}
    assert (st["read_bytes"], st["write_bytes"], st["errors"], st["connections"]) == (8192, 8192, 0, 0)
    assert st["latency"]["read"]["count"] == 2 and st["latency"]["read"]["sum_seconds"] > 0
    assert st["busy_seconds"] > 0 and st["since"] <= time.time()

    r = await asyncio.to_thread(server.cli, "volume", "stats", "st1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ops"] == st["ops"]
    r = await asyncio.to_thread(server.cli, "volume", "stats", "st1")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^read:\s+8\.0 KiB \(8192 bytes\) in 2 ops$", r.stdout, re.M), r.stdout
    assert re.search(r"^flush\s+1\s+[\d.]+ us$", r.stdout, re.M), r.stdout

    server.api.post("/api/v1/volumes/st1/snapshots", {"name": "s"})
    status, st = await asyncio.to_thread(http_json, server, "/api/v1/volumes/st1%40s/stats")
    assert status == 200 and st["volume"] == "st1@s" and st["ops"] == {}
    for missing in ("nope", "st1%40nope"):
        status, err = await asyncio.to_thread(http_json, server, f"/api/v1/volumes/{missing}/stats")
        assert status == 404 and err["error"]["code"] == "not-found"
    r = await asyncio.to_thread(server.cli, "volume", "stats", "nope")
    assert r.returncode == 1 and "no volume or snapshot named" in r.stderr


# ---------------------------------------------------------------- logs


async def test_json_logs_carry_session_volume_and_job_ids(server: BlockvirtServer) -> None:
    server.create_volume("lg1", 4 * MiB)
    async with await NbdClient.connect(server.uri("lg1")) as c:
        await c.write(0, b"l" * 4096)
    await wait_idle(server, "lg1")
    server.api.post("/api/v1/volumes/lg1/snapshots", {"name": "s"})
    server.api.post("/api/v1/volumes", {"name": "lg1c", "source": "lg1@s"})
    job = server.api.post("/api/v1/volumes/lg1c/flatten", {})
    await wait_job(server, job["id"])
    await asyncio.sleep(0.1)
    lines = [ln for ln in server.log_path.read_text().splitlines() if ln.strip()]
    assert lines
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    for rec in records:
        assert {"ts", "level", "logger", "msg"} <= rec.keys(), rec
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"]), rec
        assert rec["level"] in ("debug", "info", "warning", "error", "critical")
    opened = [r for r in records if r.get("volume") == "lg1" and "opened export" in r["msg"]]
    assert opened and isinstance(opened[0]["session"], int) and opened[0]["logger"] == "blockvirt.session"
    ended = [r for r in records if r.get("job") == job["id"]]
    assert {r["msg"].rsplit(" ", 1)[-1] for r in ended} >= {"started", "done"}
    assert all(r["volume"] == "lg1c" for r in ended)


def test_json_formatter_fields_and_exceptions() -> None:
    import io
    import logging

    from blockvirt.logs import JsonFormatter

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("blockvirt.test")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("hello %s", "world", extra={"volume": "v", "session": 7})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed", extra={"job": "j1"})
    finally:
        log.removeHandler(handler)
        log.propagate = True
    first, second = (json.loads(ln) for ln in buf.getvalue().splitlines())
    assert first["msg"] == "hello world" and first["level"] == "warning"
    assert first["logger"] == "blockvirt.test"
    assert (first["volume"], first["session"]) == ("v", 7)
    assert second["job"] == "j1" and "ValueError: boom" in second["exc"] and second["level"] == "error"


# ---------------------------------------------------------------- --no-metrics


async def test_no_metrics_switch(tmp_path: Path) -> None:
    with BlockvirtServer(tmp_path / "data", extra_args=("--no-metrics",)) as s:
        s.create_volume("nm", 4 * MiB)
        async with await NbdClient.connect(s.uri("nm")) as c:
            await c.write(0, b"n" * 4096)
            assert await c.read(0, 4096) == b"n" * 4096
        status, err = await asyncio.to_thread(http_json, s, "/metrics")
        assert status == 404 and "--no-metrics" in err["error"]["message"]
        status, err = await asyncio.to_thread(http_json, s, "/api/v1/volumes/nm/stats")
        assert status == 409 and "--no-metrics" in err["error"]["message"]
        r = await asyncio.to_thread(s.cli, "volume", "stats", "nm")
        assert r.returncode == 1 and "--no-metrics" in r.stderr


# ---------------------------------------------------------------- deployment files


def _yaml(path: Path) -> Any:
    """PyYAML is in the test extras; without it only these file checks are skipped."""
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = _yaml(REPO_ROOT / "docker-compose.yml")
    return data


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Bind mounts of a compose service: container path -> host path (named volumes skipped)."""
    out: dict[str, Path] = {}
    for vol in service.get("volumes", []):
        src, dst = vol.split(":")[:2]
        if src.startswith((".", "/")):
            out[dst] = (REPO_ROOT / src).resolve()
    return out


def _in_container(mounts: dict[str, Path], path: str) -> Path | None:
    """Where a path inside the container comes from on the host, through the bind mounts."""
    for dst, src in sorted(mounts.items(), key=lambda m: -len(m[0])):
        if path == dst or path.startswith(dst.rstrip("/") + "/"):
            return src / os.path.relpath(path, dst)
    return None


def test_compose_and_provisioning_reference_existing_files() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"blockvirt", "prometheus", "grafana"} <= services.keys()
    for svc in services.values():
        for host in _mounts(svc).values():
            assert host.exists(), f"compose mounts {host}, which does not exist"
        for dep in svc.get("depends_on", []):
            assert dep in services
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    named = {n for n in named if not n.startswith((".", "/"))}
    assert named <= set(compose.get("volumes") or {}), "undeclared named volumes"

    bv = services["blockvirt"]
    assert bv["build"] == "." and (REPO_ROOT / "Dockerfile").is_file()
    cmd = bv.get("command") or []
    # The API binds 0.0.0.0 in the container: it needs a token, given as a secret that
    # Prometheus gets too.
    token_path = cmd[cmd.index("--api-token-file") + 1]
    assert token_path == "/run/secrets/api_token"
    assert "api_token" in bv.get("secrets", []) and "api_token" in services["prometheus"].get("secrets", [])
    assert compose["secrets"]["api_token"] == {"environment": "BLOCKVIRT_API_TOKEN"}
    api_port = cmd[cmd.index("--api") + 1].rsplit(":", 1)[1] if "--api" in cmd else "9810"
    assert any(p.endswith(f":{api_port}") for p in bv["ports"])

    # Prometheus: its config file is mounted where --config.file says, and scrapes blockvirt.
    prom = services["prometheus"]
    prom_mounts = _mounts(prom)
    cfg_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    cfg_path = _in_container(prom_mounts, cfg_flag.split("=", 1)[1])
    assert cfg_path == (REPO_ROOT / "deploy/prometheus/prometheus.yml").resolve()
    prom_cfg = _yaml(cfg_path)
    [job] = [j for j in prom_cfg["scrape_configs"] if j["job_name"] == "blockvirt"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"blockvirt:{api_port}"]

    # Grafana: provisioning dirs are mounted; the datasource points at the prometheus service;
    # the dashboard provider's path holds the dashboard.
    graf_mounts = _mounts(services["grafana"])
    prov = _in_container(graf_mounts, "/etc/grafana/provisioning")
    assert prov is not None and prov.is_dir()
    ds_files = sorted((prov / "datasources").glob("*.yml"))
    db_files = sorted((prov / "dashboards").glob("*.yml"))
    assert ds_files and db_files
    [ds] = _yaml(ds_files[0])["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    [provider] = _yaml(db_files[0])["providers"]
    dash_dir = _in_container(graf_mounts, provider["options"]["path"])
    assert dash_dir is not None and (dash_dir / "blockvirt.json").is_file()
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert _in_container(graf_mounts, home) == dash_dir / "blockvirt.json"


def test_dockerfile_installs_the_package_and_serves_the_documented_addresses() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM (python:3\.11-slim|debian:bookworm-slim)\b", text, re.M)
    for m in re.finditer(r"^COPY (.+?) \S+$", text, re.M):
        for src in m.group(1).split():
            assert (REPO_ROOT / src).exists(), f"Dockerfile copies missing {src}"
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    argv = entry + cmd
    assert shlex.join(argv) == (
        "blockvirt serve --data-dir /data --nbd 0.0.0.0:10809 --api 0.0.0.0:9810"
        " --api-token-file /run/secrets/api_token"
    )


async def test_dashboard_queries_only_metrics_blockvirt_exports(server: BlockvirtServer) -> None:
    # Make every family non-empty: I/O, a snapshot export, a finished job.
    server.create_volume("db1", 4 * MiB)
    async with await NbdClient.connect(server.uri("db1")) as c:
        await c.write(0, b"d" * 65536)
        await c.read(0, 4096)
    await wait_idle(server, "db1")
    server.api.post("/api/v1/volumes/db1/snapshots", {"name": "s"})
    server.api.post("/api/v1/volumes", {"name": "db1c", "source": "db1@s"})
    await wait_job(server, server.api.post("/api/v1/volumes/db1c/flatten", {})["id"])
    # QoS in force (a latency target, a limit) and a migration.
    # The target is below any real latency, so latency control keeps a window.
    server.api.request("PATCH", "/api/v1/pools/default", {"iops_capacity": 50000, "latency_target_ms": 0.01})
    server.api.request("PATCH", "/api/v1/volumes/db1/qos", {"limit": 20000, "reservation": 100})
    async with await NbdClient.connect(server.uri("db1")) as c:
        for _ in range(3):
            await asyncio.gather(*(c.write(i * 65536, b"q" * 65536, fua=True) for i in range(16)))
            await asyncio.sleep(0.3)  # FUA writes are served in threads: their latency is seen
    server.api.post("/api/v1/pools", {"name": "db2", "path": str(server.data_dir.parent / "db2pool")})
    await wait_job(server, server.api.post("/api/v1/volumes/db1c/migrate", {"pool": "db2"})["id"])
    live = sample_names(await scrape(server))

    dash = dashboard()
    assert dash["uid"] == "blockvirt" and dash["panels"]
    exprs = dashboard_exprs(dash)
    assert len(exprs) >= 15
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        # A node without a shared (RBD) pool has no cluster figures: tests/cluster checks those.
        missing = {n for n in names - live if not n.startswith("blockvirt_cluster_")}
        assert not missing, f"dashboard expression {expr!r} reads {missing}, not in a live /metrics"
        used |= names
    # The panels the issue asks for are there.
    for name in (
        "blockvirt_volume_ops_total",
        "blockvirt_volume_read_bytes_total",
        "blockvirt_volume_write_bytes_total",
        "blockvirt_volume_latency_seconds_bucket",
        "blockvirt_connections",
        "blockvirt_volume_size_bytes",
        "blockvirt_volume_allocated_bytes",
        "blockvirt_volume_snapshots",
        "blockvirt_volume_chain_depth",
        "blockvirt_job_progress_ratio",
        "blockvirt_pool_capacity_bytes",
        "blockvirt_pool_provisioned_bytes",
        "blockvirt_event_loop_lag_seconds_bucket",
        "blockvirt_qos_wait_seconds_total",
        "blockvirt_qos_requests_total",
        "blockvirt_pool_qos_inflight_requests",
        "blockvirt_pool_watermark_state",
    ):
        assert name in used, f"the dashboard shows no {name}"
    assert any("histogram_quantile" in e for e in exprs)
