"""How patient the RBD backend is with its clusters (pure: importable without Ceph's bindings,
so the service can take the values from `blockvirt serve` flags)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RbdTuning:
    #: Reaching a cluster (at start, `pool create`, each retry) gives up after this long; mon
    #: commands (snapshots ids, quotas, usage) too.
    connect_timeout: float = 5.0
    #: A read, write or other OSD op without an answer fails (EIO) after this long. Long enough
    #: for a PG to peer after an OSD restart; short enough that a hung cluster does not hold
    #: requests for ever (tcmu-runner uses about 30 s too).
    op_timeout: float = 30.0
    #: An unreachable pool is tried again this often.
    retry_interval: float = 5.0
    #: Pool usage and volume allocation are looked at this often (cached for metrics).
    figures_interval: float = 10.0
    #: A stop waits at most this long for each pool's cluster (leaving the member list,
    #: freeing volumes, closing the client); after it, the node ends without (peers take its
    #: volumes over once they presume it dead). `serve --shutdown-deadline` sets it.
    stop_timeout: float = 10.0
    #: Data-path completions collected from an eventfd through librbd's C API, with no Python
    #: on Ceph's threads (about half the CPU per op); False uses python3-rbd's callbacks.
    native_aio: bool = True
