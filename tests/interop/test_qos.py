"""Storage I/O control with fio (`--ioengine=nbd`) on several volumes at once: the issue's
scenarios, run by tools/bench/qos.py's code with shorter runs. Rates are what fio itself
measured (its per-second IOPS log), latency is fio's completion latency: the server's own
counters are not judged. The criteria are the issue's (+-5% on shares and the nested split,
every limited window <= 1020, reservation >= 990 on average)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blockvirt.testing import BlockvirtServer
from tools.bench import qos as qb

from .conftest import need

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[qb.Bench]:
    need("fio")
    tmp = tmp_path_factory.mktemp("qos")
    with BlockvirtServer(tmp / "data") as server:
        yield qb.Bench(server, Path(tmp), runtime=8.0, warmup=2, fill=False)


@pytest.mark.parametrize(
    "scenario",
    ["shares-qd16", "shares-qd4", "reservation", "limit", "nested", "mixed", "retune"],
)
def test_qos_scenario(bench: qb.Bench, scenario: str) -> None:
    if scenario.startswith("shares-qd"):
        res = qb.shares(bench, int(scenario.removeprefix("shares-qd")))
    elif scenario == "retune":
        bench.runtime = 16.0
        try:
            res = qb.retune(bench)
        finally:
            bench.runtime = 8.0
    else:
        res = {"reservation": qb.reservation, "limit": qb.limit, "nested": qb.nested, "mixed": qb.mixed}[
            scenario
        ](bench)
    failed = [what for what, ok in res.checks if not ok]
    assert not failed, f"{scenario}: {failed} (windows: {res.data.get('windows')})"


def test_latency_target_keeps_the_queue_in_the_scheduler(tmp_path: Path) -> None:
    """SIOC/PARDA: a single-queue device at 2000 IOPS (fault injection), shares 1:2:4 at QD32
    and a QD1 probe: with a 10 ms target, the probe's p95 as fio measures it <= 15 ms and
    under half the uncontrolled one, throughput >= 95% of uncontrolled, and the shares hold
    (an uncontrolled device queue serves first come first served)."""
    need("fio")
    with BlockvirtServer(tmp_path / "data", extra_args=("--fault-injection",)) as server:
        # 17 s measured per mode: with 7 s, one CI run's controlled throughput dipped to 93 %
        # of the uncontrolled one (1846 against 1980 IOPS) where quiet runs give 96.4 %.
        res = qb.latency(qb.Bench(server, tmp_path, runtime=20.0, warmup=3))
    failed = [what for what, ok in res.checks if not ok]
    assert not failed, failed
