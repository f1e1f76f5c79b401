"""Errors of the RBD layer.

Two families, because callers handle them differently:

- CephError: the cluster or the pool cannot be used at all (bad config, unreachable, no
  such pool, no permission). It carries a short `kind` for the API and one readable line.
- StorageError (from blockvirt.storage.node): one operation failed. Its errno is what the NBD
  edge maps; RbdError adds the errno Ceph returned so logs keep the real cause.

Errno choices for I/O: a blocklisted client gets ESHUTDOWN (Ceph's EBLOCKLISTED is 108, the
same number), a lock held by another client EROFS: both mean "stop serving this volume"
and are told apart with `fenced`. A full pool is ENOSPC, a quota EDQUOT. Timeouts and
anything unknown are EIO (the message says "timed out").
"""

from __future__ import annotations

import errno as _errno
import os

from blockvirt.storage.node import StorageError

#: Ceph's EBLOCKLISTED: the client instance was fenced by `osd blocklist`.
EBLOCKLISTED = _errno.ESHUTDOWN

#: CephError kinds.
KINDS = (
    "bad-config",  # the config file is missing or unreadable, or a setting is invalid
    "unreachable",  # no monitor answered within the connect timeout
    "no-pool",  # the pool does not exist
    "permission",  # the user may not use the cluster or the pool
    "not-rbd-pool",  # the pool exists but `rbd pool init` was never run on it
    "no-namespace",  # the RBD namespace asked for does not exist in the pool
    "fenced",  # this client instance was blocklisted
    "timeout",  # a cluster command did not answer in time
    "closed",  # the connection was closed
    "error",  # anything else (the message says what)
)


class CephError(Exception):
    """The cluster or pool cannot be used; `kind` is one of KINDS, `errno` the cause if known."""

    def __init__(self, kind: str, message: str, errno: int = _errno.EIO) -> None:
        super().__init__(message)
        self.kind = kind
        self.errno = errno

    def __str__(self) -> str:
        return f"ceph {self.kind}: {self.args[0]}"


class RbdError(StorageError):
    """An RBD operation failed. `errno` is the mapped host errno, `ceph_errno` Ceph's own."""

    def __init__(self, errno: int, message: str, ceph_errno: int) -> None:
        super().__init__(errno, message)
        self.ceph_errno = ceph_errno

    @property
    def fenced(self) -> bool:
        """This client was blocklisted: the connection must be replaced (reconnect())."""
        return self.ceph_errno == EBLOCKLISTED

    @property
    def lock_lost(self) -> bool:
        """Another client owns the image's exclusive lock (or we were fenced)."""
        return self.ceph_errno in (_errno.EROFS, EBLOCKLISTED)


_KEEP = {
    _errno.ENOSPC,
    _errno.EDQUOT,
    _errno.EROFS,
    _errno.EINVAL,
    _errno.ENOENT,
    _errno.EEXIST,
    _errno.EBUSY,
    _errno.ENOTEMPTY,
    _errno.EPERM,
    _errno.EACCES,
    _errno.ECANCELED,
    _errno.EFBIG,
    _errno.ENOTSUP,
    _errno.ENOSYS,
}


def _describe(code: int) -> str:
    if code == EBLOCKLISTED:
        return "client is blocklisted (fenced)"
    if code == _errno.ETIMEDOUT:
        return "timed out"
    if code == _errno.EROFS:
        return "read-only: another client holds the exclusive lock"
    return os.strerror(code)


def rbd_error(code: int, what: str) -> RbdError:
    """The StorageError for Ceph's return code `code` (negative or positive) of `what`."""
    code = abs(code)
    if code == EBLOCKLISTED:
        mapped = _errno.ESHUTDOWN
    elif code in _KEEP:
        mapped = code
    else:
        mapped = _errno.EIO
    return RbdError(mapped, f"{what}: {_describe(code)}", code)


def from_exception(e: BaseException, what: str) -> StorageError:
    """Map an exception raised by the rados/rbd bindings (they carry .errno) to StorageError."""
    if isinstance(e, StorageError):
        return e
    code = getattr(e, "errno", None)
    if isinstance(e, KeyError):  # metadata_get and config_get raise KeyError for a missing key
        code = _errno.ENOENT
    if not isinstance(code, int) or code == 0:
        return RbdError(_errno.EIO, f"{what}: {e}", _errno.EIO)
    return rbd_error(code, what)
