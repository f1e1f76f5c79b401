"""Sans-I/O NBD protocol: bytes in, typed events out; no sockets, no asyncio, no clock."""

from __future__ import annotations

from blockvirt.nbd.connection import ClientConnection, ServerConnection
from blockvirt.nbd.events import ExportDenied, ExportInfo, ExportUnavailable
from blockvirt.nbd.handshake import ExportCatalog, TLSMode

__all__ = [
    "ClientConnection",
    "ExportCatalog",
    "ExportDenied",
    "ExportInfo",
    "ExportUnavailable",
    "ServerConnection",
    "TLSMode",
]
