"""One exception tree for the protocol layer.

`RemoteProtocolError` means the peer broke a MUST and the connection has to go; `CommandError`
is a per-request failure the connection survives; `LocalProtocolError` is our own misuse of the
codec (a bug). Each carries the NBD errno it maps to on the wire.
"""

from __future__ import annotations

import errno as _errno

from blockvirt.nbd.constants import Errno


class NbdError(Exception):
    errno: Errno = Errno.EINVAL


class ProtocolError(NbdError):
    """The byte stream cannot be continued."""


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol; the connection must be closed."""


class LocalProtocolError(ProtocolError):
    """We asked the codec to do something illegal in its current state."""


class CommandError(NbdError):
    """A single request failed; the reply carries `errno` and the connection continues."""

    def __init__(self, errno: Errno, message: str = "") -> None:
        super().__init__(message or errno.name)
        self.errno = errno
        self.message = message or errno.name


# Host errno -> NBD errno. Anything unknown becomes EIO (never leak other values to the wire).
_HOST_TO_NBD: dict[int, Errno] = {
    _errno.EPERM: Errno.EPERM,
    _errno.EACCES: Errno.EPERM,
    _errno.EROFS: Errno.EPERM,
    _errno.EIO: Errno.EIO,
    _errno.ENOMEM: Errno.ENOMEM,
    _errno.EINVAL: Errno.EINVAL,
    _errno.ENOSPC: Errno.ENOSPC,
    _errno.EDQUOT: Errno.ENOSPC,
    _errno.EFBIG: Errno.ENOSPC,
    _errno.EOVERFLOW: Errno.EOVERFLOW,
    _errno.ENOTSUP: Errno.ENOTSUP,
    _errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(host_errno: int | None) -> Errno:
    """Translate an OS errno to one of the eight values NBD allows."""
    if host_errno is None:
        return Errno.EIO
    return _HOST_TO_NBD.get(host_errno, Errno.EIO)
