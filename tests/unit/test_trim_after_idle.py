"""The server gives freed memory back once no bytes were in flight for a whole period, and a
busy server does not arm or cancel a timer per request to know that."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from blockvirt.server import listener
from blockvirt.server.exports import ExportRegistry
from blockvirt.server.listener import NbdServer

PERIOD = 0.05


def _server() -> NbdServer:
    # The byte budget needs no exports.
    return NbdServer(cast(ExportRegistry, None), "127.0.0.1", 0)


@pytest.fixture
def trims(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    done: list[str] = []
    monkeypatch.setattr(listener, "TRIM_AFTER_IDLE", PERIOD)
    monkeypatch.setattr(listener.buffers, "trim", lambda: done.append("buffers"))
    monkeypatch.setattr(listener.memory, "trim", lambda: done.append("heap"))
    return done


async def test_an_idle_server_trims_once_after_the_period(trims: list[str]) -> None:
    server = _server()
    server.take_bytes(4096)
    server.give_bytes(4096)
    await asyncio.sleep(PERIOD / 2)
    assert trims == []
    await asyncio.sleep(PERIOD)
    assert trims == ["buffers", "heap"]
    await asyncio.sleep(2 * PERIOD)
    assert trims == ["buffers", "heap"]  # once, not at every period


async def test_requests_within_the_period_put_the_trim_off(trims: list[str]) -> None:
    server = _server()
    timers = []
    for _ in range(8):  # queue depth 1: the budget empties after every request
        server.take_bytes(4096)
        server.give_bytes(4096)
        timers.append(server._trim_timer)
        await asyncio.sleep(PERIOD / 4)
    assert len(set(map(id, timers))) <= 2  # not a timer per request
    assert trims == []
    await asyncio.sleep(2.5 * PERIOD)  # quiet for two periods: trimmed
    assert trims == ["buffers", "heap"]


async def test_no_trim_while_bytes_are_in_flight(trims: list[str]) -> None:
    server = _server()
    server.take_bytes(4096)
    server.give_bytes(4096)
    server.take_bytes(8192)  # a request in flight when the timer fires
    await asyncio.sleep(2 * PERIOD)
    assert trims == [] and server._trim_timer is None
    server.give_bytes(8192)  # it ends: the period starts again
    await asyncio.sleep(2 * PERIOD)
    assert trims == ["buffers", "heap"]
