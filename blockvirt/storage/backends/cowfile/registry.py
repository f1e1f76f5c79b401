"""Open layers, shared by every chain that uses them (a snapshot's layer is in its volume's
chain, in its own export's chain and in every clone's chain), reference counted."""

from __future__ import annotations

import logging

from blockvirt.storage.backends.cowfile.layer import Layer, remove_layer_files
from blockvirt.storage.catalog import Catalog, LayerRecord
from blockvirt.storage.fileio import REAL, FileIO

log = logging.getLogger("blockvirt.layers")


class LayerRegistry:
    def __init__(self, catalog: Catalog, io: FileIO = REAL) -> None:
        self.catalog = catalog
        self.io = io
        self._open: dict[str, Layer] = {}
        #: Released layers whose close waits for a commit under way (Layer.close): opened
        #: again meanwhile, they are taken back rather than opened twice (two journal
        #: writers of one file would append over each other).
        self._closing: dict[str, Layer] = {}

    def get(self, layer_id: str) -> Layer | None:
        return self._open.get(layer_id)

    def acquire(self, rec: LayerRecord, *, writable: bool = False) -> Layer:
        """Open (or share) a layer; a writable request opens its journal for appending."""
        lay = self._open.get(rec.id) or self._take_back(rec.id)
        if lay is None:
            lay = Layer.open(self.io, self.catalog.layer_dir(rec), rec.id, rec.size, writable=writable)
            self._open[rec.id] = lay
        elif writable and not lay.writable:
            lay.open_journal()
        lay.refs += 1
        return lay

    def _take_back(self, layer_id: str) -> Layer | None:
        """A released layer whose close still waits for a commit, kept open after all."""
        lay = self._closing.pop(layer_id, None)
        if lay is None or not lay.close_pending:
            return None
        lay.revive()
        self._open[layer_id] = lay
        return lay

    def acquire_chain(self, head_id: str, *, writable_head: bool) -> list[Layer]:
        recs = self.catalog.chain(head_id)
        out: list[Layer] = []
        try:
            for i, rec in enumerate(recs):
                out.append(self.acquire(rec, writable=writable_head and i == 0))
        except BaseException:
            self.release_all(out)
            raise
        return out

    def replace(self, layer_id: str, new: Layer) -> Layer | None:
        """The layer's files moved (a migration): `new` takes the open layer's place and its
        references; returns the old object for the caller to close. If the layer is not open,
        `new` is not needed: it is closed, and None returned."""
        old = self._open.get(layer_id)
        if old is None:
            new.close()
            return None
        new.refs = old.refs
        old.refs = 0
        self._open[layer_id] = new
        return old

    def release(self, lay: Layer) -> None:
        lay.refs -= 1
        if lay.refs <= 0 and self._open.get(lay.id) is lay:
            del self._open[lay.id]
            lay.close()
            if lay.close_pending:
                self._closing[lay.id] = lay
            for lid in [lid for lid, c in self._closing.items() if c.closed]:
                del self._closing[lid]

    def release_all(self, layers: list[Layer]) -> None:
        for lay in layers:
            self.release(lay)

    def delete_files(self, rec: LayerRecord) -> None:
        """Remove a layer's files (it must no longer be in the catalog nor open)."""
        assert rec.id not in self._open, "delete an open layer"
        remove_layer_files(self.io, self.catalog.layer_dir(rec), rec.id)

    def open_layers(self) -> list[Layer]:
        return list(self._open.values())

    def close_all(self) -> None:
        for lay in list(self._open.values()):
            lay.close()
        self._open.clear()
