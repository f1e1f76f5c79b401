"""What the file backend's parts share: the catalog, the open layers, the host, and the
removal of files that must finish even when their caller is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from blockvirt.storage import executor
from blockvirt.storage.backend import BackendHost
from blockvirt.storage.backends.cowfile.chain import ChainNode
from blockvirt.storage.backends.cowfile.layer import layer_paths
from blockvirt.storage.backends.cowfile.registry import LayerRegistry
from blockvirt.storage.catalog import Catalog, LayerRecord
from blockvirt.storage.export import Export
from blockvirt.storage.fileio import FileIO


@dataclass
class FileState:
    catalog: Catalog
    io: FileIO
    layers: LayerRegistry
    host: BackendHost
    #: Serialises tree edits and the commit steps of background work (the manager's lock).
    lock: asyncio.Lock
    _unlinks: set[asyncio.Future[None]] = field(default_factory=set)

    # ------------------------------------------------------------ open nodes
    def chain_exports(self) -> list[Export]:
        """Open exports served by this backend (their base is a chain node)."""
        return [e for e in self.host.exports() if isinstance(e.base, ChainNode)]

    def nodes_headed_by(self, layer_id: str) -> list[ChainNode]:
        out = []
        for e in self.chain_exports():
            node = e.base
            assert isinstance(node, ChainNode)
            if node.head.id == layer_id:
                out.append(node)
        return out

    async def drain_layers(self, layer_ids: set[str], drains: contextlib.AsyncExitStack) -> list[Export]:
        """Drain every open export whose chain holds one of the layers, including exports
        opened while we waited (they open without the lock): a chain edit must reach them."""
        affected: list[Export] = []
        while True:
            more = []
            for e in self.chain_exports():
                node = e.base
                assert isinstance(node, ChainNode)
                if all(e is not a for a in affected) and any(lay.id in layer_ids for lay in node.layers):
                    more.append(e)
            if not more:
                return affected
            for e in more:
                node = e.base
                assert isinstance(node, ChainNode)
                await node.commit_frozen()  # no commit may be pending on a layer we drop
                await drains.enter_async_context(e.drained())
            affected += more

    # ------------------------------------------------------------ files
    def layer_allocated(self, layer_id: str) -> int:
        """Bytes a layer's data file holds in its pool: fstat if open, else stat. Never opens
        a layer (metrics and pool figures call this at scrape time)."""
        lay = self.layers.get(layer_id)
        if lay is not None:
            return lay.allocated_bytes()
        rec = self.catalog.layer(layer_id)
        if rec is None:
            return 0
        try:
            return os.stat(layer_paths(self.catalog.layer_dir(rec), rec.id)[0]).st_blocks * 512
        except OSError:
            return 0

    async def delete_files(self, rec: LayerRecord) -> None:
        """Remove the files of a layer whose catalog row is gone. Runs to the end even if the
        caller is cancelled (a stop): nothing would remove them later."""
        await self.unlink(self.layers.delete_files, rec)

    async def unlink(self, fn: Callable[..., None], *args: object) -> None:
        """Remove files off the loop, to the end even if the caller is cancelled (close()
        waits for what is left)."""
        fut = asyncio.get_running_loop().run_in_executor(executor.pool(), fn, *args)
        self._unlinks.add(fut)
        fut.add_done_callback(self._unlinks.discard)
        await asyncio.shield(fut)

    async def wait_unlinks(self) -> None:
        if self._unlinks:
            await asyncio.wait(set(self._unlinks))
