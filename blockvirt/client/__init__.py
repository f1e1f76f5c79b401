"""asyncio NBD client on the same sans-I/O codec as the server.

    async with await NbdClient.connect("nbd://127.0.0.1:10809/vol") as c:
        await c.write(0, b"hello")
        assert await c.read(0, 5) == b"hello"

Requests may be issued concurrently; replies are matched by cookie.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import urllib.parse
from types import TracebackType

from blockvirt.nbd.connection import ClientConnection
from blockvirt.nbd.constants import BASE_ALLOCATION, Cmd, CmdFlag, Errno, Opt, Rep
from blockvirt.nbd.events import ExportInfo, Extent, OptionResult, Reply
from blockvirt.nbd.exceptions import RemoteProtocolError
from blockvirt.nbd.transmission import ClientTransmission

__all__ = ["NbdClient", "NbdClientError", "list_exports", "parse_uri"]

#: How a node of a cluster says another one serves the export (docs/cluster.md).
_SERVED_AT = re.compile(r"is served by node \S+ at (\S+)")


class NbdClientError(Exception):
    """The server answered a request or option with an error."""

    def __init__(self, message: str, errno: int = 0, reply: int = 0) -> None:
        super().__init__(message)
        self.errno = errno
        self.reply = reply


def parse_uri(uri: str) -> tuple[str, int, str]:
    """nbd://HOST[:PORT]/EXPORT -> (host, port, export)."""
    u = urllib.parse.urlsplit(uri)
    if u.scheme != "nbd":
        raise ValueError(f"not an nbd:// URI: {uri!r}")
    return u.hostname or "127.0.0.1", u.port or 10809, urllib.parse.unquote(u.path.lstrip("/"))


class _Link:
    """Socket plumbing shared by the handshake helpers and the client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = ClientConnection()

    async def flush_out(self) -> None:
        out = self.conn.handshake.data_to_send()
        if out:
            self.writer.write(out)
            await self.writer.drain()

    async def option_result(self) -> OptionResult:
        while True:
            ev = self.conn.handshake.next_event()
            await self.flush_out()
            if ev is not None:
                return ev
            data = await self.reader.read(65536)
            if not data:
                raise NbdClientError("server closed the connection during the handshake")
            self.conn.receive_data(data)

    async def greet(self) -> None:
        while not self.conn.handshake.greeted:
            data = await self.reader.read(65536)
            if not data:
                raise NbdClientError("server closed the connection before greeting")
            self.conn.receive_data(data)
            self.conn.handshake.next_event()
        await self.flush_out()

    async def option(self, opt: int, data: bytes = b"") -> OptionResult:
        self.conn.handshake.send_option(opt, data)
        await self.flush_out()
        return await self.option_result()


async def _open(host: str, port: int, local_host: str | None = None) -> _Link:
    # local_host picks the source address (e.g. 127.0.0.2), for address-based access rules.
    local_addr = (local_host, 0) if local_host else None
    reader, writer = await asyncio.open_connection(host, port, local_addr=local_addr)
    link = _Link(reader, writer)
    await link.greet()
    return link


async def list_exports(
    host: str = "127.0.0.1", port: int = 10809, *, local_host: str | None = None
) -> list[tuple[str, str]]:
    link = await _open(host, port, local_host)
    try:
        res = await link.option(Opt.LIST)
        await link.option(Opt.ABORT)
        if res.reply != Rep.ACK:
            raise NbdClientError(f"LIST refused: {res.message or Rep(res.reply).name}", reply=res.reply)
        return list(res.exports)
    finally:
        link.writer.close()


class NbdClient:
    def __init__(
        self, link: _Link, export: ExportInfo, tx: ClientTransmission, contexts: dict[int, str]
    ) -> None:
        self._link = link
        self.export = export
        self.tx = tx
        self.contexts = contexts
        self._waiters: dict[int, asyncio.Future[Reply]] = {}
        #: Why the connection ended (set once the reader stops): later requests fail at once.
        self._dead: str | None = None
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())
        self._closed = False

    @property
    def size(self) -> int:
        return self.export.size

    # ------------------------------------------------------------ connect
    @classmethod
    async def connect(
        cls,
        uri_or_host: str,
        port: int | None = None,
        export: str | None = None,
        *,
        structured: bool = True,
        contexts: tuple[str, ...] = (BASE_ALLOCATION,),
        local_host: str | None = None,
        fallbacks: tuple[str, ...] = (),
        attempt_timeout: float = 5.0,
    ) -> NbdClient:
        """Open an export. With `fallbacks` (more nbd:// URIs of the same export on other
        nodes of a cluster), a node that cannot be reached, does not answer within
        `attempt_timeout` seconds (a hung node accepts TCP connections but never greets) or
        says another node serves the export is skipped: the node it names is tried next,
        then the others in turn."""
        if fallbacks:
            return await cls._connect_any(
                uri_or_host, fallbacks, structured=structured, contexts=contexts, local_host=local_host,
                attempt_timeout=attempt_timeout,
            )  # fmt: skip
        if uri_or_host.startswith("nbd://"):
            host, p, name = parse_uri(uri_or_host)
        else:
            host, p, name = uri_or_host, port or 10809, export or ""
        link = await _open(host, p, local_host)
        try:
            sr = False
            if structured:
                res = await link.option(Opt.STRUCTURED_REPLY)
                sr = res.reply == Rep.ACK
            selected: dict[int, str] = {}
            if sr and contexts:
                link.conn.handshake.meta_context(name, contexts)
                await link.flush_out()
                res = await link.option_result()
                if res.reply == Rep.ACK:
                    selected = dict(res.contexts)
            link.conn.handshake.go(name)
            await link.flush_out()
            res = await link.option_result()
            if res.reply != Rep.ACK or res.export is None:
                raise NbdClientError(
                    f"cannot open export {name!r}: {res.message or Rep(res.reply).name}", reply=res.reply
                )
        except BaseException:
            link.writer.close()
            raise
        tx = link.conn.start_transmission(sr)
        return cls(link, res.export, tx, selected)

    @classmethod
    async def _connect_any(
        cls,
        first: str,
        fallbacks: tuple[str, ...],
        *,
        structured: bool,
        contexts: tuple[str, ...],
        local_host: str | None,
        attempt_timeout: float,
    ) -> NbdClient:
        queue = [first, *fallbacks]
        tried: list[str] = []
        errors: list[str] = []
        while queue:
            uri = queue.pop(0)
            if uri in tried:
                continue
            tried.append(uri)
            try:
                return await asyncio.wait_for(
                    cls.connect(uri, structured=structured, contexts=contexts, local_host=local_host),
                    attempt_timeout,
                )
            except TimeoutError:
                errors.append(f"{uri}: no answer within {attempt_timeout:g} s")
            except (OSError, NbdClientError) as e:
                errors.append(f"{uri}: {e}")
                m = _SERVED_AT.search(str(e))
                if m is not None:  # go where the node said the export is served
                    _, _, name = parse_uri(uri)
                    queue.insert(0, f"nbd://{m.group(1)}/{name}")
        raise NbdClientError("no node could open the export: " + "; ".join(errors))

    @staticmethod
    async def info(uri: str, *, local_host: str | None = None) -> ExportInfo:
        """NBD_OPT_INFO: the export's current size and flags without opening it."""
        host, port, name = parse_uri(uri)
        link = await _open(host, port, local_host)
        try:
            link.conn.handshake.go(name, info=True)
            await link.flush_out()
            res = await link.option_result()
            await link.option(Opt.ABORT)
        finally:
            link.writer.close()
        if res.reply != Rep.ACK or res.export is None:
            raise NbdClientError(f"cannot query export {name!r}: {res.message}", reply=res.reply)
        return res.export

    # ------------------------------------------------------------ requests
    async def _read_loop(self) -> None:
        reader = self._link.reader
        err: BaseException = NbdClientError("connection closed by server")
        try:
            while True:
                ev = self.tx.next_event()
                if ev is not None:
                    fut = self._waiters.pop(ev.cookie, None)
                    if fut is not None and not fut.done():
                        fut.set_result(ev)
                    continue
                data = await reader.read(1 << 20)
                if not data:
                    break
                self.tx.receive_data(data)
        except (RemoteProtocolError, ConnectionError) as e:
            err = e
        self._dead = str(err)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(NbdClientError(str(err)))
        self._waiters.clear()

    async def request(
        self, cmd: int, offset: int = 0, length: int = 0, data: bytes | None = None, flags: int = 0
    ) -> Reply:
        if self._closed:
            raise NbdClientError("client is closed")
        if self._dead is not None:
            raise NbdClientError(self._dead)
        cookie, out = self.tx.request(cmd, offset, length, data, flags)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiters[cookie] = fut
        self._link.writer.writelines(out)
        await self._link.writer.drain()
        reply = await fut
        if reply.error:
            name = Errno(reply.error).name if reply.error in Errno._value2member_map_ else str(reply.error)
            raise NbdClientError(f"{Cmd(cmd).name} failed: {name} {reply.message}".strip(), reply.error)
        return reply

    async def read(self, offset: int, length: int, *, df: bool = False) -> bytes:
        reply = await self.request(Cmd.READ, offset, length, flags=CmdFlag.DF if df else 0)
        return reply.data or b""

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self.request(Cmd.WRITE, offset, data=data, flags=CmdFlag.FUA if fua else 0)

    async def flush(self) -> None:
        await self.request(Cmd.FLUSH)

    async def trim(self, offset: int, length: int) -> None:
        await self.request(Cmd.TRIM, offset, length)

    async def zero(self, offset: int, length: int, *, no_hole: bool = False, fast: bool = False) -> None:
        flags = (CmdFlag.NO_HOLE if no_hole else 0) | (CmdFlag.FAST_ZERO if fast else 0)
        await self.request(Cmd.WRITE_ZEROES, offset, length, flags=flags)

    async def cache(self, offset: int, length: int) -> None:
        await self.request(Cmd.CACHE, offset, length)

    async def block_status(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> dict[str, tuple[Extent, ...]]:
        reply = await self.request(Cmd.BLOCK_STATUS, offset, length, flags=CmdFlag.REQ_ONE if req_one else 0)
        return {self.contexts.get(cid, str(cid)): ext for cid, ext in (reply.extents or {}).items()}

    async def current_size(self) -> int:
        """Ask the server for the export's size now (a fresh NBD_OPT_INFO; no reconnect)."""
        host, port = self._link.writer.get_extra_info("peername")[:2]
        info = await NbdClient.info(f"nbd://{host}:{port}/{urllib.parse.quote(self.export.name)}")
        return info.size

    async def refresh_size(self) -> int:
        """Learn the export's size now (after a live grow) and use it on this connection: the
        server accepts requests up to the volume's current size on existing connections."""
        size = await self.current_size()
        self.export = dataclasses.replace(self.export, size=size)
        return size

    async def close(self) -> None:
        """NBD_CMD_DISC, then close the socket."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ConnectionError):
            _, out = self.tx.request(Cmd.DISC)
            self._link.writer.writelines(out)
            await self._link.writer.drain()
        self._link.writer.close()
        with contextlib.suppress(ConnectionError):
            await self._link.writer.wait_closed()
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
