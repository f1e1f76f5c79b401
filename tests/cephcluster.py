"""A throwaway one-node Ceph (one mon, one bluestore OSD) for tests and benchmarks.

    with CephCluster() as ceph:                 # or ceph.start() ... ceph.stop()
        ceph.create_pool("vols")
        rados.Rados(conffile=str(ceph.conf_path))

Everything lives in one temporary directory: config, mon and OSD data (bluestore on a sparse
file), run files, admin sockets and logs. The mon listens on 127.0.0.1 ports picked free at
start; the OSD takes free ports from Ceph's usual range. A mgr runs too (mgr=True, the default)
because usage figures and pool quotas come from the PG statistics only a mgr collects; start()
does not wait for it (wait_for_stats() does). There is no cephx unless cephx=True (for the
tests of users and their caps): the cluster exists for seconds and only on the loopback.
stop() ends only the processes this object started (their command name is checked first)
and removes the directory.

Standard library only, so tools/bench can load it by path; it drives the Debian packages'
binaries (ceph-mon, ceph-osd, ceph, rbd). Run it directly to keep a cluster up by hand:
`python tests/cephcluster.py` prints the config path and stops on Ctrl-C.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

#: Binaries the cluster needs (Debian: ceph-mon, ceph-osd, ceph-common).
REQUIRED_BINARIES = ("ceph-mon", "ceph-osd", "ceph-mgr", "monmaptool", "ceph", "rbd", "rados")

GiB = 1 << 30


class CephClusterError(RuntimeError):
    """The cluster could not be started or a command failed; the message ends with log tails."""


def missing_binaries() -> list[str]:
    """Which of the binaries this module runs are not on PATH."""
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_key() -> str:
    """A CryptoKey as Ceph encodes it: type (AES), creation time, length, 16 random bytes
    (what `ceph-authtool --gen-key` prints)."""
    secret = os.urandom(16)
    blob = struct.pack("<HIIH", 1, int(time.time()), 0, len(secret)) + secret
    return base64.b64encode(blob).decode()


def keyring_entry(entity: str, key: str, caps: dict[str, str] | None = None) -> str:
    lines = [f"[{entity}]", f"\tkey = {key}"]
    lines += [f'\tcaps {what} = "{cap}"' for what, cap in (caps or {}).items()]
    return "\n".join(lines) + "\n"


def _mon_keyring(cephx: bool) -> str:
    # The mon insists on a mon. key at mkfs even with auth none; writing it here saves a
    # ceph-authtool run. With cephx the daemons' and the admin's keys go in too: the mon
    # imports them at mkfs, and every process finds its own in this one file.
    text = keyring_entry("mon.", new_key(), {"mon": "allow *"})
    if cephx:
        everything = {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"}
        text += keyring_entry("client.admin", new_key(), everything)
        mgr = {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"}
        text += keyring_entry("mgr.x", new_key(), mgr)
    return text


def asok_command(path: str | os.PathLike[str], prefix: str, timeout: float = 5.0) -> Any:
    """Run an admin-socket command on a daemon (what `ceph daemon X prefix` does), parse JSON."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(path))
        s.sendall(json.dumps({"prefix": prefix, "format": "json"}).encode() + b"\0")
        header = b""
        while len(header) < 4:
            chunk = s.recv(4 - len(header))
            if not chunk:
                raise ConnectionError("admin socket closed")
            header += chunk
        (length,) = struct.unpack(">I", header)
        body = bytearray()
        while len(body) < length:
            chunk = s.recv(length - len(body))
            if not chunk:
                raise ConnectionError("admin socket closed")
            body += chunk
    return json.loads(body) if body else None


class CephCluster:
    """One mon and one OSD on 127.0.0.1 under a temporary directory. See the module docstring."""

    def __init__(
        self,
        *,
        parent_dir: str | os.PathLike[str] | None = None,
        osd_bytes: int = 2 * GiB,
        start_timeout: float = 60.0,
        extra_conf: dict[str, str] | None = None,
        mgr: bool = True,
        cephx: bool = False,
    ) -> None:
        self.parent_dir = parent_dir
        self.mgr = mgr
        #: Authentication on (for tests of users and their caps); off, anyone may do anything.
        self.cephx = cephx
        self.osd_bytes = osd_bytes
        self.start_timeout = start_timeout
        #: Appended to [global]; for a test that needs one setting changed.
        self.extra_conf = dict(extra_conf or {})
        self.dir: Path | None = None
        self.fsid = ""
        self.mon_addrs = ""
        self.osd_id = 0
        self._osd_uuid = ""
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        #: Seconds taken by the last start() and stop() (for the docs and the bench).
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ paths

    def _need_dir(self) -> Path:
        if self.dir is None:
            raise CephClusterError("the cluster is not started")
        return self.dir

    @property
    def conf_path(self) -> Path:
        return self._need_dir() / "ceph.conf"

    @property
    def log_dir(self) -> Path:
        return self._need_dir() / "log"

    def _asok(self, name: str) -> Path:
        return self._need_dir() / "run" / f"{name}.asok"

    # ------------------------------------------------------------------ start / stop

    def start(self) -> CephCluster:
        """Make the config, the mon and the OSD; return once the OSD is up. Cleans up on failure."""
        if self.dir is not None:
            raise CephClusterError("already started")
        missing = missing_binaries()
        if missing:
            raise CephClusterError(f"Ceph binaries not installed: {', '.join(missing)}")
        t0 = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix="bvceph-", dir=self.parent_dir))
        atexit.register(self.stop)
        try:
            self._bootstrap(time.monotonic() + self.start_timeout)
        except BaseException as e:
            tails = self.log_tails()
            self.stop()
            if isinstance(e, CephClusterError | subprocess.TimeoutExpired | OSError):
                raise CephClusterError(f"Ceph did not start: {e}\n{tails}") from e
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def _bootstrap(self, deadline: float) -> None:
        d = self._need_dir()
        t0 = time.monotonic()
        for sub in ("mon/ceph-a", "osd/ceph-0", "mgr/ceph-x", "run", "log"):
            (d / sub).mkdir(parents=True)
        self.fsid = str(uuid.uuid4())
        # The mon's two ports are picked free here; the small race with another process grabbing
        # one before the mon binds shows up as a failed start (the caller may retry).
        v2, v1 = _free_port(), _free_port()
        self.mon_addrs = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
        self.conf_path.write_text(self._conf_text())
        (d / "keyring").write_text(_mon_keyring(self.cephx))
        conf = ["-c", str(self.conf_path)]
        monmap = str(d / "monmap")
        self._run(
            ["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", self.mon_addrs, monmap], deadline
        )
        self._run(
            ["ceph-mon", *conf, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", str(d / "keyring")],
            deadline,
        )
        self._spawn("mon.a", ["ceph-mon", *conf, "-i", "a", "-f"])
        if self.mgr:  # not waited for: it becomes available while the OSD starts
            self._spawn("mgr.x", ["ceph-mgr", *conf, "-i", "x", "-f"])
        # `osd new` waits for the mon itself (connect timeout), so no separate poll is needed.
        self._osd_uuid = str(uuid.uuid4())
        wait = max(1.0, deadline - time.monotonic())
        if self.cephx:
            # The mon makes osd.N's auth entity with the OSD's usual caps from this secret;
            # a fresh cluster's first OSD is osd.0, whose key goes in the shared keyring.
            key = new_key()
            secret = d / "osd-secret.json"
            secret.write_text(json.dumps({"cephx_secret": key}))
            out = self.ceph("osd", "new", self._osd_uuid, "-i", str(secret), timeout=wait)
            with open(d / "keyring", "a") as f:
                f.write(keyring_entry(f"osd.{int(out.strip())}", key))
        else:
            out = self.ceph("osd", "new", self._osd_uuid, timeout=wait)
        self.osd_id = int(out.strip())
        t1 = time.monotonic()
        self._run(
            ["ceph-osd", *conf, "-i", str(self.osd_id), "--mkfs", "--osd-uuid", self._osd_uuid], deadline
        )
        t2 = time.monotonic()
        self._start_osd_process(deadline)
        self.timings.update(mon=t1 - t0, osd_mkfs=t2 - t1, osd_up=time.monotonic() - t2)

    def _conf_text(self) -> str:
        d = self._need_dir()
        glob = {
            "fsid": self.fsid,
            "mon_host": self.mon_addrs,
            "public_addr": "127.0.0.1",
            "cluster_addr": "127.0.0.1",
            "ms_bind_ipv6": "false",
            "auth_cluster_required": "cephx" if self.cephx else "none",
            "auth_service_required": "cephx" if self.cephx else "none",
            "auth_client_required": "cephx" if self.cephx else "none",
            "keyring": f"{d}/keyring",
            "run_dir": f"{d}/run",
            "admin_socket": f"{d}/run/$name.asok",
            "log_file": f"{d}/log/$name.log",
            "pid_file": f"{d}/run/$name.pid",
            "mon_data": f"{d}/mon/$cluster-$id",
            "mgr_data": f"{d}/mgr/$cluster-$id",
            # Statistics (pool usage, quotas) within a second or two, not every few seconds.
            "mgr_stats_period": "1",
            "mgr_tick_period": "1",
            "osd_pg_stat_report_interval_max": "1",
            "osd_data": f"{d}/osd/$cluster-$id",
            # One OSD: a replica count of one, no warnings about it, no crush host level.
            "osd_pool_default_size": "1",
            "osd_pool_default_min_size": "1",
            "osd_pool_default_pg_num": "8",
            "osd_pool_default_pgp_num": "8",
            "osd_pool_default_pg_autoscale_mode": "off",
            "osd_crush_chooseleaf_type": "0",
            "mon_allow_pool_size_one": "true",
            "mon_allow_pool_delete": "true",
            "mon_warn_on_pool_no_redundancy": "false",
            "mon_warn_on_insecure_global_id_reclaim_allowed": "false",
            "mon_data_avail_warn": "1",
            "mon_data_avail_crit": "0",
            # Never mark the only OSD out (its data would have nowhere to go).
            "mon_osd_down_out_interval": "0",
            "mon_warn_on_osd_down_out_interval_zero": "false",
            # Clone v2 (a cloned snapshot needs no protect and goes to the trash when removed)
            # needs mimic clients; saying so at mkfs saves a command.
            "mon_osd_initial_require_min_compat_client": "mimic",
            # Map changes (pool create, blocklist, OSD up) commit in ~0.1 s instead of ~1 s.
            "paxos_propose_interval": "0.1",
            "paxos_min_wait": "0.01",
            "mon_tick_interval": "1",
            # A stopped OSD tells the mon at once; one killed or frozen is marked down after
            # 30 s instead of 15 minutes (longer than any test freezes it).
            "osd_fast_shutdown_notify_mon": "true",
            "osd_beacon_report_interval": "5",
            "mon_osd_report_timeout": "30",
            "osd_mon_report_interval": "1",
            # Images made by the CLI and by librbd alike: layering, exclusive-lock, object-map,
            # fast-diff, deep-flatten (1 + 4 + 8 + 16 + 32).
            "rbd_default_features": "61",
            "rbd_default_clone_format": "2",
            # No client op timeouts here: the service sets its own.
            **self.extra_conf,
        }
        osd = {
            "osd_objectstore": "bluestore",
            "bluestore_block_path": f"{d}/osd/$cluster-$id/block.file",
            "bluestore_block_create": "true",
            "bluestore_block_size": str(self.osd_bytes),
            "bluestore_fsck_on_mkfs": "false",
            "bluestore_fsck_on_mount": "false",
            # Small, fixed memory use: this OSD shares a small CI box with the tests.
            "bluestore_cache_autotune": "false",
            "bluestore_cache_size": str(128 << 20),
            "osd_memory_target": str(896 << 20),
            "osd_op_num_shards": "1",
            "osd_op_num_threads_per_shard": "2",
        }
        client = {
            # Per process, or a second client collides on client.admin.asok.
            "admin_socket": f"{d}/run/$name.$pid.asok",
            "log_file": f"{d}/log/$name.$pid.log",
        }
        lines: list[str] = []
        for section, values in (("global", glob), ("osd", osd), ("client", client)):
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {v}" for k, v in values.items())
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.out", "ab")  # noqa: SIM115 - the child owns it now
        # setpriv --pdeathsig: if the test process dies (kill -9), the daemon is killed too. Only
        # from the main thread: the signal follows the *thread* that forked, and a pool thread
        # may exit long before the cluster should.
        prefix: list[str] = []
        if threading.current_thread() is threading.main_thread() and shutil.which("setpriv"):
            prefix = ["setpriv", "--pdeathsig", "KILL", "--"]
        try:
            proc = subprocess.Popen(
                prefix + argv,
                cwd=self._need_dir(),  # a core dump, if any, goes with the directory
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        with self._lock:
            self._procs[name] = proc
        with open(self._need_dir() / "pids", "a") as f:
            f.write(f"{name} {proc.pid}\n")

    def _start_osd_process(self, deadline: float) -> None:
        name = f"osd.{self.osd_id}"
        self._spawn(name, ["ceph-osd", "-c", str(self.conf_path), "-i", str(self.osd_id), "-f"])
        # "active" means the OSD has seen itself up in an OSD map the mon published.
        self._wait(lambda: self._daemon_state(name) == "active", deadline, f"{name} to be up")

    def _daemon_state(self, name: str) -> str:
        proc = self._procs.get(name)
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise CephClusterError(f"{name} exited (status {code})")
        try:
            status = asok_command(self._asok(name), "mon_status" if name.startswith("mon") else "status")
        except (OSError, ValueError):
            return "starting"
        return str(status.get("state", ""))

    def _wait(self, ready: Any, deadline: float, what: str) -> None:
        while not ready():
            if time.monotonic() > deadline:
                raise CephClusterError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def stop(self, grace: float = 5.0) -> None:
        """End the daemons started here (TERM, then KILL after `grace`), remove the directory.

        Safe to call twice, after a failed start, and from atexit.
        """
        t0 = time.monotonic()
        with self._lock:
            procs = dict(self._procs)
            self._procs.clear()
        # OSDs first: a stopping OSD tells the mon it is going down and waits for the answer.
        for name in sorted(procs, key=lambda n: n.startswith("mon.")):
            self._end(name, procs[name], grace)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        atexit.unregister(self.stop)
        self.timings["stop"] = time.monotonic() - t0

    @staticmethod
    def _signal(name: str, proc: subprocess.Popen[bytes], sig: int) -> None:
        """Signal our child only while it still is what we started (the PID was not reused)."""
        if proc.poll() is not None:
            return
        daemon = "ceph-" + name.split(".")[0]
        try:
            comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
        except OSError:
            return
        # A child still in setpriv has not exec'd the daemon yet; both are ours.
        if comm in (daemon, "setpriv"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    def _stop_daemon(self, name: str, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
        with self._lock:
            proc = self._procs.pop(name, None)
        if proc is None:
            raise CephClusterError(f"{name} is not running")
        self._end(name, proc, grace, sig)

    def _end(self, name: str, proc: subprocess.Popen[bytes], grace: float, sig: int = signal.SIGTERM) -> None:
        self._signal(name, proc, sig)
        self._signal(name, proc, signal.SIGCONT)  # a frozen daemon must see the TERM
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal(name, proc, signal.SIGCONT)
            self._signal(name, proc, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> CephCluster:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ failures

    def stop_osd(self, *, kill: bool = False) -> None:
        """Take the only OSD away: I/O to every pool stalls until start_osd()."""
        self._stop_daemon(f"osd.{self.osd_id}", sig=signal.SIGKILL if kill else signal.SIGTERM)

    def freeze_osd(self) -> None:
        """SIGSTOP the OSD: connections stay open but nothing answers (a hung node)."""
        self._signal_running(f"osd.{self.osd_id}", signal.SIGSTOP)

    def thaw_osd(self, timeout: float = 30.0) -> None:
        """SIGCONT the OSD; return once the mon sees it up (it reboots if marked down)."""
        self._signal_running(f"osd.{self.osd_id}", signal.SIGCONT)
        deadline = time.monotonic() + timeout
        name = f"osd.{self.osd_id}"

        def up() -> bool:
            if self._daemon_state(name) != "active":
                return False
            osds = self.ceph_json("osd", "dump", timeout=max(1.0, deadline - time.monotonic()))["osds"]
            return any(o["osd"] == self.osd_id and o["up"] == 1 for o in osds)

        self._wait(up, deadline, f"{name} to be up")

    def _signal_running(self, name: str, sig: int) -> None:
        proc = self._procs.get(name)
        if proc is None:
            raise CephClusterError(f"{name} is not running")
        self._signal(name, proc, sig)

    def start_osd(self, timeout: float = 30.0) -> None:
        """Start the OSD again on its existing store; return once it is up."""
        if f"osd.{self.osd_id}" in self._procs:
            raise CephClusterError("the OSD is running")
        self._start_osd_process(time.monotonic() + timeout)

    def restart_mon(self, timeout: float = 30.0) -> None:
        """Stop and start the mon (same store, same ports); return once it leads again."""
        self.stop_mon()
        self.start_mon(timeout)

    def stop_mon(self) -> None:
        """Take the only mon away: nobody can connect, and mon commands wait, until start_mon()."""
        self._stop_daemon("mon.a")

    def start_mon(self, timeout: float = 30.0) -> None:
        """Start the mon again on its store and ports; return once it leads."""
        if "mon.a" in self._procs:
            raise CephClusterError("the mon is running")
        self._spawn("mon.a", ["ceph-mon", "-c", str(self.conf_path), "-i", "a", "-f"])
        self._wait(
            lambda: self._daemon_state("mon.a") == "leader", time.monotonic() + timeout, "mon.a to lead"
        )

    # ------------------------------------------------------------------ commands

    def _run(self, argv: list[str], deadline: float | None = None, timeout: float = 60.0) -> str:
        if deadline is not None:
            timeout = max(1.0, deadline - time.monotonic())
        try:
            r = subprocess.run(
                argv, cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            raise CephClusterError(f"{' '.join(argv[:4])} timed out after {timeout:.0f} s") from e
        if r.returncode != 0:
            raise CephClusterError(
                f"{' '.join(argv)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}"
            )
        return r.stdout

    def ceph(self, *args: str, timeout: float = 30.0) -> str:
        """Run the `ceph` CLI against this cluster; its stdout (fails on a non-zero exit)."""
        return self._run(
            ["ceph", "-c", str(self.conf_path), "--connect-timeout", str(int(timeout)), *args],
            timeout=timeout + 5,
        )

    def ceph_json(self, *args: str, timeout: float = 30.0) -> Any:
        return json.loads(self.ceph(*args, "--format", "json", timeout=timeout))

    def rbd(self, *args: str, timeout: float = 30.0) -> str:
        """Run the `rbd` CLI against this cluster."""
        return self._run(["rbd", "-c", str(self.conf_path), *args], timeout=timeout)

    def create_pool(self, name: str, pg_num: int = 8, *, rbd: bool = True) -> None:
        """Create a replicated pool; with rbd=True also `rbd pool init` it (waits for its PGs)."""
        self.ceph("osd", "pool", "create", name, str(pg_num), str(pg_num))
        if rbd:
            self.rbd("pool", "init", name)

    def delete_pool(self, name: str) -> None:
        self.ceph("osd", "pool", "delete", name, name, "--yes-i-really-really-mean-it")

    def add_user(self, user: str, caps: dict[str, str], *, wrong_key: bool = False) -> None:
        """A cephx user (`client.USER`) with `caps` ({"mon": "profile rbd", ...}), its key in
        the cluster's keyring file, so the config finds it (`--ceph-user USER`). With
        `wrong_key` the keyring holds another key than the cluster's."""
        args = [x for what, cap in caps.items() for x in (what, cap)]
        key = self.ceph("auth", "get-or-create-key", f"client.{user}", *args).strip()
        with open(self._need_dir() / "keyring", "a") as f:
            f.write(keyring_entry(f"client.{user}", new_key() if wrong_key else key))

    def wait_for_stats(self, timeout: float = 60.0) -> None:
        """Wait until the mgr reports PG statistics (usage figures and quotas work then)."""
        if not self.mgr:
            raise CephClusterError("this cluster runs no mgr: it has no statistics")

        def reported() -> bool:
            try:
                return int(self.ceph_json("df", timeout=5)["stats"]["total_bytes"]) > 0
            except (CephClusterError, KeyError, ValueError):
                return False

        self._wait(reported, time.monotonic() + timeout, "the mgr's statistics")

    def set_pool_quota(self, name: str, max_bytes: int) -> None:
        """Set (0 clears) the pool's byte quota. The mon enforces it from the PG statistics
        the mgr reports, a second or two behind the writes."""
        self.ceph("osd", "pool", "set-quota", name, "max_bytes", str(max_bytes))

    def set_full_ratio(self, ratio: float) -> None:
        """Make the OSD count as full above `ratio` of its space (0.95 is the default)."""
        self.ceph("osd", "set-full-ratio", str(ratio))

    def set_osd_full(self, full: bool, timeout: float = 30.0) -> None:
        """Make the OSD (and so every pool) full, or not, as a full disk would; return once
        the OSD map says so. Bluestore uses some space for itself, so tiny ratios suffice."""
        ratios = (("nearfull", 0.0001), ("backfillfull", 0.0002), ("full", 0.0003))
        if not full:
            ratios = (("full", 0.95), ("backfillfull", 0.90), ("nearfull", 0.85))
        for name, ratio in ratios:  # in this order, or the mon complains they are out of order
            self.ceph("osd", f"set-{name}-ratio", str(ratio))

        def settled() -> bool:
            dump = self.ceph_json("osd", "dump")
            osd_full = any("full" in o["state"] for o in dump["osds"])
            pools_full = [("full" in p["flags_names"].split(",")) for p in dump["pools"]]
            return osd_full == full and all(f == full for f in pools_full)

        self._wait(settled, time.monotonic() + timeout, f"the OSD to be {'full' if full else 'not full'}")

    def blocklist_ls(self) -> list[str]:
        """Blocklisted client addresses (`ceph osd blocklist ls`)."""
        out = self.ceph("osd", "blocklist", "ls", "--format", "json").strip()
        # Pacific prints two JSON lists back to back (addresses, then ranges): take the first.
        entries, _ = json.JSONDecoder().raw_decode(out)
        return [str(e["addr"]) for e in entries]

    def blocklist_clear(self) -> None:
        self.ceph("osd", "blocklist", "clear")

    # ------------------------------------------------------------------ diagnostics

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}

    def log_tails(self, lines: int = 20) -> str:
        """The last lines of each daemon log (for a failure message)."""
        if self.dir is None or not self.log_dir.exists():
            return ""
        parts = []
        for path in sorted(self.log_dir.iterdir()):
            if not path.name.startswith(("mon.", "osd.")):
                continue
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


@contextlib.contextmanager
def running_cluster(**kwargs: Any) -> Iterator[CephCluster]:
    cluster = CephCluster(**kwargs)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def main() -> None:
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    with running_cluster() as cluster:
        print(f"up in {cluster.timings['start']:.1f} s; CEPH_CONF={cluster.conf_path}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    print(f"stopped in {cluster.timings['stop']:.1f} s")


if __name__ == "__main__":
    main()
