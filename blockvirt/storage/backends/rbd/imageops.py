"""What a volume's images need beyond RbdPool: zero-filling (thick), removal with their
snapshots (or to the RBD trash while clones read them), emptying the trash of volumes no
clone needs any more, and allocation figures. Shared by the backend and the check."""

from __future__ import annotations

import asyncio
import errno
import logging

from blockvirt.storage.backends.rbd.errors import CephError, RbdError
from blockvirt.storage.backends.rbd.image import AsyncImage
from blockvirt.storage.backends.rbd.node import ZERO_CHUNK
from blockvirt.storage.backends.rbd.pool import RbdPool
from blockvirt.storage.node import StorageError

log = logging.getLogger("blockvirt.rbd")

#: Image metadata key that marks an image as a blockvirt volume (its value: the volume's
#: name). Set before the catalog knows the volume, so an image a crash leaves behind is
#: provably blockvirt's; trashed images carry it too.
MARK = "blockvirt.volume"
#: How long Ceph keeps the watch of a client that stopped answering (the OSDs'
#: osd_client_watch_timeout, 30 s by default), plus a margin: an image closed while its
#: OSDs were away keeps such a watch, counted as a user, until then.
STALE_WATCH_WAIT = 60.0


async def fill_zeros(img: AsyncImage, size: int, start: int = 0) -> None:
    """Allocate every object of a thick volume from `start` (librbd has no preallocation)."""
    zeros = bytes(ZERO_CHUNK)
    offsets = iter(range(start, size, ZERO_CHUNK))

    async def worker() -> None:
        for off in offsets:  # shared: each offset is taken once
            n = min(ZERO_CHUNK, size - off)
            await img.write(zeros if n == ZERO_CHUNK else zeros[:n], off)

    # A few writes in flight; the first failure cancels the rest.
    async with asyncio.TaskGroup() as tg:
        for _ in range(8):
            tg.create_task(worker())


async def shrink_back(img: AsyncImage, size: int) -> None:
    """Undo a grow that could not be finished (a thick fill that ran out of space)."""
    try:
        await img.resize(size, allow_shrink=True)
    except StorageError as e:
        log.error("%s: could not shrink back to %d bytes after a failed grow: %s", img.name, size, e)


async def allocated_at(images: RbdPool, volume: str, snap: str) -> int:
    img = await images.open(volume, snapshot=snap, read_only=True)
    try:
        return sum(e.length for e in await img.diff(None, whole_object=True) if e.exists)
    finally:
        await img.close()


async def changed_bytes(images: RbdPool, volume: str, since: str, until: str) -> int:
    img = await images.open(volume, snapshot=until, read_only=True)
    try:
        return sum(e.length for e in await img.diff(since, whole_object=True))
    finally:
        await img.close()


async def remove_image(images: RbdPool, name: str, *, busy_wait: float = 0.0) -> None:
    """Remove an image and its snapshots; one whose snapshots clones still read goes to the
    RBD trash instead (librbd removes it once they are gone or flattened). An image still
    watched (open somewhere, or a stale watch: STALE_WATCH_WAIT) is tried again for up to
    `busy_wait` seconds, then refused with EBUSY and a clear message."""
    try:
        img = await images.open(name)
    except StorageError as e:
        if e.errno == errno.ENOENT:
            return
        raise
    try:
        for s in await img.snapshots():
            await img.snapshot_remove(s.name)
        await img.release_orphaned_lock()  # librbd's remove would break it: fencing us
    finally:
        await img.close()
    deadline = asyncio.get_running_loop().time() + busy_wait
    while True:
        try:
            await images.remove(name)
            return
        except RbdError as e:
            if e.errno == errno.ENOENT:
                return
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
            why = (
                "clones still read its snapshots"
                if e.errno == errno.ENOTEMPTY
                else "still watched (a stale watch?); removed from the trash later"
            )
        try:
            await images.trash_move(name)
            log.info("image %s moved to the RBD trash: %s", name, why)
            return
        except RbdError as e:
            # Neither removed nor trashed: the image has a watcher (the trash takes an
            # image whose snapshots clones read, not one a client has open).
            if e.errno != errno.EBUSY:
                raise
            if asyncio.get_running_loop().time() >= deadline:
                raise RbdError(
                    errno.EBUSY,
                    f"image {name} is still open by a client (or held by the watch of one that "
                    f"went away, which Ceph keeps for about 30 s): try again shortly",
                    errno.EBUSY,
                ) from None
        await asyncio.sleep(2.0)


async def purge_trash(images: RbdPool, *, background: bool = False) -> None:
    """Delete the volumes that waited in the RBD trash for their clones and now have none:
    with clone v2, a cloned snapshot stays (in the trash namespace) while a clone reads it,
    and goes with the last clone; the image itself stays in the trash until removed. Also
    those trashed while a stale watch held them. `background`: the periodic purge."""
    try:
        entries = await images.trash()
    except StorageError as e:
        # The periodic purge of a pool whose cluster is away would say so every minute;
        # the pool's state says it already.
        log.log(
            logging.DEBUG if background else logging.WARNING,
            "pool %s: cannot list the RBD trash: %s",
            images.name,
            e,
        )
        return
    for t in entries:
        if t.snapshots == 0 and MARK in t.metadata:  # ours, and no clone needs it any more
            try:
                await images.trash_remove(t.id)
                log.info("image %s (id %s) removed from the RBD trash", t.name, t.id)
            except StorageError as e:
                if e.errno == errno.ENOENT:
                    continue  # another node of the pool removed it first
                # Still watched (a stale watch Ceph drops within about 30 s): the next
                # purge tries again.
                level = logging.INFO if e.errno == errno.EBUSY else logging.WARNING
                log.log(level, "image %s (id %s) stays in the RBD trash for now: %s", t.name, t.id, e)


async def remove_quietly(images: RbdPool, name: str) -> None:
    try:
        await remove_image(images, name)
    except (StorageError, CephError) as e:
        log.error("image %s could not be removed after a failed create: %s", name, e)
