#!/usr/bin/python3
"""Incremental backup over NBD: copy into a backup image only what changed since the last one.

    incremental.py URI SINCE IMAGE

URI is the point to back up, usually a snapshot export (nbd://HOST:PORT/VOL@NEW), SINCE the
snapshot the previous backup was taken at, and IMAGE that backup (a raw file), which is
brought up to date in place. The changed extents come from the export's
`qemu:dirty-bitmap:SINCE` metadata context (NBD_STATE_DIRTY = 1), so this works against any
server exporting a qemu-style dirty bitmap (qemu-nbd -B, libvirt pull backups, blockvirt).
See docs/backup.md for the whole recipe.

Needs only libnbd's Python binding (Debian: python3-libnbd). Exit status 0 on success, 1 on
failure (message on stderr), 2 if the server does not offer the context (take a full copy).
"""

from __future__ import annotations

import argparse
import os
import sys

import nbd

DIRTY = 1  # NBD_STATE_DIRTY
#: Longest block-status request and longest read (both well inside NBD's limits).
SPAN = 1 << 30
CHUNK = 4 << 20


def dirty_extents(h: nbd.NBD, context: str, size: int) -> list[tuple[int, int]]:
    """(offset, length) of every dirty extent, asking the server span by span."""
    out: list[tuple[int, int]] = []
    got: list[int] = []

    def status(meta: str, _off: int, entries: list[int], _err: int) -> int:
        if meta == context:
            got.extend(entries)
        return 0

    offset = 0
    while offset < size:
        got.clear()
        h.block_status(min(SPAN, size - offset), offset, status)
        if not got:
            raise RuntimeError(f"the server answered no extent for {context} at {offset}")
        for length, flags in zip(got[0::2], got[1::2], strict=True):
            length = min(length, size - offset)  # a server may describe past the request
            if flags & DIRTY:
                out.append((offset, length))
            offset += length
            if offset >= size:
                break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("uri", help="the export to back up, e.g. nbd://127.0.0.1:10809/vm1@b2")
    ap.add_argument("since", help="the snapshot the previous backup was taken at")
    ap.add_argument("image", help="the previous backup (raw), updated in place")
    args = ap.parse_args(argv)
    context = f"qemu:dirty-bitmap:{args.since}"

    h = nbd.NBD()
    h.add_meta_context(context)
    try:
        h.connect_uri(args.uri)
        if not h.can_meta_context(context):
            print(f"incremental.py: {args.uri} does not offer {context}: take a full copy", file=sys.stderr)
            return 2
        size = h.get_size()
        extents = dirty_extents(h, context, size)
        fd = os.open(args.image, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)  # the volume may have grown (or shrunk) since
            for offset, length in extents:
                for pos in range(offset, offset + length, CHUNK):
                    n = min(CHUNK, offset + length - pos)
                    os.pwrite(fd, h.pread(n, pos), pos)
            os.fsync(fd)
        finally:
            os.close(fd)
        h.shutdown()
    except (nbd.Error, OSError, RuntimeError) as e:
        print(f"incremental.py: {e}", file=sys.stderr)
        return 1
    copied = sum(length for _, length in extents)
    print(f"{len(extents)} changed extent(s), {copied} of {size} bytes copied into {args.image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
