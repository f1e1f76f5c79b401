"""Adaptive polling's policy (pure: time is an argument) and the selector around it."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from blockvirt.server.polling import PollingSelector, PollPolicy

W = 100e-6


@contextmanager
def _watching(
    offloaded: Callable[[], int] | None = None,
) -> Iterator[tuple[PollingSelector, socket.socket, socket.socket]]:
    """A polling selector watching `a` of a socket pair for reads; `b` sends to it."""
    a, b = socket.socketpair()
    with a, b:
        sel = PollingSelector(W) if offloaded is None else PollingSelector(W, offloaded=offloaded)
        sel.register(a, selectors.EVENT_READ, "a")
        try:
            yield sel, a, b
        finally:
            sel.close()


def test_an_idle_or_slow_server_never_spins() -> None:
    p = PollPolicy(W)
    assert p.spin_until(0.0, None) is None  # nothing seen yet
    p.waited(5e-3)  # requests 5 ms apart: a spin would not have caught the next one
    assert p.spin_until(1.0, None) is None
    assert p.spins == 0


def test_dense_traffic_spins_for_the_window_at_most() -> None:
    p = PollPolicy(W)
    p.waited(20e-6)
    assert p.spin_until(1.0, None) == 1.0 + W
    assert p.spin_until(1.0, 0.25) == 1.0 + W  # a timer due later
    assert p.spin_until(1.0, 30e-6) is None  # a timer due sooner: sleep until it
    assert p.spin_until(1.0, 0) is None  # callbacks ready: never wait
    assert p.spins == 2


def test_a_spin_that_finds_nothing_stops_spinning_until_traffic_is_dense_again() -> None:
    p = PollPolicy(W)
    p.waited(20e-6)
    assert p.spin_until(1.0, None) is not None
    p.missed()
    assert p.spin_until(2.0, 0.25) is None  # an idle server's timer ticks do not spin
    p.waited(10e-6)
    assert p.spin_until(3.0, None) is not None


def test_window_zero_is_off() -> None:
    p = PollPolicy(0.0)
    p.waited(0.0)
    assert p.spin_until(1.0, None) is None


def test_selector_finds_what_the_inner_one_finds() -> None:
    with _watching() as (sel, a, b):
        assert sel.select(0) == []
        sel.policy.waited(0.0)  # dense: the next wait spins first
        assert sel.select(0.001) == []  # spun, found nothing, then waited out the timeout
        assert not sel.policy.dense
        b.send(b"x")
        sel.policy.waited(0.0)
        ready = sel.select(None)
        assert [(k.data, ev) for k, ev in ready] == [("a", selectors.EVENT_READ)]
        assert sel.policy.dense and sel.policy.spins == 2
        assert sel.get_key(a).data == "a" and len(sel.get_map()) == 1
        sel.unregister(a)


def test_no_spin_while_other_threads_want_the_interpreter_back() -> None:
    # A thread doing a commit's fdatasync (or a Ceph completion) needs the interpreter lock
    # to start and to hand its result over; a spinning loop would starve it.
    p = PollPolicy(W)
    p.waited(20e-6)
    assert p.spin_until(1.0, None, offloaded=1) is None
    assert p.dense  # still dense: the next wait without threads in flight spins
    assert p.spin_until(1.0, None, offloaded=0) == 1.0 + W


def test_selector_asks_how_many_calls_are_offloaded() -> None:
    busy = [1]
    with _watching(lambda: busy[0]) as (sel, _a, _b):
        sel.policy.waited(0.0)
        assert sel.select(0.001) == []
        assert sel.policy.spins == 0 and sel.policy.dense  # slept instead of spinning
        busy[0] = 0
        assert sel.select(0.001) == []
        assert sel.policy.spins == 1


def test_a_long_wait_for_offloaded_work_keeps_the_clients_pace() -> None:
    # QD1 on a slow backend: the client's next request comes within the window, the Ceph op
    # or sync in between takes far longer. The long wait is the backend's, not the client's:
    # after it the loop must spin for the next request again.
    p = PollPolicy(W)
    p.waited(20e-6)  # the client's request
    p.waited(400e-6, offloaded=1)  # the op's completion
    assert p.dense
    assert p.spin_until(1.0, None, offloaded=0) == 1.0 + W
    p.waited(400e-6, offloaded=0)  # a long wait with nothing in flight: the clients slowed
    assert not p.dense


def test_selector_keeps_the_pace_across_a_wait_for_offloaded_work() -> None:
    # A real wait longer than the window: with work in flight it leaves the pace as it was,
    # with nothing in flight it ends it.
    busy = [1]
    peer: list[socket.socket] = []
    senders: list[threading.Timer] = []

    def offloaded() -> int:
        # select() asks this once, after reading its clock: the byte is sent 20 windows after
        # that, however late a loaded machine runs this thread (a sender started before the
        # call could have sent already, and the wait would not be long).
        sender = threading.Timer(20 * W, peer[0].send, (b"x",))
        senders.append(sender)
        sender.start()
        return busy[0]

    with _watching(offloaded) as (sel, a, b):
        peer.append(b)
        for in_flight, dense_after in ((1, True), (0, False)):
            busy[0] = in_flight
            sel.policy.waited(0.0)
            start = time.monotonic()
            assert sel.select(1.0)
            assert time.monotonic() - start > W
            senders[-1].join()
            a.recv(1)
            assert sel.policy.dense is dense_after
