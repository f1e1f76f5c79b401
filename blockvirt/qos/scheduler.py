"""Storage I/O control for one pool: hierarchical mClock (pure; time is an argument).

The pool serves at most `capacity` cost units per second (0: no cap). Requests from volumes
(leaves) wait in per-leaf queues; groups nest leaves and other groups. Each node has:

  shares       proportional share of what is left, among its siblings (SFQ start tags)
  reservation  cost units/s it is guaranteed (a floor, not an add-on: service it gets by
               shares counts toward it), served first, earliest reservation tag first
  limit        cost units/s it never exceeds; limits narrow down the tree
  bps_limit    bytes/s (leaves)

Dispatch, each time the pool may serve one more request:
  1. constraint phase: among nodes behind their reservation (tag <= now) with an eligible
     request below them, the earliest tag wins; the request is picked under it by shares;
  2. weight phase: from the root down, the eligible child with the smallest start tag.
A node is eligible when something is queued below it and neither it nor anything between
it and that request is over a limit; so unused share flows to siblings (work conserving).

With latency control (latency.py) the pool also has a window: at most that many requests in
its backend at once; a request that finishes makes room for the next.

Fairness details (mClock, dmClock, SFQ):
  - start tags advance by cost/shares on every dispatch; reservation tags only on
    constraint-phase dispatches, so a reserved node gets max(reservation, its share);
  - a node that has not been served for longer than the anticipation window (20 ms) is
    brought up to its parent's virtual time before it competes: idle or limited nodes
    bank no credit, and a node that becomes active gets its fair share at once; within
    the window it keeps its place (a closed-loop client at queue depth 4 empties its
    queue between completions; without this it would be pushed back each time);
  - rates are enforced with a GCRA pacer per limit, with a small burst tolerance and a
    catch-up allowance for late timers (not for idle time).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: A node not served for this long (seconds) is synced to its parent's virtual time.
ANTICIPATION = 0.02
#: Pacers may run this far ahead of their schedule (seconds): the burst a rate allows.
LIMIT_BURST = 0.02
#: ...and make up this much lateness (a timer that fired late), never idle time.
CATCH_UP = 0.02
#: The pool's own pacer: a small burst keeps dispatch smooth; catch-up covers timer jitter.
POOL_BURST = 0.002
POOL_CATCH_UP = 0.02
#: Reservation tags may make up this much lateness.
RESERVATION_CATCH_UP = 0.05
DEFAULT_SHARES = 1000.0

IMMEDIATE, WEIGHT, RESERVATION = "immediate", "weight", "reservation"


class Pacer:
    """GCRA: `ready(now)` if the schedule is at most `burst` ahead; `take` advances it by
    cost/rate from where it was (making up to `catch_up` of lateness) or from now (idle)."""

    __slots__ = ("burst", "catch_up", "rate", "tat")

    def __init__(self, rate: float, burst: float, catch_up: float) -> None:
        self.rate = rate
        self.burst = burst
        self.catch_up = catch_up
        self.tat = -math.inf

    def ready(self, now: float) -> bool:
        return self.tat <= now + self.burst

    def when(self) -> float:
        return self.tat - self.burst

    def take(self, cost: float, now: float) -> None:
        base = self.tat if self.tat >= now - self.catch_up else now
        self.tat = base + cost / self.rate


@dataclass(frozen=True, slots=True)
class Params:
    """A node's settings (0 means none / default)."""

    shares: float = DEFAULT_SHARES
    reservation: float = 0.0
    limit: float = 0.0
    bps_limit: float = 0.0


class Request:
    __slots__ = ("arrival", "cost", "counted", "leaf", "nbytes", "phase", "token")

    def __init__(
        self, leaf: Leaf, cost: float, nbytes: int, arrival: float, token: Any, counted: bool = False
    ) -> None:
        self.leaf = leaf
        self.cost = cost
        self.nbytes = nbytes
        self.arrival = arrival
        self.token = token
        self.counted = counted  # takes a place in the latency window once dispatched
        self.phase = ""


class Node:
    """A group (or the root): children compete under it."""

    def __init__(self, name: str, params: Params, parent: Node | None) -> None:
        self.name = name
        self.parent = parent
        self.children: list[Node] = []
        self.params = params
        self.queued = 0  # requests waiting in this subtree
        self.S = 0.0  # start tag among siblings (virtual time units: cost / shares)
        self.v = 0.0  # virtual time of this node's children (start tag last served by shares)
        self.last_served = -math.inf
        self.limit_pacer: Pacer | None = None
        self.res_pacer: Pacer | None = None
        self.apply(params)

    def apply(self, params: Params) -> None:
        self.params = params
        self.limit_pacer = _retune(self.limit_pacer, params.limit, LIMIT_BURST, CATCH_UP)
        self.res_pacer = _retune(self.res_pacer, params.reservation, 0.0, RESERVATION_CATCH_UP)

    @property
    def shares(self) -> float:
        return self.params.shares or DEFAULT_SHARES

    def path(self) -> list[Node]:
        """This node and its ancestors up to (not including) the root."""
        out: list[Node] = []
        n: Node | None = self
        while n is not None and n.parent is not None:
            out.append(n)
            n = n.parent
        return out


class Leaf(Node):
    """A volume (or the pool's background class): its own queue of requests."""

    def __init__(self, name: str, params: Params, parent: Node | None) -> None:
        self.queue: deque[Request] = deque()
        self.bps_pacer: Pacer | None = None
        #: The limit pacers of this leaf and its ancestors (kept by the scheduler), for the
        #: immediate path.
        self.limits: tuple[Pacer, ...] = ()
        # Accounting (read by metrics and `qos show`).
        self.immediate = 0
        self._served: dict[str, int] = {WEIGHT: 0, RESERVATION: 0}
        self.cost_served = 0.0
        self.wait_seconds = 0.0
        super().__init__(name, params, parent)

    def apply(self, params: Params) -> None:
        super().apply(params)
        self.bps_pacer = _retune(self.bps_pacer, params.bps_limit, LIMIT_BURST, CATCH_UP)

    @property
    def served(self) -> dict[str, int]:
        """Requests dispatched, by how: at once, by shares, by reservation."""
        return {IMMEDIATE: self.immediate, **self._served}


def _retune(p: Pacer | None, rate: float, burst: float, catch_up: float) -> Pacer | None:
    """A pacer for a new rate that keeps its place in time (live retune, no burst)."""
    if rate <= 0:
        return None
    if p is None:
        return Pacer(rate, burst, catch_up)
    p.rate = rate
    return p


class Scheduler:
    """One pool's admission order. Not thread-safe; owned by one event loop."""

    def __init__(self, capacity: float = 0.0) -> None:
        self.root = Node("", Params(), None)
        self.pacer: Pacer | None = None
        self.capacity = 0.0
        self.set_capacity(capacity)
        self.groups: dict[str, Node] = {}
        self.leaves: dict[str, Leaf] = {}
        self._reserved: list[Node] = []
        #: Latency control (latency.py): at most `window` counted requests in the backend.
        self.window = math.inf
        self.inflight = 0
        self.peak_inflight = 0

    # ------------------------------------------------------------ configuration
    def set_capacity(self, capacity: float) -> None:
        self.capacity = capacity
        self.pacer = _retune(self.pacer, capacity, POOL_BURST, POOL_CATCH_UP)

    def _attach(self, node: Node, parent: Node) -> None:
        # Start tags are relative to a parent's virtual time: a node joining a parent (new,
        # moved to another group, or from another pool) starts level with its new siblings.
        node.parent = parent
        node.S = parent.v
        node.last_served = -math.inf
        parent.children.append(node)
        if node.queued:
            for n in self._up(parent):
                n.queued += node.queued
        self._index_reserved()

    def _detach(self, node: Node) -> None:
        parent = node.parent
        assert parent is not None
        parent.children.remove(node)
        if node.queued:
            for n in self._up(parent):
                n.queued -= node.queued
        node.parent = None
        self._index_reserved()

    @staticmethod
    def _up(node: Node | None) -> Iterator[Node]:
        while node is not None:
            yield node
            node = node.parent

    def _index_reserved(self) -> None:
        """Recompute what the hot path keeps at hand (after any change of tree or params)."""
        self._reserved = [n for n in self._walk(self.root) if n.params.reservation > 0 and n is not self.root]
        for n in self._walk(self.root):
            if isinstance(n, Leaf):
                n.limits = tuple(x.limit_pacer for x in self._up(n) if x.limit_pacer is not None)

    def _walk(self, node: Node) -> Iterator[Node]:
        yield node
        for c in node.children:
            yield from self._walk(c)

    def _place(self, node: Node, params: Params, parent: str | None) -> None:
        """Apply new params to an existing node and move it under `parent` if it is not there."""
        pnode = self.groups[parent] if parent else self.root
        if node.parent is None:
            self._attach(node, pnode)
        else:
            node.apply(params)
            if node.parent is not pnode:
                self._detach(node)
                self._attach(node, pnode)
        self._index_reserved()

    def group(self, name: str, params: Params, parent: str | None = None) -> Node:
        """Create or update a group (and move it under `parent`)."""
        node = self.groups.get(name)
        if node is None:
            node = self.groups[name] = Node(name, params, None)
        self._place(node, params, parent)
        return node

    def remove_group(self, name: str) -> None:
        node = self.groups.pop(name)
        assert not node.children, "a group is emptied before it is removed"
        self._detach(node)

    def leaf(self, name: str, params: Params, group: str | None = None) -> Leaf:
        """Create or update a leaf (and move it under `group`, keeping its queue)."""
        node = self.leaves.get(name)
        if node is None:
            node = self.leaves[name] = Leaf(name, params, None)
        self._place(node, params, group)
        return node

    def remove_leaf(self, name: str) -> list[Request]:
        """Take a leaf out (its volume moved or went away): returns what was queued."""
        node = self.leaves.pop(name)
        self._detach(node)
        pending = list(node.queue)
        node.queue.clear()
        node.queued = 0
        return pending

    def take_leaf(self, name: str) -> Leaf:
        """Detach a leaf, queue and all, to move it to another pool's scheduler."""
        node = self.leaves.pop(name)
        self._detach(node)
        return node

    def adopt(self, leaf: Leaf, group: str | None = None) -> None:
        """Take in a leaf from another pool's scheduler, with its queue. Its tags meant
        nothing here: it starts at this pool's virtual time."""
        self.leaves[leaf.name] = leaf
        self._attach(leaf, self.groups[group] if group else self.root)

    # ------------------------------------------------------------ admission
    def _path_ready(self, leaf: Leaf, nbytes: int, now: float) -> bool:
        bps = leaf.bps_pacer
        if bps is not None and nbytes and not bps.ready(now):
            return False
        n: Node | None = leaf
        while n is not None:
            lp = n.limit_pacer
            if lp is not None and not lp.ready(now):
                return False
            n = n.parent
        return True

    def try_now(self, leaf: Leaf, cost: float, nbytes: int, now: float) -> bool:
        """Admit a request at once if nothing waits in the pool and no rate says no.

        This is every request's path while the pool is not the bottleneck, so it is kept to a
        few comparisons: only pacers are charged. Shares tags are left alone (the idle rule
        brings every node level with its siblings when contention starts), so uncontended
        service earns no credit and costs no debt."""
        if self.root.queued or self.inflight >= self.window:
            return False
        # Pacer arithmetic written out (Pacer.ready/take): this runs for every request.
        pacer = self.pacer
        if pacer is not None:
            tat = pacer.tat
            if tat > now + pacer.burst:
                return False
        limits = leaf.limits
        for lp in limits:
            if lp.tat > now + lp.burst:
                return False
        bps = leaf.bps_pacer
        if bps is not None and nbytes:
            t = bps.tat
            if t > now + bps.burst:
                return False
            bps.tat = (t if t >= now - bps.catch_up else now) + nbytes / bps.rate
        if pacer is not None:
            pacer.tat = (tat if tat >= now - pacer.catch_up else now) + cost / pacer.rate
        for lp in limits:
            t = lp.tat
            lp.tat = (t if t >= now - lp.catch_up else now) + cost / lp.rate
        leaf.immediate += 1
        leaf.cost_served += cost
        return True

    def started(self) -> None:
        """A request admitted under a window went into the backend (the caller counts only
        requests that will report finished())."""
        self.inflight += 1
        if self.inflight > self.peak_inflight:
            self.peak_inflight = self.inflight

    def finished(self) -> None:
        self.inflight -= 1

    def enqueue(
        self, leaf: Leaf, cost: float, nbytes: int, now: float, token: Any = None, *, counted: bool = False
    ) -> Request:
        """Queue a request; dispatch() hands it out when its turn comes. A `counted` one takes
        a place in the latency window when dispatched (its owner calls finished())."""
        req = Request(leaf, cost, nbytes, now, token, counted)
        leaf.queue.append(req)
        for n in self._up(leaf):
            n.queued += 1
        return req

    def submit(self, leaf: Leaf, cost: float, nbytes: int, now: float, token: Any = None) -> Request | None:
        """None if the request may go now, else its queued Request."""
        if self.try_now(leaf, cost, nbytes, now):
            return None
        return self.enqueue(leaf, cost, nbytes, now, token)

    def cancel(self, req: Request) -> bool:
        """Forget a queued request (its client went away). False if it was dispatched."""
        leaf = req.leaf
        try:
            leaf.queue.remove(req)
        except ValueError:
            return False
        for n in self._up(leaf):
            n.queued -= 1
        return True

    def _eff_start(self, node: Node, parent: Node, now: float) -> float:
        if now - node.last_served > ANTICIPATION and parent.v > node.S:
            return parent.v
        return node.S

    def _eligible(self, node: Node, now: float, memo: dict[int, bool]) -> bool:
        key = id(node)
        got = memo.get(key)
        if got is not None:
            return got
        ok = False
        if node.queued:
            lp = node.limit_pacer
            if lp is None or lp.ready(now):
                if isinstance(node, Leaf):
                    head = node.queue[0]
                    bps = node.bps_pacer
                    ok = bps is None or not head.nbytes or bps.ready(now)
                else:
                    ok = any(self._eligible(c, now, memo) for c in node.children)
        memo[key] = ok
        return ok

    def _descend(self, node: Node, now: float, memo: dict[int, bool]) -> Leaf:
        """From `node` (eligible) down to a leaf by smallest effective start tag."""
        while not isinstance(node, Leaf):
            best: Node | None = None
            best_s = math.inf
            for c in node.children:
                if c.queued and self._eligible(c, now, memo):
                    s = self._eff_start(c, node, now)
                    if s < best_s:
                        best, best_s = c, s
            assert best is not None, "an eligible group has an eligible child"
            node = best
        return node

    def _charge(self, leaf: Leaf, cost: float, nbytes: int, now: float, phase: str) -> None:
        """Account one dispatch of `leaf` in tags and pacers along its path."""
        if self.pacer is not None:
            self.pacer.take(cost, now)
        if leaf.bps_pacer is not None and nbytes:
            leaf.bps_pacer.take(nbytes, now)
        node: Node = leaf
        parent = node.parent
        while parent is not None:
            start = self._eff_start(node, parent, now)
            if phase != RESERVATION:
                parent.v = start
            node.S = start + cost / node.shares
            node.last_served = now
            if node.limit_pacer is not None:
                node.limit_pacer.take(cost, now)
            if phase == RESERVATION and node.res_pacer is not None:
                node.res_pacer.take(cost, now)
            node, parent = parent, parent.parent
        leaf._served[phase] += 1
        leaf.cost_served += cost

    def dispatch(self, now: float, limit: int = 1 << 30) -> list[Request]:
        """Hand out every request that may go now (at most `limit`), in mClock order."""
        out: list[Request] = []
        root = self.root
        while root.queued and len(out) < limit:
            if self.pacer is not None and not self.pacer.ready(now):
                break
            if self.inflight >= self.window:
                break  # the backend is full: finished() makes room
            memo: dict[int, bool] = {}
            phase = WEIGHT
            start: Node | None = None
            best_r = math.inf
            for n in self._reserved:
                rp = n.res_pacer
                if rp is None or not n.queued or rp.tat > now or rp.tat >= best_r:
                    continue
                if self._eligible(n, now, memo):
                    start, best_r = n, rp.tat
            if start is not None:
                phase = RESERVATION
            elif self._eligible(root, now, memo):
                start = root
            else:
                break  # everything queued is held by a limit
            leaf = self._descend(start, now, memo)
            req = leaf.queue.popleft()
            for n in self._up(leaf):
                n.queued -= 1
            self._charge(leaf, req.cost, req.nbytes, now, phase)
            leaf.wait_seconds += now - req.arrival
            req.phase = phase
            if req.counted:
                self.started()
            out.append(req)
        return out

    def next_time(self, now: float) -> float | None:
        """When dispatch() may hand out something again (None: nothing is queued)."""
        if not self.root.queued or self.inflight >= self.window:
            return None  # nothing to do, or wait for finished()
        t = self.pacer.when() if self.pacer is not None else now
        memo: dict[int, bool] = {}
        if self._eligible(self.root, now, memo):
            return max(t, now)
        # Held by limits: the earliest moment one of the blocking pacers frees up.
        soonest = math.inf
        for node in self._walk(self.root):
            if not node.queued:
                continue
            lp = node.limit_pacer
            if lp is not None and not lp.ready(now):
                soonest = min(soonest, lp.when())
            if isinstance(node, Leaf) and node.bps_pacer is not None and not node.bps_pacer.ready(now):
                soonest = min(soonest, node.bps_pacer.when())
        return max(t, soonest if soonest < math.inf else now)
