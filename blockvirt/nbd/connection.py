"""Facades joining the two phases: handshake hands its buffer over to transmission."""

from __future__ import annotations

from blockvirt.nbd.events import (
    Aborted,
    AccessDenied,
    Command,
    Negotiated,
    OptionRefused,
    OptionResult,
    Reply,
    StartTLS,
)
from blockvirt.nbd.handshake import ClientHandshake, ExportCatalog, ServerHandshake, TLSMode
from blockvirt.nbd.transmission import ClientTransmission, ServerTransmission

ServerEvent = StartTLS | Negotiated | Aborted | AccessDenied | OptionRefused | Command


class ServerConnection:
    """One client, server role. `receive_data` then drain `next_event` until None."""

    def __init__(
        self, catalog: ExportCatalog, *, tls: TLSMode = TLSMode.NONE, options_per_call: int | None = None
    ) -> None:
        self.handshake = ServerHandshake(catalog, tls=tls, options_per_call=options_per_call)
        self.transmission: ServerTransmission | None = None
        self.negotiated: Negotiated | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.transmission is not None:
            self.transmission.receive_data(data)
        else:
            self.handshake.receive_data(bytes(data))

    def data_to_send(self) -> bytes:
        return self.handshake.data_to_send()

    def next_event(self) -> ServerEvent | None:
        if self.transmission is not None:
            return self.transmission.next_event()
        ev = self.handshake.next_event()
        if isinstance(ev, Negotiated):
            self.negotiated = ev
            self.transmission = ServerTransmission(ev.structured, self.handshake.buffer)
        return ev


class ClientConnection:
    """One server, client role."""

    def __init__(self) -> None:
        self.handshake = ClientHandshake()
        self.transmission: ClientTransmission | None = None

    def receive_data(self, data: bytes) -> None:
        if self.transmission is not None:
            self.transmission.receive_data(data)
        else:
            self.handshake.receive_data(data)

    def start_transmission(self, structured: bool) -> ClientTransmission:
        self.transmission = ClientTransmission(structured, self.handshake.buffer)
        return self.transmission

    def next_event(self) -> OptionResult | Reply | None:
        if self.transmission is not None:
            return self.transmission.next_event()
        return self.handshake.next_event()
