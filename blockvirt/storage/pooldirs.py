"""Where pool directories really are. Two pools that reach one directory (through a symlink,
or a bind mount) would each see the other's layer files as strangers, and the sweep of
orphan files at start would remove both pools' data: every check of a pool's path compares
real paths, and the identity (device, inode) of directories that exist."""

from __future__ import annotations

import os
from collections.abc import Iterable

from blockvirt.storage.catalog import FILE_BACKEND, PoolRecord

DirId = tuple[int, int]


def real(path: str) -> str:
    """The absolute path with every symlink resolved (missing tail components kept as given)."""
    return os.path.realpath(os.path.abspath(path))


def nested(a: str, b: str) -> bool:
    """Whether one of two absolute paths is the other or inside it (by name)."""
    a, b = a.rstrip(os.sep) + os.sep, b.rstrip(os.sep) + os.sep
    return a.startswith(b) or b.startswith(a)


def overlap(a: str, b: str) -> bool:
    """Whether two paths are, or hold, one another: as written, after resolving symlinks, or
    (when both exist) by being the very same directory."""
    if nested(os.path.abspath(a), os.path.abspath(b)) or nested(real(a), real(b)):
        return True
    ia, ib = identity(a), identity(b)
    return ia is not None and ia == ib


def identity(path: str) -> DirId | None:
    """(device, inode) of the directory `path` leads to, or None if it cannot be reached."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def shared(pools: Iterable[PoolRecord]) -> dict[str, list[str]]:
    """File pools whose directory is one another's: pool name -> the other pools on its
    directory (only pools that share one appear)."""
    by_dir: dict[DirId, list[str]] = {}
    for p in pools:
        if p.backend != FILE_BACKEND or not p.path:
            continue
        key = identity(p.path)
        if key is not None:
            by_dir.setdefault(key, []).append(p.name)
    out: dict[str, list[str]] = {}
    for names in by_dir.values():
        if len(names) > 1:
            for n in names:
                out[n] = [m for m in names if m != n]
    return out
