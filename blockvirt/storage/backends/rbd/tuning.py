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
    #: A stop or a `pool delete` waits at most this long for the pool's cluster to let go
    #: (leave the member list, free volumes, close the client). After it a stop ends
    #: without (peers take its volumes over once they presume it dead) and a delete lets
    #: it finish in the background. `serve --shutdown-deadline` sets it.
    let_go_timeout: float = 10.0
    #: Data-path completions collected from an eventfd through librbd's C API, with no Python
    #: on Ceph's threads (about half the CPU per op); False uses python3-rbd's callbacks.
    native_aio: bool = True
