"""RbdNode: a volume's head (writable) or one snapshot (read-only) served from an RBD image.

The image opens on first use (open() of the seam is synchronous; a handshake must not wait
for Ceph), so the first request of the first session waits for it. Every request goes
through librbd's aio calls (image.py), never blocking the loop. Plain reads and writes are
started from the session's parse loop and answered by callback (read_submit/write_submit),
without a task each; the rest, and those that find no free slot, await.

Zeroing: on a thin volume a zeroed or trimmed range gives its space back (write_zeroes frees
whole objects); NBD_CMD_WRITE_ZEROES with NO_HOLE, and every zeroing of a thick volume,
writes real zeros so the space stays allocated.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Sequence

from blockvirt.storage.backends.rbd.errors import RbdError
from blockvirt.storage.backends.rbd.image import AsyncImage
from blockvirt.storage.node import HOLE, BlockNode, Buffer, Capabilities, ReadDone, StorageError, WriteDone

log = logging.getLogger("blockvirt.rbd")

#: At most this many bytes are mapped per block-status request (clients ask again): librbd's
#: exact diff costs about 13 ms per GiB of allocated data.
BLOCK_STATUS_SPAN = 1 << 30
#: Zeros are written in pieces of at most this size (thick volumes, NO_HOLE).
ZERO_CHUNK = 4 << 20
_ZEROS = bytes(ZERO_CHUNK)


class RbdNode(BlockNode):
    def __init__(
        self,
        opener: Callable[[], Awaitable[AsyncImage]],
        size: int,
        *,
        writable: bool,
        thick: bool,
        label: str,
        on_lost: Callable[[RbdError], None] | None = None,
        volume: str,
    ) -> None:
        self._opener = opener
        #: Told when an op fails because this node may no longer write the image (fenced, or
        #: its lock taken): the backend stops serving it.
        self._on_lost = on_lost
        self._opening: asyncio.Task[AsyncImage] | None = None
        self._image: AsyncImage | None = None
        self._size = size
        self.writable = writable
        self.thick = thick
        self.label = label
        self.volume = volume
        #: Why this node may no longer serve the volume (fenced, moved, its lock taken): final,
        #: every request gets ESHUTDOWN so the client reconnects to the node that has it.
        self.failed: str | None = None
        #: Why the last open of the image failed (e.g. removed outside blockvirt), or None:
        #: each request tries again and gets that error; `volume info` shows it meanwhile.
        self.open_error: str | None = None

    # ------------------------------------------------------------ image
    async def image(self) -> AsyncImage:
        if self.failed is not None:
            raise StorageError(errno.ESHUTDOWN, f"{self.label}: {self.failed}")
        if self._image is not None and self._image.closed:
            # Closed under us with its Ceph client (replaced after a fencing): a snapshot
            # reopens on the new one. A head never gets here: it is failed first.
            self._image = self._opening = None
        if self._image is not None:
            return self._image
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._opener())
        opening = self._opening  # close() may drop it meanwhile
        try:
            img = await asyncio.shield(opening)
        except BaseException as e:
            if opening.done() and self._opening is opening:
                self._opening = None  # a later request tries again
            if isinstance(e, StorageError) and self.open_error != str(e):
                self.open_error = str(e)  # logged once, and shown until an open works
                log.error("%s", e, extra={"volume": self.label})
            raise
        if self._opening is not opening or self.failed is not None:
            # Closed (handed off, evicted) while it opened: this image is not ours to use.
            await img.close()
            raise StorageError(errno.ESHUTDOWN, f"{self.label}: {self.failed or 'closed'}")
        self._image = img
        self.open_error = None
        if img.size != self._size:  # resized by another node since the catalog said
            self._size = img.size
        return img

    @property
    def opened(self) -> AsyncImage | None:
        return self._image

    @property
    def size(self) -> int:
        return self._size

    def set_size(self, size: int) -> None:
        self._size = size

    def capabilities(self) -> Capabilities:
        return Capabilities(writable=self.writable, can_cache=False)

    def lost(self, e: RbdError) -> None:
        """An op failed: if it says this node may no longer write, stop and tell the backend."""
        if e.lock_lost and self.failed is None:
            self.failed = f"this node lost the volume ({e})"
            if self._on_lost is not None:
                self._on_lost(e)

    # ------------------------------------------------------------ I/O
    # Reads and writes start at once from the session's parse loop when the image is open
    # and has a free slot (see BlockNode.read_submit); else they await below.
    def read_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        img = self._image
        if img is None or img.closed or self.failed is not None:
            return False

        def ended(data: Buffer | None, err: RbdError | None) -> None:
            if err is not None:
                self.lost(err)
            done(data, err)

        return img.read_submit(offset, length, ended)

    def write_submit(self, offset: int, data: Buffer, done: WriteDone) -> bool:
        img = self._image
        if img is None or img.closed or self.failed is not None or not self.writable:
            return False

        def ended(err: RbdError | None) -> None:
            if err is not None:
                self.lost(err)
            done(err)

        return img.write_submit(data, offset, ended)

    async def read(self, offset: int, length: int) -> Buffer:
        img = self._image  # the open image without a coroutine per request
        if img is None or img.closed or self.failed is not None:
            img = await self.image()
        try:
            return await img.read(offset, length)
        except RbdError as e:
            self.lost(e)
            raise

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        img = self._image
        if img is None or img.closed or self.failed is not None:
            img = await self.image()
        try:
            await img.write(data, offset, fua)
        except RbdError as e:
            self.lost(e)
            raise

    async def zero(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        try:
            await self._zero(offset, length, may_trim)
        except RbdError as e:
            self.lost(e)
            raise

    async def _zero(self, offset: int, length: int, may_trim: bool) -> None:
        img = await self.image()
        if may_trim and not self.thick:
            await img.write_zeroes(offset, length)
            return
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            await img.write(_ZEROS[:n] if n < ZERO_CHUNK else _ZEROS, offset)
            offset += n

    async def fast_zero_possible(self) -> bool:
        return not self.thick  # a thick volume writes its zeros

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # write_zeroes rather than discard: discard skips pieces under 64 KiB, which would
        # then keep their old data; file pools always read a trimmed range as zeros.
        await self.zero(offset, length, may_trim=True, fua=fua)

    async def flush(self) -> None:
        if self.writable and self._image is not None:
            try:
                await self._image.flush()
            except RbdError as e:
                self.lost(e)
                raise

    async def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        length = min(length, BLOCK_STATUS_SPAN, self._size - offset)
        return await (await self.image()).allocation(offset, length)

    async def allocation_depth(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        # librbd tells allocated from not, counting a clone's parent as allocated: depth 1.
        return [(n, 0 if flags & HOLE else 1) for n, flags in await self.block_status(offset, length)]

    async def close(self) -> None:
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
        if self._image is not None:
            img, self._image = self._image, None
            await img.close()

    def allocated_bytes(self) -> int:
        return 0  # figures come from the backend's periodic look (librbd answers slowly)
