"""Crash harness for copy-on-write layers (storage.md 5.3 and 5.8).

The layers and a ChainNode run on MemFileIO, an in-memory FileIO with a volatile cache.
A random workload (writes, write-zeroes, trims, flushes, FUA writes, snapshots and
flattens at the layer level) runs once per seed; crash images are taken just before every
durable operation (a crash *during* that fsync/fdatasync/atomic replace/dsync write) and
after every completed operation. Each image is recovered (Layer.open replays the journals)
and checked against a model of what every 512-byte sector may read:

1. data acknowledged by a completed FLUSH, or written with FUA, reads back exactly;
2. every other sector reads a value it held since then (its old or a new content: never
   another block's data, never garbage);
3. every snapshot reads exactly what the volume read when it was taken;
4. the journals are structurally valid (no block DATA and ZERO at once, nothing past the
   layer's end) and a torn tail is cut at the writable reopen, after which new commits
   replay.

`test_power_cut_at_nth_durable_op` also stops the workload for real at its N-th durable
operation (MemFileIO raises), so nothing after the cut runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from blockvirt.storage.backends.cowfile import layer as layer_module
from blockvirt.storage.backends.cowfile import layout
from blockvirt.storage.backends.cowfile import stream as streaming
from blockvirt.storage.backends.cowfile.chain import ChainNode
from blockvirt.storage.backends.cowfile.layer import Layer, layer_paths
from blockvirt.storage.backends.cowfile.layer_map import BLOCK, CLUSTER_BLOCKS, DATA, UNALLOC, ZERO
from tests.crash.memfs import SECTOR, MemFileIO, PowerCut

POOL = "/pool"
SECTORS_PER_BLOCK = BLOCK // SECTOR
#: Workload seeds of the main harness, and what each must reach at least.
SEEDS = 48
OPS_PER_SEED = 100
MIN_CUTS_PER_SEED = 220
assert SEEDS * MIN_CUTS_PER_SEED >= 10_000, "storage.md 5.8 asks for at least 10,000 crash points"
#: Every this many recovered images, keep writing on the recovered chain, flush, recover again.
CONTINUE_EVERY = 7
MAX_DEPTH = 5
#: A journal threshold low enough that compaction (an atomic replace of the journal) runs
#: every few commits.
COMPACT_SMALL = layout.HEADER_SIZE + 100
#: Snapshots are immutable: read them back at every this many recovered images.
SNAPSHOT_CHECK_EVERY = 3


# ---------------------------------------------------------------- the model


class Model:
    """What every 512-byte sector of a volume may read after a crash.

    `pinned` holds the contents known durable (a completed FLUSH, or a FUA write for the
    sectors it touched); `hist` every value a sector took since it was pinned (including
    the value an operation in progress is writing). A sector that a sub-sector write
    touched since it was pinned may also be an in-order mix of those writes at byte level:
    the cache model loses or keeps each pending write on its own."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.cur = bytearray(size)
        self.pinned = bytearray(size)
        self.hist: dict[int, set[bytes]] = {}
        self.partial: set[int] = set()

    def begin(self, offset: int, new: bytes) -> None:
        """An operation starts writing `new` at `offset` (its values may now be read)."""
        end = offset + len(new)
        self.cur[offset:end] = new
        first, last = offset // SECTOR, (end - 1) // SECTOR
        if offset % SECTOR:
            self.partial.add(first)
        if end % SECTOR:
            self.partial.add(last)
        cur = self.cur
        for s in range(first, last + 1):
            self.hist.setdefault(s, set()).add(bytes(cur[s * SECTOR : (s + 1) * SECTOR]))

    def pin(self, offset: int, length: int) -> None:
        """A FUA operation on the range was acknowledged."""
        first, last = offset // SECTOR, (offset + length - 1) // SECTOR
        a, b = first * SECTOR, (last + 1) * SECTOR
        self.pinned[a:b] = self.cur[a:b]
        for s in range(first, last + 1):
            self.hist.pop(s, None)
            self.partial.discard(s)

    def pin_all(self) -> None:
        """A FLUSH was acknowledged."""
        self.pinned[:] = self.cur
        self.hist.clear()
        self.partial.clear()

    def _bytewise(self, s: int, value: bytes) -> bool:
        cands = [bytes(self.pinned[s * SECTOR : (s + 1) * SECTOR]), *self.hist.get(s, ())]
        return all(any(c[i] == v for c in cands) for i, v in enumerate(value))

    def problems(self, got: bytes) -> list[str]:
        out: list[str] = []
        cur, pinned = self.cur, self.pinned
        for b in range(0, self.size, BLOCK):
            blk = got[b : b + BLOCK]
            if blk == cur[b : b + BLOCK] or blk == pinned[b : b + BLOCK]:
                continue
            for s in range(b // SECTOR, (b + BLOCK) // SECTOR):
                v = got[s * SECTOR : (s + 1) * SECTOR]
                if v == pinned[s * SECTOR : (s + 1) * SECTOR] or v in self.hist.get(s, ()):
                    continue
                if s in self.partial and self._bytewise(s, v):
                    continue
                out.append(self._describe(s, v))
        return out

    def _describe(self, s: int, v: bytes) -> str:
        where = "never held by any sector"
        if v == bytes(SECTOR):
            where = "zeros"
        else:
            for t, vals in self.hist.items():
                if v in vals:
                    where = f"a value of sector {t}"
                    break
            else:
                for t in range(self.size // SECTOR):
                    if self.pinned[t * SECTOR : (t + 1) * SECTOR] == v:
                        where = f"the pinned value of sector {t}"
                        break
        pinned = self.pinned[s * SECTOR : (s + 1) * SECTOR]
        return (
            f"block {s // SECTORS_PER_BLOCK} sector {s % SECTORS_PER_BLOCK}: reads {v[:8].hex()}.. "
            f"({where}); pinned {bytes(pinned[:8]).hex()}.., {len(self.hist.get(s, ()))} newer value(s)"
        )


# ---------------------------------------------------------------- checks on a recovered image


def check_layer_invariants(io: MemFileIO, lay: Layer, *, writable: bool) -> None:
    """fsck of one layer: journal structure, map states, torn tails cut when writable."""
    _, map_path = layer_paths(POOL, lay.id)
    raw = io.read_file(map_path)
    header = layout.decode_header(raw)
    assert header.block_size == BLOCK
    replay = layout.decode_journal(raw)
    nclusters = -(-lay.size // (CLUSTER_BLOCKS * BLOCK))
    for cluster, data, zero in replay.entries:
        assert cluster < nclusters, f"layer {lay.id}: entry for cluster {cluster} past the end"
        assert not data & zero, f"layer {lay.id}: cluster {cluster} has blocks both DATA and ZERO"
    if writable:
        assert not replay.torn, f"layer {lay.id}: torn journal tail left after a writable open"
        assert lay.map_end == len(raw)
    nblocks = lay.map.nblocks
    for page, (data, zero) in lay.map.pages.items():
        assert not data & zero, f"layer {lay.id}: page {page} has blocks both DATA and ZERO"
        assert (data | zero) >> max(0, nblocks - page * 4096) == 0, "state past the layer's end"


@dataclass(slots=True)
class Capture:
    image: dict[str, bytes]
    chain: list[str]  # the head chain the "catalog" named at the instant of the crash
    snaps: list[tuple[list[str], bytes]]  # snapshot chains and their exact contents
    where: str


class Harness:
    """One workload on one chain; crash images are captured as it runs and checked."""

    def __init__(
        self, seed: int, *, nblocks: int, thick: bool, captures: bool = True, journal_heavy: bool = False
    ) -> None:
        self.seed = seed
        #: Only scattered writes and trims, then a flush, on one head: long journals whose
        #: batches often cross sector edges.
        self.journal_heavy = journal_heavy
        self.rng = random.Random(seed)  # the workload (identical for identical seeds)
        self.crng = random.Random(seed * 7919 + 1)  # crash images and continuations
        self.io = MemFileIO()
        self.nblocks = nblocks
        self.size = nblocks * BLOCK
        self.thick = thick
        self.model = Model(self.size)
        self.chain: list[str] = []
        self.snaps: list[tuple[list[str], bytes]] = []
        self.layers: list[Layer] = []
        self.node: ChainNode | None = None
        self.queue: list[Capture] = []
        self.step = ""
        self.cuts = 0
        self.continued = 0
        self.torn_tails = 0
        self.ops_done = 0
        #: Take crash images as the workload runs (off: only a PowerCut stops it).
        self.captures = captures
        if captures:
            self.io.before_durable = self._before_durable

    # ------------------------------------------------------------ captures
    def _before_durable(self, what: str) -> None:
        self.capture(f"{self.step}, before {what}")
        if what == "fdatasync" and self._journal_pending():
            # A journal append in flight: the likeliest place for a torn tail.
            self.capture(f"{self.step}, before {what} of the journal", "random")
            self.capture(f"{self.step}, before {what} of the journal", "tear")

    def _journal_pending(self) -> bool:
        if not self.layers:
            return False
        _, map_path = layer_paths(POOL, self.layers[0].id)
        ino = self.io.names.get(map_path)
        return ino is not None and bool(ino.pending)

    def capture(self, where: str, mode: str | None = None) -> None:
        if mode is None:
            mode = self.crng.choice(("random", "random", "random", "lose", "keep"))
        self.queue.append(
            Capture(self.io.crash_image(self.crng, mode), list(self.chain), list(self.snaps), where)
        )

    async def settle(self) -> None:
        """Check every captured image against the model as it is now (captures are taken
        while an operation runs, before it is acknowledged)."""
        queue, self.queue = self.queue, []
        for cap in queue:
            await self.verify(cap)

    async def boundary(self) -> None:
        """Crash right after an operation was acknowledged (two different outcomes)."""
        assert self.node is not None
        live = bytes(await self.node.read(0, self.size))
        assert live == self.model.cur, f"seed {self.seed}, after {self.step}: the live chain reads wrong"
        if not self.captures:
            return
        self.capture(f"after {self.step}")
        self.capture(f"after {self.step}")
        await self.settle()

    # ------------------------------------------------------------ recovery
    async def verify(self, cap: Capture) -> None:
        if not cap.chain:
            return  # the crash came before the first layer existed
        io = MemFileIO(cap.image)
        opened: dict[str, Layer] = {}
        ctx = f"seed {self.seed}, crash {self.cuts} {cap.where}"
        torn = False
        try:
            for i, lid in enumerate(cap.chain):
                if i == 0:
                    _, map_path = layer_paths(POOL, lid)
                    torn = layout.decode_journal(io.read_file(map_path)).torn
                    self.torn_tails += torn
                opened[lid] = Layer.open(io, POOL, lid, self.size, writable=i == 0)
                check_layer_invariants(io, opened[lid], writable=i == 0)
            node = ChainNode([opened[lid] for lid in cap.chain], self.size, writable=True)
            got = bytes(await node.read(0, self.size))
            problems = self.model.problems(got)
            assert not problems, f"{ctx}: {len(problems)} bad sector(s): " + "; ".join(problems[:4])
            for schain, content in cap.snaps if self.cuts % SNAPSHOT_CHECK_EVERY == 0 else ():
                for lid in schain:
                    if lid not in opened:
                        opened[lid] = Layer.open(io, POOL, lid, self.size, writable=False)
                        check_layer_invariants(io, opened[lid], writable=False)
                snode = ChainNode([opened[lid] for lid in schain], self.size, writable=False)
                assert bytes(await snode.read(0, self.size)) == content, f"{ctx}: a snapshot changed"
            self.cuts += 1
            if torn or self.cuts % CONTINUE_EVERY == 0:
                await self._continue(io, node, got, cap.chain, ctx)
        finally:
            for lay in opened.values():
                lay.close()

    async def _continue(self, io: MemFileIO, node: ChainNode, got: bytes, chain: list[str], ctx: str) -> None:
        """Life goes on after recovery: write, flush, crash again; the flushed state must be
        exactly what was written (new batches after a cut torn tail must replay)."""
        rng = self.crng
        expect = bytearray(got)
        for _ in range(rng.randint(1, 4)):
            offset, length = random_range(rng, self.nblocks)
            if rng.random() < 0.7:
                data = rng.randbytes(length)
                await node.write(offset, data, fua=rng.random() < 0.3)
                expect[offset : offset + length] = data
            else:
                await node.zero(offset, length, may_trim=rng.random() < 0.5)
                expect[offset : offset + length] = bytes(length)
        await node.flush()
        io2 = MemFileIO(io.crash_image(rng, "random"))
        layers = [Layer.open(io2, POOL, lid, self.size, writable=i == 0) for i, lid in enumerate(chain)]
        try:
            again = ChainNode(layers, self.size, writable=True)
            assert bytes(await again.read(0, self.size)) == expect, (
                f"{ctx}: flushed writes lost after recovery"
            )
        finally:
            for lay in layers:
                lay.close()
        self.continued += 1

    # ------------------------------------------------------------ the workload
    def _new_layer(self, *, thick: bool = False) -> str:
        lid = f"{self.rng.getrandbits(128):032x}"
        Layer.create(self.io, POOL, lid, self.size, thick=thick)
        return lid

    async def setup(self) -> None:
        self.step = "create"
        lid = self._new_layer(thick=self.thick)
        self.chain = [lid]
        self.layers = [Layer.open(self.io, POOL, lid, self.size, writable=True)]
        self.node = ChainNode(self.layers, self.size, writable=True)
        self.queue.clear()  # nothing to recover before the "catalog" names the layer
        await self.boundary()

    async def run(self, nops: int) -> None:
        await self.setup()
        for k in range(nops):
            await self.one_op(k)
            self.ops_done = k + 1

    async def one_op(self, k: int) -> None:
        rng, node, model = self.rng, self.node, self.model
        assert node is not None
        if self.journal_heavy:
            await self.scatter(k)
            await self.boundary()
            return
        r = rng.random()
        if r < 0.46:
            offset, length = random_range(rng, self.nblocks)
            data = rng.randbytes(length)
            fua = rng.random() < 0.2
            self.step = f"op {k}: write {offset}+{length}{' FUA' if fua else ''}"
            model.begin(offset, data)
            await node.write(offset, data, fua=fua)
            await self.settle()
            if fua:
                model.pin(offset, length)
        elif r < 0.66:
            offset, length = random_range(rng, self.nblocks)
            may_trim, fua = rng.random() < 0.5, rng.random() < 0.15
            trim = rng.random() < 0.3
            self.step = (
                f"op {k}: {'trim' if trim else 'zero'} {offset}+{length} may_trim={may_trim} fua={fua}"
            )
            model.begin(offset, bytes(length))
            if trim:
                await node.trim(offset, length, fua=fua)
            else:
                await node.zero(offset, length, may_trim=may_trim, fua=fua)
            await self.settle()
            if fua:
                model.pin(offset, length)
        elif r < 0.86:
            self.step = f"op {k}: flush"
            await node.flush()
            await self.settle()
            model.pin_all()
        elif r < 0.95 and len(self.chain) < MAX_DEPTH:
            await self.snapshot(k)
        elif len(self.chain) > 1:
            await self.flatten(k)
        else:
            self.step = f"op {k}: flush"
            await node.flush()
            await self.settle()
            model.pin_all()
        await self.boundary()

    async def scatter(self, k: int) -> None:
        """Blocks all over the volume change state (written or trimmed), then a flush: the
        commit journals many clusters, so batches often cross a sector edge."""
        rng, node, model = self.rng, self.node, self.model
        assert node is not None
        for b in rng.sample(range(self.nblocks), rng.randint(4, 12)):
            self.step = f"op {k}: scatter, block {b}"
            if rng.random() < 0.5:
                data = rng.randbytes(BLOCK)
                model.begin(b * BLOCK, data)
                await node.write(b * BLOCK, data)
            else:
                model.begin(b * BLOCK, bytes(BLOCK))
                await node.trim(b * BLOCK, BLOCK)
        self.step = f"op {k}: scatter, flush"
        await node.flush()
        await self.settle()
        model.pin_all()

    async def snapshot(self, k: int) -> None:
        """As VolumeManager.snapshot_create does it, with `self.chain` as the catalog."""
        node = self.node
        assert node is not None
        self.step = f"op {k}: snapshot (commit)"
        old = node.head
        await old.commit()
        await self.settle()
        self.model.pin_all()
        self.step = f"op {k}: snapshot (new head)"
        lid = self._new_layer()
        await self.settle()
        # The catalog commit: the old head becomes a snapshot, the new layer the head.
        self.snaps.append((list(self.chain), bytes(self.model.cur)))
        self.chain = [lid, *self.chain]
        new = Layer.open(self.io, POOL, lid, self.size, writable=True)
        self.layers = [new, *self.layers]
        node.set_layers(self.layers, keep_index=True)
        self.step = f"op {k}: snapshot"

    async def flatten(self, k: int) -> None:
        """As the flatten job does it: stream the ancestors into the head, then drop them."""
        node = self.node
        assert node is not None
        self.step = f"op {k}: flatten (stream)"
        head = node.head
        await streaming.stream(head, self.layers[1:], keep_zeros=False)
        await self.settle()
        self.chain = [head.id]
        for lay in self.layers[1:]:
            lay.close()
        self.layers = [head]
        node.set_layers(self.layers, keep_index=False)
        self.step = f"op {k}: flatten"

    def compactions(self) -> int:
        """Journal rewrites so far (beyond the one that created each layer's journal)."""
        maps = sum(1 for path in self.io.names if path.endswith(".map"))
        return sum(1 for e in self.io.log if e[0] == "write_file_atomic") - maps

    def close(self) -> None:
        for lay in self.layers:
            lay.close()
        self.layers = []


def random_range(rng: random.Random, nblocks: int) -> tuple[int, int]:
    """Aligned runs, unaligned and cross-block pieces, sector-sized ones; often in a hot spot
    so blocks get rewritten."""
    size = nblocks * BLOCK
    span = size if rng.random() < 0.5 else min(size, 12 * BLOCK)
    r = rng.random()
    if r < 0.35:
        n = rng.randint(1, min(24, span // BLOCK))
        return rng.randrange(0, span // BLOCK - n + 1) * BLOCK, n * BLOCK
    if r < 0.55:
        n = rng.randint(1, 24)
        return rng.randrange(0, span // SECTOR - n + 1) * SECTOR, n * SECTOR
    length = rng.randint(1, 3 * BLOCK)
    return rng.randrange(0, span - length + 1), length


def _variant(seed: int) -> tuple[int, bool, bool]:
    """(blocks, thick, small compaction threshold) for a seed."""
    return (64, 128, 256)[seed % 3], seed % 5 == 4, seed % 4 == 1


# ---------------------------------------------------------------- the harness


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_crash_points(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    nblocks, thick, compact = _variant(seed)
    if compact:
        # Compaction (write_file_atomic of the journal) every few commits.
        monkeypatch.setattr(layer_module, "COMPACT_AT", COMPACT_SMALL)
    h = Harness(seed, nblocks=nblocks, thick=thick)
    try:
        await h.run(OPS_PER_SEED)
    finally:
        h.close()
    assert h.cuts >= MIN_CUTS_PER_SEED, f"only {h.cuts} crash points"
    assert h.continued >= h.cuts // CONTINUE_EVERY
    if compact and not thick:  # (a thick layer journals nothing)
        assert h.compactions() > 0
    print(f"seed {seed}: {h.cuts} crash points, {h.torn_tails} torn journal tails recovered")


@pytest.mark.parametrize("seed", range(2000, 2006))
async def test_torn_journal_tails(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long journals on one head: commits that cross 512-byte sectors are torn by the
    crash; replay keeps the good batches, the writable open cuts the tail, and commits
    made after recovery replay (every recovered torn image is continued)."""
    if seed % 3 == 2:
        monkeypatch.setattr(layer_module, "COMPACT_AT", layout.HEADER_SIZE + 2048)
    h = Harness(seed, nblocks=(128, 256)[seed % 2], thick=False, journal_heavy=True)
    try:
        await h.run(50)
    finally:
        h.close()
    assert h.torn_tails >= 3, f"only {h.torn_tails} torn tails"
    assert h.continued >= h.torn_tails
    print(f"seed {seed}: {h.cuts} crash points, {h.torn_tails} torn journal tails recovered")


@pytest.mark.parametrize("seed", range(1000, 1006))
async def test_power_cut_at_nth_durable_op(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop the workload for real at its N-th durable operation (raised inside the layer
    code, in the middle of a commit, a snapshot or a flatten) and recover."""
    nblocks, thick, compact = _variant(seed)
    if compact:
        monkeypatch.setattr(layer_module, "COMPACT_AT", COMPACT_SMALL)
    nops = 40
    dry = Harness(seed, nblocks=nblocks, thick=thick, captures=False)
    try:
        await dry.run(nops)
    finally:
        dry.close()
    total = dry.io.durable_ops
    assert total > 20
    picks = sorted(random.Random(seed).sample(range(1, total + 1), min(total, 40)))
    cuts = 0
    for n in picks:
        h = Harness(seed, nblocks=nblocks, thick=thick, captures=False)
        h.io.crash_at = n
        try:
            with pytest.raises(PowerCut):
                await h.run(nops)
            # Whatever the model says now is what was acknowledged before the cut.
            for mode in ("random", "lose", "keep"):
                await h.verify(
                    Capture(h.io.crash_image(h.crng, mode), list(h.chain), list(h.snaps), f"at {n}")
                )
            cuts += h.cuts
        finally:
            h.close()
    assert cuts >= 3 * (len(picks) - 2)
    print(f"seed {seed}: {cuts} crash points at {len(picks)} of {total} durable operations")


# ---------------------------------------------------------------- the journal itself


def _journal(batches: list[list[tuple[int, int, int]]]) -> tuple[bytes, list[int]]:
    """A header plus these batches; returns the bytes and each batch's end offset."""
    raw = layout.encode_header(layout.Header(0, BLOCK, bytes(16)))
    ends = []
    seq = 0
    for entries in batches:
        chunk, seq = layout.encode_batches(seq, entries)
        raw += chunk
        ends.append(len(raw))
    return raw, ends


def _random_batches(rng: random.Random, n: int) -> list[list[tuple[int, int, int]]]:
    out = []
    for _ in range(n):
        entries = []
        for _ in range(rng.randint(0, 6)):
            data = rng.getrandbits(16)
            entries.append((rng.randrange(64), data, rng.getrandbits(16) & ~data))
        out.append(entries)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_replay_stops_at_first_torn_batch(seed: int) -> None:
    rng = random.Random(seed)
    batches = _random_batches(rng, 12)
    raw, ends = _journal(batches)
    for cut in range(layout.HEADER_SIZE, len(raw) + 1):
        replay = layout.decode_journal(raw[:cut])
        good = sum(1 for e in ends if e <= cut)
        assert replay.entries == [e for b in batches[:good] for e in b]
        assert replay.valid_end == (ends[good - 1] if good else layout.HEADER_SIZE)
        assert replay.next_seq == good
        assert replay.torn == (cut > replay.valid_end)


@pytest.mark.parametrize("seed", range(4))
def test_replay_stops_at_first_bad_batch(seed: int) -> None:
    """A flipped bit, a 512-byte sector of zeros or of stale bytes inside batch k: batches
    before k replay, nothing from k on does (even intact batches after it)."""
    rng = random.Random(seed)
    batches = _random_batches(rng, 10)
    raw, ends = _journal(batches)
    starts = [layout.HEADER_SIZE, *ends[:-1]]
    for _ in range(300):
        k = rng.randrange(len(batches))
        bad = bytearray(raw)
        how = rng.choice(("bit", "zero-sector", "stale-sector"))
        if how == "bit":
            pos = rng.randrange(starts[k], ends[k])
            bad[pos] ^= 1 << rng.randrange(8)
        else:
            sector = rng.randrange(starts[k] // SECTOR, (ends[k] - 1) // SECTOR + 1)
            a, b = sector * SECTOR, min(len(bad), (sector + 1) * SECTOR)
            fill = bytes(b - a) if how == "zero-sector" else rng.randbytes(b - a)
            if bad[a:b] == fill:
                continue
            bad[a:b] = fill
        replay = layout.decode_journal(bytes(bad))
        first_bad = next(
            i for i in range(len(batches)) if bad[starts[i] : ends[i]] != raw[starts[i] : ends[i]]
        )
        assert replay.entries == [e for b in batches[:first_bad] for e in b], how
        assert replay.valid_end == starts[first_bad]
        assert replay.torn


def test_replay_ignores_stale_batches_after_a_cut_tail() -> None:
    """A torn tail is cut and the next batch overwrites it; an old batch further on with a
    valid CRC but an out-of-order sequence number is not replayed."""
    batches = [[(0, 1, 0)], [(1, 3, 0)], [(2, 0, 5)]]
    raw, ends = _journal(batches)
    replacement, _ = layout.encode_batches(1, [(3, 0x10, 0)])  # a new batch 1
    assert len(replacement) == ends[1] - ends[0]
    spliced = raw[: ends[0]] + replacement + raw[ends[1] :]  # batch 2 (seq 2) still follows
    replay = layout.decode_journal(spliced)
    assert replay.entries == [(0, 1, 0), (3, 0x10, 0), (2, 0, 5)]  # seq 2 follows seq 1
    skipped, _ = layout.encode_batches(5, [(4, 1, 0)])
    replay = layout.decode_journal(raw[: ends[0]] + skipped + raw[ends[0] :])
    assert replay.entries == [(0, 1, 0)] and replay.torn


async def test_layer_open_cuts_torn_tail_and_appends_after_it() -> None:
    io = MemFileIO()
    lid = "ab" * 16
    size = 64 * BLOCK
    Layer.create(io, POOL, lid, size)
    lay = Layer.open(io, POOL, lid, size, writable=True)
    node = ChainNode([lay], size, writable=True)
    await node.write(0, b"a" * BLOCK)
    await node.flush()
    await node.write(BLOCK, b"b" * BLOCK)
    await node.flush()
    lay.close()
    data_path, map_path = layer_paths(POOL, lid)
    raw = io.read_file(map_path)
    first_end = layout.decode_journal(raw[: len(raw) - 1]).valid_end
    # Tear the second batch: keep its first 7 bytes and add garbage.
    torn = raw[: first_end + 7] + b"\xff" * 40
    io2 = MemFileIO({data_path: io.read_file(data_path), map_path: torn})
    lay = Layer.open(io2, POOL, lid, size, writable=False)
    assert lay.map.state(0) == DATA and lay.map.state(1) == UNALLOC
    assert len(io2.read_file(map_path)) == len(torn)  # read-only: left alone
    lay.close()
    lay = Layer.open(io2, POOL, lid, size, writable=True)
    assert len(io2.read_file(map_path)) == first_end  # cut, durably
    assert not io2.names[map_path].pending
    node = ChainNode([lay], size, writable=True)
    await node.zero(2 * BLOCK, 2 * BLOCK, may_trim=False)
    await node.flush()
    lay.close()
    lay = Layer.open(io2, POOL, lid, size, writable=True)
    assert [lay.map.state(b) for b in range(5)] == [DATA, UNALLOC, DATA, DATA, UNALLOC]
    node = ChainNode([lay], size, writable=True)
    got = bytes(await node.read(0, 5 * BLOCK))
    assert got[:BLOCK] == b"a" * BLOCK
    assert got[BLOCK:] == bytes(4 * BLOCK)  # block 1's data was never committed
    lay.close()


async def test_zero_hides_parent_and_never_both_states() -> None:
    """ZERO in a head hides the parent; the journal never says DATA and ZERO for a block."""
    io = MemFileIO()
    size = 32 * BLOCK
    base_id, head_id = "01" * 16, "02" * 16
    Layer.create(io, POOL, base_id, size)
    base = Layer.open(io, POOL, base_id, size, writable=True)
    node = ChainNode([base], size, writable=True)
    await node.write(0, b"p" * (8 * BLOCK))
    await node.flush()
    Layer.create(io, POOL, head_id, size)
    head = Layer.open(io, POOL, head_id, size, writable=True)
    node.set_layers([head, base], keep_index=True)
    await node.write(BLOCK, b"n" * BLOCK)
    await node.trim(0, 4 * BLOCK)  # DATA -> ZERO for block 1, UNALLOC -> ZERO for 0, 2, 3
    await node.write(2 * BLOCK + 100, b"x" * 10)  # ZERO -> DATA by read-modify-write
    await node.flush()
    states = [head.map.state(b) for b in range(5)]
    assert states == [ZERO, ZERO, DATA, ZERO, UNALLOC]
    raw = io.read_file(layer_paths(POOL, head_id)[1])
    for _, data, zero in layout.decode_journal(raw).entries:
        assert not data & zero
    got = bytes(await node.read(0, 5 * BLOCK))
    block2 = bytearray(BLOCK)
    block2[100:110] = b"x" * 10
    assert got == bytes(2 * BLOCK) + bytes(block2) + bytes(BLOCK) + b"p" * BLOCK
    head.close()
    base.close()


def test_memfs_crash_model() -> None:
    """The cache model itself: fsync makes pending writes durable, a dsync write is durable
    whatever else is lost, torn writes land sector by sector, atomic replace is atomic."""
    io = MemFileIO()
    fd = io.open("/f", write=True, create=True)
    io.pwrite(fd, b"A" * 2048, 0)
    io.fsync(fd)
    io.pwrite(fd, b"B" * 2048, 0)
    rng = random.Random(1)
    seen = set()
    for _ in range(200):
        img = io.crash_image(rng)["/f"]
        assert len(img) == 2048
        sectors = [img[i : i + SECTOR] for i in range(0, 2048, SECTOR)]
        assert all(s in (b"A" * SECTOR, b"B" * SECTOR) for s in sectors)
        seen.add(img)
    assert len(seen) > 4  # whole, lost and several torn outcomes
    assert io.crash_image(rng, "lose")["/f"] == b"A" * 2048
    assert io.crash_image(rng, "keep")["/f"] == b"B" * 2048
    io.pwrite(fd, b"C" * 100, 4096, dsync=True)
    assert io.crash_image(rng, "lose")["/f"][4096:4196] == b"C" * 100
    io.write_file_atomic("/g", b"new")
    io.crash_at = io.durable_ops + 1
    with pytest.raises(PowerCut):
        io.write_file_atomic("/g", b"newer")
    assert io.read_file("/g") == b"new"
    assert io.crash_image(rng, "lose")["/g"] == b"new"
