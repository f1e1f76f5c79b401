"""Names of the metadata contexts in qemu's `qemu:dirty-bitmap:` family (pure).

A blockvirt export offers one such context per older snapshot of its branch, named after the
snapshot: `qemu:dirty-bitmap:S1` on `VOL@S2` marks what changed between S1 and S2.
"""

from __future__ import annotations

from blockvirt.nbd.constants import QEMU_DIRTY_BITMAP


def dirty_bitmap_context(bitmap: str) -> str:
    return QEMU_DIRTY_BITMAP + bitmap


def dirty_bitmap_name(context: str) -> str | None:
    """The bitmap a `qemu:dirty-bitmap:NAME` context names, or None for any other context
    (and for the bare prefix, which names no bitmap)."""
    if context.startswith(QEMU_DIRTY_BITMAP) and len(context) > len(QEMU_DIRTY_BITMAP):
        return context[len(QEMU_DIRTY_BITMAP) :]
    return None
