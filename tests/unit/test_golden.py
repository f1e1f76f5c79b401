"""Replay the golden byte exchanges of protocol/vectors/ against the real server core.

Each vector is one connection. The client's bytes (c2s steps) go into a
`blockvirt.nbd.ServerConnection`; once GO or EXPORT_NAME selects an export, its commands are
validated and executed by the real `Dispatcher` over a storage node, as a session does. Every
byte the server sends must equal the s2c steps, in order, and nothing more; the events the
codec reports, whether the connection ended, how often each export was flushed and what it
contains afterwards must match `expect`. See protocol/README.md for the format.

Each vector runs twice: with every c2s step delivered whole, and one byte at a time (so
every message is also parsed from partial reads); and over three nodes: the in-memory one, the
raw file driver (`RawFileNode` on a sparse file), and a copy-on-write chain (`ChainNode`: the
vector's initial data in a base layer, an empty writable head above it), each built from the
storage classes as they are. A vector's device knobs (`fast_zero`, `sparse_reads`) are applied
by a filter above a real node; everything else is the node's own behaviour.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blockvirt.nbd import ServerConnection
from blockvirt.nbd.constants import BASE_ALLOCATION
from blockvirt.nbd.events import (
    Aborted,
    AccessDenied,
    BlockStatusCmd,
    CacheCmd,
    Command,
    DiscCmd,
    ExportDenied,
    ExportInfo,
    FlushCmd,
    Negotiated,
    OptionRefused,
    ReadCmd,
    StartTLS,
    TrimCmd,
    UnknownCmd,
    WriteCmd,
    WriteZeroesCmd,
)
from blockvirt.nbd.exceptions import ProtocolError
from blockvirt.server.dispatch import Dispatcher
from blockvirt.storage.backends.cowfile.chain import ChainNode
from blockvirt.storage.backends.cowfile.layer import Layer
from blockvirt.storage.drivers.memory import BLOCK, MemoryNode
from blockvirt.storage.drivers.raw import RawFileNode
from blockvirt.storage.fileio import REAL
from blockvirt.storage.node import BlockNode, FilterNode, Segment

ROOT = Path(__file__).resolve().parents[2]
VECTOR_DIR = ROOT / "protocol" / "vectors"
VECTORS = sorted(VECTOR_DIR.glob("*/*.json"))

#: Reads at least this long are answered with holes by a "sparse_reads" export (as RawFileNode).
SPARSE_READ_MIN = 256 * 1024
#: "zeros" steps and, in whole mode, any step are delivered in pieces of at most this size.
WHOLE_PIECE = 1024 * 1024
BYTEWISE_LIMIT = 64 * 1024

#: (vector, node) pairs the server does not pass yet, with the reason (strict: fixing one makes
#: its test fail, so the entry goes).
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

_COMMAND_NAMES: dict[type[Command], str] = {
    ReadCmd: "READ",
    WriteCmd: "WRITE",
    DiscCmd: "DISC",
    FlushCmd: "FLUSH",
    TrimCmd: "TRIM",
    CacheCmd: "CACHE",
    WriteZeroesCmd: "WRITE_ZEROES",
    BlockStatusCmd: "BLOCK_STATUS",
    UnknownCmd: "UNKNOWN",
}


# ---------------------------------------------------------------- the vector's storage


class VectorNode(MemoryNode):
    """A MemoryNode with the two behaviours a vector may ask for (see schema.json)."""

    def __init__(self, size: int, *, read_only: bool, fast_zero: bool, sparse_reads: bool) -> None:
        super().__init__(size, read_only=read_only)
        self.fast_zero = fast_zero
        self.sparse_reads = sparse_reads

    async def fast_zero_possible(self) -> bool:
        return self.fast_zero

    def _segments(self, offset: int, length: int) -> list[Segment]:
        out: list[Segment] = []
        pos, end = offset, offset + length
        while pos < end:
            allocated = pos // BLOCK in self.allocated
            stop = pos
            while stop < end and (stop // BLOCK in self.allocated) == allocated:
                stop = min((stop // BLOCK + 1) * BLOCK, end)
            out.append((pos, stop - pos, bytes(self.data[pos:stop]) if allocated else None))
            pos = stop
        return out

    def read_sparse_nowait(self, offset: int, length: int) -> Sequence[Segment] | None:
        if self.sparse_reads and length >= SPARSE_READ_MIN:
            return self._segments(offset, length)
        return super().read_sparse_nowait(offset, length)

    async def read_sparse(self, offset: int, length: int) -> Sequence[Segment]:
        if self.sparse_reads and length >= SPARSE_READ_MIN:
            return self._segments(offset, length)
        return await super().read_sparse(offset, length)


class RealNode(FilterNode):
    """A real storage node with the vector's device knobs on top, counting flushes."""

    def __init__(self, child: BlockNode, *, fast_zero: bool, sparse_reads: bool) -> None:
        super().__init__(child)
        self.fast_zero = fast_zero
        self.sparse_reads = sparse_reads
        self.flushes = 0

    async def flush(self) -> None:
        self.flushes += 1
        await super().flush()

    async def fast_zero_possible(self) -> bool:
        return self.fast_zero  # the vector describes the device

    def read_sparse_nowait(self, offset: int, length: int) -> Sequence[Segment] | None:
        if self.sparse_reads:
            return super().read_sparse_nowait(offset, length)
        data = self.read_nowait(offset, length)  # a device that never reports holes
        return None if data is None else [(offset, length, data)]

    async def read_sparse(self, offset: int, length: int) -> Sequence[Segment]:
        if self.sparse_reads:
            return await super().read_sparse(offset, length)
        return [(offset, length, await self.read(offset, length))]

    async def contents(self, offset: int, length: int) -> bytes:
        return bytes(await self.read(offset, length))


NODE_KINDS = ("memory", "raw", "chain")


@dataclass
class Volume:
    info: ExportInfo
    node: VectorNode | RealNode
    access: str = "full"


class Catalog:
    """The vector's exports, described the way the export registry describes a volume, and
    seen through the connecting client's access rules as the registry's per-client view does."""

    def __init__(self, volumes: Iterable[Volume]) -> None:
        self.volumes = {v.info.name: v for v in volumes}

    def lookup(self, name: str) -> ExportInfo | ExportDenied | None:
        vol = self.volumes.get(name)
        if vol is None:
            return None
        if vol.access == "denied":
            return ExportDenied(name, "denied by the vector")
        if vol.access == "read-only":
            return dataclasses.replace(vol.info, read_only=True)
        return vol.info

    def listing(self) -> Iterable[tuple[str, str]]:
        return [(v.info.name, v.info.description) for v in self.volumes.values() if v.access != "denied"]


async def _initial_data(node: BlockNode, spec: dict[str, Any]) -> None:
    for item in spec.get("data", []):
        await node.write(item["offset"], bytes.fromhex(item["hex"]))
    await node.flush()


async def raw_node(spec: dict[str, Any], where: Path) -> BlockNode:
    """A sparse raw file holding the vector's data, opened as the export wants it."""
    path = str(where / f"{uuid.uuid4().hex}.raw")
    RawFileNode.create(path, spec["size"])
    writer = RawFileNode(path)
    await _initial_data(writer, spec)
    await writer.close()
    return RawFileNode(path, read_only=spec.get("read_only", False))


async def chain_node(spec: dict[str, Any], where: Path) -> BlockNode:
    """Two layers: a base with the vector's data (read-only now, as a snapshot's layer is)
    and an empty head that takes the writes; reads of old data go down the chain."""
    size, pool = spec["size"], str(where)
    base_id, head_id = uuid.uuid4().hex, uuid.uuid4().hex
    Layer.create(REAL, pool, base_id, size)
    base = Layer.open(REAL, pool, base_id, size, writable=True)
    await _initial_data(ChainNode([base], size, writable=True), spec)
    base.close()
    Layer.create(REAL, pool, head_id, size)
    head = Layer.open(REAL, pool, head_id, size, writable=True)
    base = Layer.open(REAL, pool, base_id, size, writable=False)
    return ChainNode([head, base], size, writable=not spec.get("read_only", False))


async def make_volume(spec: dict[str, Any], kind: str = "memory", where: Path | None = None) -> Volume:
    node: VectorNode | RealNode
    if kind == "memory":
        node = VectorNode(
            spec["size"],
            read_only=spec.get("read_only", False),
            fast_zero=spec.get("fast_zero", True),
            sparse_reads=spec.get("sparse_reads", False),
        )
        await _initial_data(node, spec)
        node.flushes = 0
    else:
        assert where is not None
        real = await (raw_node if kind == "raw" else chain_node)(spec, where)
        node = RealNode(
            real, fast_zero=spec.get("fast_zero", True), sparse_reads=spec.get("sparse_reads", False)
        )
    caps = node.capabilities()  # flags and block sizes come from capabilities, as in the registry
    info = ExportInfo(
        name=spec["name"],
        size=node.size,
        description=spec.get("description", ""),
        read_only=not caps.writable,
        can_flush=caps.can_flush,
        can_fua=caps.can_fua,
        can_trim=caps.can_trim,
        can_zero=caps.can_zero,
        can_fast_zero=caps.can_fast_zero,
        can_cache=caps.can_cache,
        can_multi_conn=caps.can_multi_conn,
        min_block=caps.min_block,
        pref_block=caps.pref_block,
        max_block=caps.max_block,
        contexts=(BASE_ALLOCATION,) if caps.can_extents else (),
    )
    return Volume(info, node, spec.get("access", "full"))


# ---------------------------------------------------------------- the in-memory server


def describe(ev: object) -> dict[str, Any]:
    """An event in the vectors' language-neutral form."""
    if isinstance(ev, Negotiated):
        return {
            "event": "negotiated",
            "export": ev.export.name,
            "size": ev.export.size,
            "transmission_flags": ev.transmission_flags,
            "structured": ev.structured,
            "contexts": {str(k): name for k, name in ev.contexts.items()},
        }
    if isinstance(ev, OptionRefused):
        return {"event": "option_refused", "option": ev.option, "reply": ev.reply}
    if isinstance(ev, AccessDenied):
        return {"event": "access_denied", "option": ev.option, "export": ev.export}
    if isinstance(ev, Aborted):
        return {"event": "aborted"}
    if isinstance(ev, StartTLS):
        return {"event": "starttls"}
    assert isinstance(ev, Command), ev
    out: dict[str, Any] = {"event": "command", "command": _COMMAND_NAMES[type(ev)]}
    if isinstance(ev, UnknownCmd):
        out["type"] = ev.type
    out.update(cookie=ev.cookie, flags=ev.flags, offset=ev.offset, length=ev.length)
    return out


@dataclass
class Server:
    """One connection's server side: the codec plus the dispatcher, run one request at a time
    (a legal schedule of the real session, which may also overlap requests)."""

    catalog: Catalog
    conn: ServerConnection = field(init=False)
    out: bytearray = field(default_factory=bytearray)
    events: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False
    disp: Dispatcher | None = None

    def __post_init__(self) -> None:
        self.conn = ServerConnection(self.catalog)
        self.out += self.conn.data_to_send()

    def emit(self, buffers: Iterable[bytes | bytearray | memoryview]) -> None:
        for b in buffers:
            self.out += b

    async def receive(self, data: bytes) -> None:
        if self.closed:
            return
        self.conn.receive_data(data)
        await self.pump()

    async def pump(self) -> None:
        while not self.closed:
            try:
                ev = self.conn.next_event()
            except ProtocolError:
                self.closed = True  # hard disconnect
                return
            self.out += self.conn.data_to_send()
            if ev is None:
                await self.settle()
                return
            self.events.append(describe(ev))
            if isinstance(ev, Aborted) or (isinstance(ev, AccessDenied) and ev.closed):
                self.closed = True
            elif isinstance(ev, Negotiated):
                vol = self.catalog.volumes[ev.export.name]
                tx = self.conn.transmission
                assert tx is not None
                self.disp = Dispatcher(vol.node, ev.export.size, ev.transmission_flags, tx, ev.contexts)
            elif isinstance(ev, Command):
                await self.command(ev)

    async def command(self, cmd: Command) -> None:
        disp = self.disp
        assert disp is not None
        if isinstance(cmd, DiscCmd):  # no reply; flush what this session left unflushed, close
            if disp.unflushed:
                await disp.node.flush()
                disp.unflushed = False
            self.closed = True
            return
        out = disp.serve_inline(cmd)  # what the session does: validate, then inline or not
        self.emit(out if out is not None else await disp.run(cmd))

    async def settle(self) -> None:
        """FUA writes taken inline are answered once the requests at hand are (as the
        session does at the end of a receive)."""
        disp = self.disp
        if disp is None or not disp.fua_pending:
            return
        out = disp.settle_fua()
        if out is None:
            pending, disp.fua_pending = disp.fua_pending, []
            out = await disp.settle_fua_later(pending)
        self.emit(out)


# ---------------------------------------------------------------- running a vector


def step_bytes(step: dict[str, Any]) -> bytes:
    return bytes(step["zeros"]) if "zeros" in step else bytes.fromhex(step["hex"])


def pieces(data: bytes, bytewise: bool) -> Iterable[bytes]:
    size = 1 if bytewise and len(data) <= BYTEWISE_LIMIT else WHOLE_PIECE
    for i in range(0, len(data), size):
        yield data[i : i + size]


def hexdiff(want: bytes, got: bytes) -> str:
    at = next(
        (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got))
    )
    lo = max(0, at - 16)
    return (
        f"first difference at byte {at}:\n  want {want[lo : at + 32].hex()}\n  got  {got[lo : at + 32].hex()}"
    )


async def run_vector(
    vector: dict[str, Any], bytewise: bool, kind: str = "memory", where: Path | None = None
) -> Server:
    volumes = [await make_volume(e, kind, where) for e in vector["exports"]]
    server = Server(Catalog(volumes))
    for i, step in enumerate(vector["steps"]):
        data = step_bytes(step)
        where = f"step {i} ({step['dir']}: {step['note']})"
        if step["dir"] == "c2s":
            assert not server.closed, f"{where}: the server has already closed the connection"
            for piece in pieces(data, bytewise):
                await server.receive(piece)
        else:
            got = bytes(server.out[: len(data)])
            assert got == data, f"{where}: server sent other bytes; {hexdiff(data, got)}"
            del server.out[: len(data)]
    assert not server.out, f"server sent {len(server.out)} unexpected bytes: {bytes(server.out[:64]).hex()}"
    return server


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def vector_id(path: Path) -> str:
    return str(path.relative_to(VECTOR_DIR).with_suffix(""))


def vector_params() -> list[Any]:
    out = []
    for path in VECTORS:
        for kind in NODE_KINDS:
            reason = KNOWN_FAILURES.get((vector_id(path), kind))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(path, kind, id=f"{vector_id(path)}-{kind}", marks=marks))
    return out


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for every real node (chain layers get their I/O threads per directory)."""
    return tmp_path_factory.mktemp("golden-pool")


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(("path", "kind"), vector_params())
async def test_vector(path: Path, bytewise: bool, kind: str, pool_dir: Path) -> None:
    vector = load(path)
    server = await run_vector(vector, bytewise, kind, pool_dir)
    nodes = {name: vol.node for name, vol in server.catalog.volumes.items()}
    try:
        expect = vector["expect"]
        assert server.events == expect["events"]
        assert server.closed == expect["closed"]
        for name, n in expect.get("flushes", {}).items():
            assert nodes[name].flushes == n, f"export {name!r} flushed {nodes[name].flushes} times, want {n}"
        for item in expect.get("data", []):
            want = bytes.fromhex(item["hex"])
            off = item["offset"]
            node = nodes[item["export"]]
            got = (
                bytes(node.data[off : off + len(want)])
                if isinstance(node, VectorNode)
                else (await node.contents(off, len(want)))
            )
            assert got == want, f"contents of {item['export']!r}"
    finally:
        for node in nodes.values():
            await node.close()


# ---------------------------------------------------------------- the corpus itself


def test_corpus_covers_every_group() -> None:
    groups = {p.parent.name for p in VECTORS}
    assert groups == {"handshake", "transmission", "errors"}


@pytest.mark.parametrize("path", VECTORS, ids=vector_id)
def test_vector_matches_schema(path: Path) -> None:
    import jsonschema  # a test dependency: the schema check must not be skipped

    schema = load(VECTOR_DIR / "schema.json")
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(load(path), schema, cls=jsonschema.Draft202012Validator)


def test_vectors_are_generated_from_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed JSON is exactly what tools/gen_vectors.py makes of protocol/spec.md."""
    spec = importlib.util.spec_from_file_location("gen_vectors", ROOT / "tools" / "gen_vectors.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gen_vectors", gen)  # dataclasses look their module up
    spec.loader.exec_module(gen)
    files: dict[Path, str] = gen.generate()
    assert sorted(files) == VECTORS, "run: python tools/gen_vectors.py"
    stale = [str(p.relative_to(ROOT)) for p, text in files.items() if p.read_text(encoding="utf-8") != text]
    assert not stale, f"stale vectors (run: python tools/gen_vectors.py): {stale}"
