"""Liveness (storage/backends/rbd/members.py): when a node presumes a peer dead, judged on its
own clock and only on time it could see the peer. Pure: time is an argument."""

from __future__ import annotations

import pytest

from tests.needs import strict

try:  # the rbd backend package imports Ceph's bindings
    from blockvirt.storage.backends.rbd.members import Liveness
except ImportError as e:  # pragma: no cover - depends on the machine
    why = f"Ceph's Python bindings are missing: {e}"
    if strict():
        pytest.fail(f"{why} (BLOCKVIRT_REQUIRE_INTEROP=1)", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def watch(live: Liveness, beats: dict[str, int], now: float) -> None:
    """One successful read of the member list at `now`."""
    live.looked_at(now)
    for name, beat in beats.items():
        live.observe(name, beat, now)


def test_a_peer_whose_heartbeat_stops_is_presumed_dead_after_dead_after() -> None:
    live = Liveness(dead_after=5.0)
    for t in range(10):  # B beats every second, then stops at t=9
        watch(live, {"b": t}, float(t))
    for t in range(10, 14):
        watch(live, {"b": 9}, float(t))
    assert live.alive("b", 13.9)
    watch(live, {"b": 9}, 14.0)
    assert live.alive("b", 13.99) and not live.alive("b", 14.0)
    assert live.age("b", 14.0) == 5.0


def test_a_node_that_could_not_look_presumes_nobody_dead() -> None:
    """The zombie's view: frozen (SIGSTOP) for 8 s, its last look saw B alive. On resume, until
    it has read the list again, it must not believe B dead (it would break B's lock, fencing
    a healthy node, for a client that reached it meanwhile)."""
    live = Liveness(dead_after=5.0)
    for t in range(5):
        watch(live, {"b": t}, float(t))
    resumed = 4.0 + 8.0
    assert live.blind(resumed)
    assert live.alive("b", resumed)  # before the fix: age 8 s > 5 s, "dead"
    # Its first read after the freeze: B's counter moved meanwhile (it was alive all along).
    watch(live, {"b": 12}, resumed)
    assert live.alive("b", resumed) and live.age("b", resumed) == 0.0


def test_after_a_blind_spell_a_silent_peer_gets_a_full_dead_after_again() -> None:
    """B died while this node could not see (Ceph stalled for it): B is presumed dead only
    DEAD_AFTER after this node can see again, never at once on stale times."""
    live = Liveness(dead_after=5.0)
    watch(live, {"b": 1}, 0.0)
    watch(live, {"b": 1}, 4.0)  # 4 s of silence seen
    watch(live, {"b": 1}, 10.0)  # then nothing read for 6 s: a blind spell
    assert live.alive("b", 10.0) and live.alive("b", 14.9)
    watch(live, {"b": 1}, 12.0)
    watch(live, {"b": 1}, 14.0)
    assert not live.alive("b", 15.0)


def test_short_gaps_between_looks_are_no_blind_spell() -> None:
    live = Liveness(dead_after=5.0)
    watch(live, {"b": 1}, 0.0)
    for t in (2.0, 4.0, 6.0):  # every 2 s (< dead_after / 2): still judging
        watch(live, {"b": 1}, t)
    assert not live.alive("b", 6.0)


def test_an_owner_never_seen_counts_as_seen_when_this_node_started_looking() -> None:
    """A volume's record may name a node this node has not read a heartbeat of yet (the
    catalog came by notify, the member list comes every second): not dead at once."""
    live = Liveness(dead_after=5.0)
    assert live.alive("a", 0.0)  # never looked: blind
    watch(live, {}, 0.0)
    assert live.age("a", 1.0) is None
    assert live.alive("a", 1.0)
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        watch(live, {}, t)
    assert not live.alive("a", 5.0)
