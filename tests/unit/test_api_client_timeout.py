"""The CLI tells a server that took a request and did not answer from one it cannot reach."""

from __future__ import annotations

import socket

import pytest

from blockvirt.cli.client import ApiClient, ApiError


def test_a_request_without_an_answer_is_not_called_unreachable() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts (the kernel does), never answers
        port = listener.getsockname()[1]
        with pytest.raises(ApiError) as e:
            ApiClient(f"http://127.0.0.1:{port}", timeout=0.3).get("/api/v1/volumes")
    assert "did not answer within 0.3 s" in e.value.message
    assert "may still be running" in e.value.message and "cannot reach" not in e.value.message


def test_nothing_listening_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ApiError) as e:
            ApiClient(f"http://127.0.0.1:{port}", timeout=0.3).get("/api/v1/volumes")
    assert "cannot reach the blockvirt API" in e.value.message
