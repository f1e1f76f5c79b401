"""The service: the one place that builds the process (storage and its backends, jobs, QoS,
the NBD listener, the API, metrics), wires them together, and owns start and stop order.

Everything else receives what it needs; nothing below imports this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import cast

from aiohttp import web

from blockvirt.api.app import build_app
from blockvirt.api.auth import is_loopback, read_token_file, readable_by_others
from blockvirt.api.server import ApiLimits
from blockvirt.jobs import transfer
from blockvirt.jobs.manager import JobManager
from blockvirt.jobs.runners import register_all
from blockvirt.metrics.loop import LoopLagMonitor
from blockvirt.metrics.registry import build_registry
from blockvirt.nbd.handshake import TLSMode
from blockvirt.qos.manager import QosManager
from blockvirt.server.exports import ExportRegistry
from blockvirt.server.limits import Limits, SecurityCounters
from blockvirt.server.listener import NbdServer
from blockvirt.server.polling import describe
from blockvirt.server.tls import server_context
from blockvirt.storage.backend import VolumeBackend
from blockvirt.storage.backends.cowfile.backend import FileBackend
from blockvirt.storage.backends.cowfile.check import check_data_dir as check_file_pools
from blockvirt.storage.backends.rbd.tuning import RbdTuning
from blockvirt.storage.catalog import FILE_BACKEND, Catalog
from blockvirt.storage.check import Report
from blockvirt.storage.events import NoEvents
from blockvirt.storage.faults import FaultyFileIO
from blockvirt.storage.fileio import REAL, FileIO
from blockvirt.storage.volumes import VolumeManager

log = logging.getLogger("blockvirt.service")

__all__ = ["ConfigError", "RbdTuning", "Service", "ServiceConfig", "build_storage", "check_data_dir"]

DEFAULT_DATA_DIR = "./blockvirt-data"
DEFAULT_NBD = "127.0.0.1:10809"
DEFAULT_API = "127.0.0.1:9810"
#: Seconds between looks at the pools' space (watermark crossings are logged).
POOL_WATCH_INTERVAL = 30.0


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid {what} address {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    data_dir: str = DEFAULT_DATA_DIR
    nbd_host: str = "127.0.0.1"
    nbd_port: int = 10809
    api_host: str = "127.0.0.1"
    api_port: int = 9810
    shutdown_deadline: float = 10.0
    ready_file: str | None = None
    warn_depth: int = 16
    tls_dir: str | None = None
    tls_mode: str = "require"  # or "allow"
    #: Per-export accounting, /metrics and the loop-lag monitor (off: `serve --no-metrics`).
    metrics: bool = True
    #: Large cached reads are sent from the page cache's pages (off: `serve --no-zero-copy`).
    zero_copy: bool = True
    #: A file holding the API's bearer token; required when the API is not on loopback.
    api_token_file: str | None = None
    limits: Limits = field(default_factory=Limits)
    #: The API's own limits (connections, header and body deadlines).
    api_limits: ApiLimits = field(default_factory=ApiLimits)
    #: Test facility: pools' devices can be made to fail or slow down (/api/v1/debug/faults).
    fault_injection: bool = False
    #: This node's name among the nodes sharing an RBD pool (default: the host name).
    node_name: str | None = None
    #: RBD pools: connect and op timeouts, retry and figures intervals.
    rbd: RbdTuning = field(default_factory=RbdTuning)


class ConfigError(Exception):
    """The service cannot start with this configuration; the message is one line."""


def api_token(cfg: ServiceConfig) -> str | None:
    """The API token, or None; refuses an API reachable from elsewhere without one."""
    if cfg.api_token_file is None:
        if not is_loopback(cfg.api_host):
            raise ConfigError(
                f"the API address {cfg.api_host}:{cfg.api_port} is not loopback: "
                "give --api-token-file FILE (clients then send its token)"
            )
        return None
    token = read_token_file(cfg.api_token_file)
    if readable_by_others(cfg.api_token_file):
        log.warning("API token file %s can be read by other users (chmod 600 it)", cfg.api_token_file)
    return token


def build_storage(
    data_dir: str,
    *,
    io: FileIO = REAL,
    warn_depth: int = 16,
    metrics: bool = True,
    node_name: str | None = None,
    rbd: RbdTuning | None = None,
) -> tuple[VolumeManager, JobManager]:
    """Storage with its backends and the job manager, wired (no QoS, no NBD: the service adds
    those; tests and tools that want storage alone use this)."""
    catalog = Catalog(data_dir)
    jobs = JobManager(catalog)
    vm = VolumeManager(catalog, jobs, warn_depth=warn_depth, metrics=metrics, node_name=node_name)
    vm.add_backend(FileBackend(catalog, vm, io=io))
    rbd_backend = _rbd_backend(vm, rbd or RbdTuning())
    if rbd_backend is not None:
        vm.add_backend(rbd_backend)
    return vm, jobs


def _rbd_backend(vm: VolumeManager, tuning: RbdTuning) -> VolumeBackend | None:
    """The RBD backend, if Ceph's Python bindings are installed (python3-rbd)."""
    try:
        from blockvirt.storage.backends.rbd.backend import RbdBackend
    except ImportError as e:
        log.info("RBD pools are not available: %s", e)
        return None
    return RbdBackend(vm, tuning)


def check_data_dir(data_dir: str, *, repair: bool = False, io: FileIO = REAL) -> Report:
    """The offline check (`blockvirt check`) of every pool the data directory knows, each by
    its own backend's checker: file pools, then RBD pools (reached with the config the
    catalog keeps for each)."""
    report = check_file_pools(data_dir, repair=repair, io=io)
    if not os.path.exists(os.path.join(data_dir, "catalog.sqlite")):
        return report  # said so already
    catalog = Catalog(data_dir)
    try:
        others = [p for p in catalog.pools() if p.backend != FILE_BACKEND]
        # pool -> volume names, to find a name taken in two pools (VolumeManager.locate)
        names: dict[str, set[str]] = {}
        for row in catalog.volumes():
            if row.incoming is None:  # a move's copy takes the name only when it switches
                names.setdefault(row.pool, set()).add(row.name)
    finally:
        catalog.close()
    rbd = [p for p in others if p.backend == "rbd"]
    for p in others:
        if p.backend != "rbd":
            report.damage.append(f"pool {p.name}: no checker for its backend {p.backend!r}")
    if rbd:
        try:
            from blockvirt.storage.backends.rbd.check import check_rbd_pools
        except ImportError as e:
            for p in rbd:
                report.unchecked.append(f"pool {p.name}: cannot be checked: Ceph's Python bindings: {e}")
        else:
            names.update(check_rbd_pools(rbd, report, repair=repair))
    pools_of: dict[str, list[str]] = {}
    for pool in sorted(names):
        for name in names[pool]:
            pools_of.setdefault(name, []).append(pool)
    for name, pools in sorted(pools_of.items()):
        if len(pools) > 1:
            report.notes.append(
                f"volume {name} is in pools {', '.join(pools)}: the oldest is served, the others "
                "are hidden until it is deleted or moved"
            )
    return report


class _Disconnect(NoEvents):
    """Storage's requests to end sessions go to the NBD server."""

    def __init__(self, nbd: NbdServer) -> None:
        self.nbd = nbd

    async def disconnect(self, volume: str) -> None:
        await self.nbd.disconnect_volume(volume)

    async def evict(self, volume: str) -> None:
        self.nbd.abort_volume(volume)


class Service:
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.volumes: VolumeManager | None = None
        self.jobs: JobManager | None = None
        self.nbd: NbdServer | None = None
        self._runner: web.AppRunner | None = None
        self.loop_lag: LoopLagMonitor | None = None
        self.api_url = ""
        self.qos: QosManager | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cfg = self.config
        token = api_token(cfg)  # fail before binding anything
        tls_context = server_context(cfg.tls_dir) if cfg.tls_dir else None
        io = FaultyFileIO() if cfg.fault_injection else REAL
        if cfg.fault_injection:
            log.warning("fault injection is on: /api/v1/debug/faults can break pools on purpose")
        self.volumes, self.jobs = build_storage(
            cfg.data_dir,
            io=io,
            warn_depth=cfg.warn_depth,
            metrics=cfg.metrics,
            node_name=cfg.node_name,
            rbd=cfg.rbd,
        )
        self.qos = QosManager(self.volumes)
        self.qos.load()
        registry = ExportRegistry(self.volumes, self.qos)
        self.nbd = NbdServer(
            registry,
            cfg.nbd_host,
            cfg.nbd_port,
            tls_mode=TLSMode.ALLOW if cfg.tls_mode == "allow" else TLSMode.REQUIRE,
            tls_context=tls_context,
            limits=cfg.limits,
            counters=SecurityCounters(),
            zero_copy=cfg.zero_copy,
        )
        self.volumes.listen(self.qos)
        self.volumes.listen(_Disconnect(self.nbd))
        register_all(self.jobs, self.volumes, self.qos.background)
        await self.volumes.start()
        transfer.restore(self.volumes, self.jobs.pending())  # before anything is served
        self.jobs.resume()
        self.qos.start()
        self._watch = asyncio.get_running_loop().create_task(self._watch_pools())
        await self.nbd.start()
        metrics = None
        if cfg.metrics:
            self.loop_lag = LoopLagMonitor()
            self.loop_lag.start()
            metrics = build_registry(self.volumes, self.jobs, self.qos, self.loop_lag, self.nbd.counters)
        app = build_app(
            self.volumes, self.jobs, self.qos, metrics, token=token, fault_io=io, limits=cfg.api_limits
        )
        # A stop waits for API requests under way at most the deadline (aiohttp's default is
        # 60 s): one waiting on a cluster that does not answer must not hold it. aiohttp waits
        # twice, for the request to finish and then for it to end once cancelled.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=cfg.shutdown_deadline / 2
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.api_host, cfg.api_port, reuse_address=True)
        await site.start()
        # The bound socket tells the real port when port 0 was asked for.
        server = cast(asyncio.Server | None, site._server)
        port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else cfg.api_port
        self.api_url = f"http://{cfg.api_host}:{port}"
        # What the other nodes of a shared pool publish of us (heartbeats carry it).
        self.volumes.node.nbd = self.nbd.address
        self.volumes.node.api = self.api_url
        log.info("API and /metrics on %s", self.api_url)
        log.info("%s", describe(asyncio.get_running_loop()))
        if cfg.ready_file:
            info = {"nbd": self.nbd.address, "api": self.api_url, "pid": os.getpid()}
            _write_ready_file(cfg.ready_file, info)

    async def stop(self) -> None:
        """Ordered: stop NBD (sessions drain and flush), stop the API, close storage."""
        if self.volumes is None:
            return  # start() failed on its configuration checks: nothing to stop
        if self._watch is not None:
            self._watch.cancel()
        if self.qos is not None:
            await self.qos.close()  # waiting requests go now: in-flight work must finish
        if self.nbd is not None:
            await _timed("NBD sessions", self.nbd.stop(self.config.shutdown_deadline))
        if self._runner is not None:
            await _timed("API requests", self._runner.cleanup())
        if self.volumes is not None:
            await _timed("storage", self.volumes.close(self.config.shutdown_deadline))  # jobs stop first
        if self.loop_lag is not None:
            self.loop_lag.stop()
        log.info("stopped")

    async def _watch_pools(self) -> None:
        """Look at every pool's space now and then, so crossing a watermark is logged even
        when nobody asks (pool info and /metrics look too)."""
        assert self.volumes is not None
        while True:
            try:
                self.volumes.pool_list()
            except Exception as e:  # a pool directory gone: reported by pool info, not fatal
                log.debug("pool watch: %s", e)
            await asyncio.sleep(POOL_WATCH_INTERVAL)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until `stop` is set, or SIGTERM/SIGINT (a second signal forces exit)."""
        loop = asyncio.get_running_loop()
        stop = stop or asyncio.Event()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second signal: exiting now")
                os._exit(1)
            log.info("signal received: shutting down")
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


#: A step of the stop that takes longer says so: what held a stop is otherwise a guess.
SLOW_STOP_STEP = 1.0


async def _timed(what: str, step: Awaitable[None]) -> None:
    started = time.monotonic()
    await step
    took = time.monotonic() - started
    if took >= SLOW_STOP_STEP:
        log.info("stop: waiting for %s took %.1f s", what, took)


def _write_ready_file(path: str, info: dict[str, object]) -> None:
    """Atomically publish where we listen (tests and scripts wait for this file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)
