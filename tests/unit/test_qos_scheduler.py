"""The QoS scheduler in simulated time: the issue's acceptance scenarios (shares, reservation,
limit, nested groups, mixed sizes, live retune, late joiners, over-reservation) checked
exactly, with no event loop and no clock. The same scenarios run for real, with fio against a
live server, in tools/bench/qos.py and tests/interop/test_qos.py.

Clients are closed loops (fio-like): `qd` requests outstanding; a dispatched request
completes after `service` seconds plus `rtt` (the reply going back and the next request
coming in), and the client sends its next one. The dispatcher wakes on a 1 ms tick, as an
asyncio timer would.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from blockvirt.qos.cost import CostModel
from blockvirt.qos.scheduler import IMMEDIATE, RESERVATION, WEIGHT, Pacer, Params, Scheduler

TICK = 0.001


@dataclass
class Client:
    name: str
    qd: int = 16
    nbytes: int = 4096
    service: float = 0.0002
    rtt: float = 0.0003
    rate: float = 0.0  # open loop at this rate (requests/s) instead of a closed loop
    start: float = 0.0
    stop: float = math.inf
    done: list[float] = field(default_factory=list)  # completion times
    cost_done: list[tuple[float, float]] = field(default_factory=list)


class Sim:
    def __init__(self, sched: Scheduler, cost: CostModel | None = None) -> None:
        self.s = sched
        self.cost = cost or CostModel()
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = itertools.count()
        self.clients: dict[str, Client] = {}
        self.wake_at = math.inf
        self.now = 0.0
        self.at: list[tuple[float, Callable[[], None]]] = []

    def add(self, c: Client) -> None:
        self.clients[c.name] = c
        if c.rate:
            self._push(c.start, "open", c)
        else:
            for _ in range(c.qd):
                self._push(c.start, "send", c)

    def call_at(self, t: float, fn: Callable[[], None]) -> None:
        self._push(t, "call", fn)

    def _push(self, t: float, kind: str, data: object) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, data))

    def _send(self, c: Client) -> None:
        if self.now >= c.stop:
            return
        leaf = self.s.leaves[c.name]
        req = self.s.submit(leaf, self.cost.cost(c.nbytes), c.nbytes, self.now, c)
        if req is None:
            self._push(self.now + c.service, "done", c)
        self._arm()

    def _arm(self) -> None:
        t = self.s.next_time(self.now)
        if t is None:
            return
        t = math.ceil(max(t, self.now) / TICK + 1e-9) * TICK  # timer granularity
        if t < self.wake_at:
            self.wake_at = t
            self._push(t, "wake", None)

    def run(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            t, _, kind, data = heapq.heappop(self.events)
            self.now = t
            if kind == "send":
                assert isinstance(data, Client)
                self._send(data)
            elif kind == "open":
                assert isinstance(data, Client)
                self._send(data)
                self._push(t + 1 / data.rate, "open", data)
            elif kind == "done":
                assert isinstance(data, Client)
                data.done.append(t)
                data.cost_done.append((t, self.cost.cost(data.nbytes)))
                if not data.rate:
                    self._push(t + data.rtt, "send", data)
            elif kind == "wake":
                if t != self.wake_at:
                    continue  # superseded
                self.wake_at = math.inf
                for req in self.s.dispatch(t):
                    self._push(t + req.token.service, "done", req.token)
                self._arm()
            elif kind == "call":
                data()  # type: ignore[operator]
                self._arm()

    def rate(self, name: str, t0: float, t1: float) -> float:
        return sum(1 for t in self.clients[name].done if t0 <= t < t1) / (t1 - t0)

    def cost_rate(self, name: str, t0: float, t1: float) -> float:
        return sum(c for t, c in self.clients[name].cost_done if t0 <= t < t1) / (t1 - t0)

    def windows(self, name: str, t0: float, t1: float) -> list[int]:
        return [sum(1 for t in self.clients[name].done if w <= t < w + 1) for w in range(int(t0), int(t1))]


def near(value: float, target: float, tol: float) -> bool:
    return abs(value - target) <= tol * target


# ---------------------------------------------------------------------------- pacer


def test_pacer_burst_catch_up_and_no_idle_credit() -> None:
    p = Pacer(1000.0, burst=0.02, catch_up=0.02)
    now = 10.0
    n = 0
    while p.ready(now):  # from idle: one request plus a 20 ms burst
        p.take(1, now)
        n += 1
    assert n == 21
    # Late by 10 ms: the lateness is made up...
    p.tat = now - 0.01
    p.take(1, now)
    assert p.tat == pytest.approx(now - 0.01 + 0.001)
    # ...idle time is not.
    p.tat = now - 5.0
    p.take(1, now)
    assert p.tat == pytest.approx(now + 0.001)


# ---------------------------------------------------------------------------- scenarios


@pytest.mark.parametrize(("qd", "rtt"), [(16, 0.0003), (4, 0.0003), (4, 0.0006)])
def test_shares_1_2_4(qd: int, rtt: float) -> None:
    s = Scheduler(4000)
    sim = Sim(s)
    for name, w in (("d1", 1000), ("d2", 2000), ("d3", 4000)):
        s.leaf(name, Params(shares=w))
        sim.add(Client(name, qd=qd, rtt=rtt))
    sim.run(20)
    rates = {n: sim.rate(n, 2, 19) for n in ("d1", "d2", "d3")}
    for name, target in (("d1", 571.4), ("d2", 1142.9), ("d3", 2285.7)):
        assert near(rates[name], target, 0.05), rates
    assert sum(rates.values()) >= 0.95 * 4000
    for name, target in (("d1", 571.4), ("d2", 1142.9), ("d3", 2285.7)):
        wins = sim.windows(name, 2, 19)
        assert sum(near(w, target, 0.10) for w in wins) >= 0.9 * len(wins), (name, wins)


def test_reservation_beside_saturating_disks() -> None:
    s = Scheduler(4000)
    sim = Sim(s)
    s.leaf("d1", Params(shares=1, reservation=1000))
    s.leaf("d2", Params(shares=1000))
    s.leaf("d3", Params(shares=1000))
    for n in ("d1", "d2", "d3"):
        sim.add(Client(n))
    sim.run(20)
    assert sim.rate("d1", 2, 19) >= 990
    wins = sim.windows("d1", 2, 19)
    assert sum(w >= 950 for w in wins) >= 0.95 * len(wins), wins
    d2, d3 = sim.rate("d2", 2, 19), sim.rate("d3", 2, 19)
    assert near(d2, d3, 0.05) and near(d2 + d3, 3000, 0.05), (d2, d3)
    assert s.leaves["d1"].served[RESERVATION] > 0.9 * sum(s.leaves["d1"].served.values())


def test_reservation_holds_when_competition_arrives() -> None:
    """A reserved disk that ran alone (served far above its reservation by shares) keeps its
    reservation the moment others arrive: shares service does not push its reservation
    schedule into the future."""
    s = Scheduler(4000)
    sim = Sim(s)
    s.leaf("r", Params(shares=10, reservation=1000))
    sim.add(Client("r"))
    for n in ("x", "y"):
        s.leaf(n, Params(shares=1000))
        sim.add(Client(n, start=5.0))
    sim.run(8)
    assert near(sim.rate("r", 1, 5), 4000, 0.05)
    assert sim.windows("r", 5, 6)[0] >= 950


def test_late_joiner_beside_a_reserved_disk() -> None:
    """Reservation dispatches do not move the shares' virtual time: a newcomer starts level
    with the disks served by shares, not behind the reserved one's (far ahead) tags."""
    s = Scheduler(4000)
    sim = Sim(s)
    s.leaf("r", Params(shares=1, reservation=1000))
    s.leaf("a", Params(shares=1000))
    s.leaf("b", Params(shares=1000))
    sim.add(Client("r"))
    sim.add(Client("a"))
    sim.add(Client("b", start=4.0))
    sim.run(8)
    assert near(sim.windows("b", 4, 5)[0], 1500, 0.10)
    assert near(sim.rate("a", 5, 8), 1500, 0.05)


def test_reservation_is_a_floor_not_an_add_on() -> None:
    s = Scheduler(4000)
    sim = Sim(s)
    s.leaf("big", Params(shares=1000, reservation=500))  # its share (2000) is above it
    s.leaf("other", Params(shares=1000))
    sim.add(Client("big"))
    sim.add(Client("other"))
    sim.run(10)
    assert near(sim.rate("big", 2, 9), 2000, 0.05) and near(sim.rate("other", 2, 9), 2000, 0.05)


def test_over_reservation_splits_in_proportion() -> None:
    s = Scheduler(4000)
    sim = Sim(s)
    s.leaf("r3", Params(shares=1, reservation=3000))
    s.leaf("r2", Params(shares=1, reservation=2000))
    sim.add(Client("r3"))
    sim.add(Client("r2"))
    sim.run(10)
    r3, r2 = sim.rate("r3", 2, 9), sim.rate("r2", 2, 9)
    assert near(r3 / r2, 1.5, 0.05) and r2 > 0 and r3 + r2 >= 0.95 * 4000


@pytest.mark.parametrize("competitors", [0, 2])
def test_limit_holds_every_window(competitors: int) -> None:
    s = Scheduler(4000)
    sim = Sim(s)
    s.leaf("lim", Params(limit=1000))
    sim.add(Client("lim"))
    for i in range(competitors):
        s.leaf(f"c{i}", Params())
        sim.add(Client(f"c{i}"))
    sim.run(20)
    wins = sim.windows("lim", 1, 19)
    assert max(wins) <= 1020, wins
    assert sim.windows("lim", 0, 1)[0] <= 1.10 * 1000
    assert sim.rate("lim", 1, 19) >= 970


def test_nested_groups_sioc_scenario() -> None:
    s = Scheduler(4000)
    sim = Sim(s)
    s.group("A", Params(shares=3500))
    s.group("B", Params(shares=1500))
    s.leaf("a1", Params(shares=1000), "A")
    s.leaf("a2", Params(shares=2500), "A")
    s.leaf("b1", Params(shares=500), "B")
    s.leaf("b2", Params(shares=1000, limit=1000), "B")
    for n in ("a1", "a2", "b2"):
        sim.add(Client(n))
    sim.add(Client("b1", rate=10))  # demands only 10 IOPS
    sim.run(30)
    rates = {n: sim.rate(n, 3, 29) for n in ("a1", "a2", "b1", "b2")}
    assert near(rates["a1"], 854, 0.05), rates
    assert near(rates["a2"], 2136, 0.05), rates
    assert near(rates["b2"], 1000, 0.05), rates
    assert near(rates["b1"], 10, 0.05), rates
    assert max(sim.windows("b2", 3, 29)) <= 1020


def test_limits_narrow_down_the_tree() -> None:
    s = Scheduler(0)  # no pool cap: only limits bind
    sim = Sim(s)
    s.group("A", Params(limit=1500))
    s.leaf("a1", Params(limit=3000), "A")  # the narrower parent wins
    s.leaf("a2", Params(), "A")
    sim.add(Client("a1"))
    sim.run(10)
    assert near(sim.rate("a1", 1, 9), 1500, 0.02)
    sim.add(Client("a2", start=10))
    sim.run(20)
    assert near(sim.rate("a1", 12, 19) + sim.rate("a2", 12, 19), 1500, 0.02)


def test_mixed_sizes_split_cost_units() -> None:
    cost = CostModel(6144)
    s = Scheduler(4000)
    sim = Sim(s, cost)
    for n in ("k1", "k2", "m1"):
        s.leaf(n, Params())
    sim.add(Client("k1"))
    sim.add(Client("k2"))
    sim.add(Client("m1", nbytes=1 << 20, qd=4, service=0.005))
    sim.run(30)
    units = {n: sim.cost_rate(n, 5, 29) for n in ("k1", "k2", "m1")}
    for n in units:
        assert near(units[n], 4000 / 3, 0.10), units
    # Counted in requests, the 1 MiB disk would have been served as often as the others:
    # its share in bytes would be 256 times theirs.
    assert sim.rate("m1", 5, 29) < sim.rate("k1", 5, 29) / 50


def test_live_retune_takes_effect_from_the_second_window() -> None:
    s = Scheduler(4000)
    sim = Sim(s)
    s.leaf("d1", Params(shares=1000, limit=1000))
    s.leaf("d2", Params(shares=1000))
    sim.add(Client("d1"))
    sim.add(Client("d2"))
    sim.call_at(10.0, lambda: s.leaf("d1", Params(shares=4000, limit=2000)))
    sim.run(20)
    assert near(sim.rate("d1", 2, 10), 1000, 0.05)
    # After: d1's share is 3200 but its limit 2000; d2 gets the rest.
    for w in sim.windows("d1", 11, 20):
        assert near(w, 2000, 0.05) and w <= 2040
    assert near(sim.rate("d2", 11, 20), 2000, 0.05)


def test_late_joiner_gets_its_share_at_once_and_no_banked_credit() -> None:
    s = Scheduler(4000)
    sim = Sim(s)
    for n in ("d1", "d2", "d3"):
        s.leaf(n, Params())
    sim.add(Client("d1"))
    sim.add(Client("d2"))
    sim.add(Client("d3", start=4.0))
    sim.run(10)
    first = sim.windows("d3", 4, 5)[0]
    assert near(first, 4000 / 3, 0.10), first
    assert near(sim.rate("d1", 5, 10), 4000 / 3, 0.10)


def test_on_off_client_does_not_hoard() -> None:
    s = Scheduler(4000)
    sim = Sim(s)
    for n in ("d1", "d2", "onoff"):
        s.leaf(n, Params())
    sim.add(Client("d1"))
    sim.add(Client("d2"))
    for k in range(5):  # on for 1 s, off for 1 s
        sim.add(Client(f"onoff{k}", start=2 * k, stop=2 * k + 1))
        s.leaves[f"onoff{k}"] = s.leaves["onoff"]
    sim.run(10)
    for k in range(5):
        wins = sim.windows(f"onoff{k}", 2 * k, 2 * k + 1)
        assert wins[0] <= 4000 / 3 + 0.1 * 4000, wins  # no more than its share plus 10%


def test_bps_limit() -> None:
    s = Scheduler(0)
    sim = Sim(s)
    s.leaf("b", Params(bps_limit=10 * 2**20))
    sim.add(Client("b", nbytes=1 << 20, qd=8, service=0.001))
    sim.run(10)
    assert near(sim.rate("b", 1, 9), 10, 0.03)


def test_unlimited_pool_admits_everything_at_once() -> None:
    s = Scheduler(0)
    leaf = s.leaf("v", Params(shares=1))
    for i in range(1000):
        assert s.submit(leaf, 1.0, 4096, i * 1e-6) is None
    assert leaf.served[IMMEDIATE] == 1000 and leaf.served[WEIGHT] == 0


def test_cancel_and_remove() -> None:
    s = Scheduler(1)  # one request per second
    leaf = s.leaf("v", Params())
    assert s.submit(leaf, 1.0, 0, 0.0) is None
    r1 = s.submit(leaf, 1.0, 0, 0.0)
    r2 = s.submit(leaf, 1.0, 0, 0.0)
    assert r1 is not None and r2 is not None and s.root.queued == 2
    assert s.cancel(r1) and not s.cancel(r1)
    assert s.root.queued == 1
    assert s.next_time(0.0) == pytest.approx(1.0 - 0.002)
    assert s.dispatch(0.5) == []
    assert s.dispatch(1.0) == [r2]
    assert s.next_time(1.0) is None
    r3 = s.submit(leaf, 1.0, 0, 1.0)
    assert s.remove_leaf("v") == [r3] and s.root.queued == 0


def test_moving_a_leaf_between_pools_keeps_its_queue() -> None:
    a, b = Scheduler(1), Scheduler(0)
    leaf = a.leaf("v", Params())
    a.submit(leaf, 1.0, 0, 0.0)
    req = a.submit(leaf, 1.0, 0, 0.0)
    assert req is not None
    moved = a.take_leaf("v")
    assert a.root.queued == 0
    b.adopt(moved)
    assert b.root.queued == 1 and b.dispatch(0.0) == [req]


# ---------------------------------------------------------------------------- latency control


def test_latency_window_converges_to_the_target_and_lifts_when_idle() -> None:
    from blockvirt.qos.latency import LatencyControl

    service = 0.0005  # a first-come-first-served device: latency = what is in it x service
    lc = LatencyControl(target=0.010)
    inflight = 96  # uncontrolled: everything the clients send is in the device
    for _ in range(40):
        for _ in range(100):
            lc.observe(inflight * service)
        window = lc.update(peak_inflight=inflight)
        inflight = int(min(96, window))
    assert 0.010 <= inflight * service <= 0.012, (lc.window, inflight)
    # Load drops: latency far below the target and the window not binding: it is lifted.
    for _ in range(10):
        for _ in range(50):
            lc.observe(2 * service)
        lc.update(peak_inflight=2)
    assert math.isinf(lc.window)


def test_latency_window_holds_requests_in_the_scheduler() -> None:
    s = Scheduler(0)
    s.window = 2
    leaf = s.leaf("v", Params())
    assert s.try_now(leaf, 1, 0, 0.0)
    s.started()
    assert s.try_now(leaf, 1, 0, 0.0)
    s.started()
    assert not s.try_now(leaf, 1, 0, 0.0)  # the backend is full
    req = s.enqueue(leaf, 1, 0, 0.0, counted=True)
    assert s.next_time(0.0) is None and s.dispatch(0.0) == []
    s.finished()
    assert s.dispatch(0.0) == [req] and s.inflight == 2


def test_a_leaf_moved_into_a_group_starts_level_with_its_siblings() -> None:
    """Tags are relative to the parent: one earned under the root means nothing in a group."""
    s = Scheduler(4000)
    sim = Sim(s)
    s.leaf("x", Params())
    s.leaf("y", Params())
    sim.add(Client("x", stop=3.0))  # x runs alone...
    sim.add(Client("y", start=3.0, stop=6.0))  # ...then y alone: y's tags end far ahead of x's
    sim.run(6.5)
    s.group("G", Params())
    s.leaf("x", Params(shares=1000), "G")
    s.leaf("y", Params(shares=2500), "G")
    sim.add(Client("x", start=7.0))
    sim.add(Client("y", start=7.0))
    sim.run(12)
    assert near(sim.rate("x", 8, 12), 4000 / 3.5, 0.05), sim.rate("x", 8, 12)
    assert near(sim.windows("y", 7, 8)[0], 4000 * 2.5 / 3.5, 0.10)  # at once, no catching up


# ---------------------------------------------------------------- calibration's cost model

from blockvirt.qos.calibrate import S0_MAX, S0_MIN, cost_model  # noqa: E402


@pytest.mark.parametrize(
    ("fixed_s", "per_byte_s", "s0"),
    [
        (100e-6, 1e-9, 100_000),  # an SSD: 100 us per request, 1 GB/s
        (8e-3, 1 / 150e6, 1_200_000),  # a disk: 8 ms seek, 150 MB/s
        (20e-6, 1 / 3e9, 60_000),  # NVMe
    ],
)
def test_cost_model_recovers_a_known_device(fixed_s: float, per_byte_s: float, s0: int) -> None:
    """A device whose request of n bytes takes fixed + n * per_byte: S0 = fixed / per_byte."""
    rate = lambda n: 1 / (fixed_s + n * per_byte_s)  # noqa: E731
    got = cost_model(rate(4096), rate(1 << 20))
    assert abs(got - s0) <= 0.01 * s0, got


def test_cost_model_clamps_only_at_the_edges() -> None:
    assert cost_model(1000.0, 1000.0) == S0_MAX  # size costs nothing: all per request
    assert cost_model(1000.0, 1001.0) == S0_MAX  # large faster than small: noise, same
    assert cost_model(1e6, 1e6 / 256) == S0_MIN  # all per byte, no fixed cost
    assert S0_MIN < cost_model(10_000.0, 900.0) < S0_MAX
