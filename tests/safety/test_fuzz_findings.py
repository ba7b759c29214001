"""Defects the protocol fuzzer (test_protocol_fuzz.py) found, each pinned by its smallest case."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.chat.helpers import recv, send, send_frame
from tests.safety.helpers import asgi_http, cookie_for

pytestmark = pytest.mark.django_db(transaction=True)


async def recv_sendable(comm: Any) -> dict[str, Any]:
    """Receive a frame and check a real server could send it (UTF-8 without lone surrogates)."""
    out = await comm.receive_output(10)
    assert out["type"] == "websocket.send", out
    out["text"].encode("utf-8")  # uvicorn/websockets encode it; a surrogate raises there
    return json.loads(out["text"])


@pytest.mark.parametrize("client_msg_id", ["\ud800", "abc\udfff", "\udbff\udbff"])
async def test_an_unsendable_client_msg_id_is_not_echoed(ws, make_user, client_msg_id):
    # A lone surrogate in client_msg_id was echoed into the chat.error, which a
    # server cannot encode as UTF-8: the send raised and the socket died.
    comm = await ws(await cookie_for(make_user))
    await send(comm, {"type": "chat.send", "content": "hi", "client_msg_id": client_msg_id})
    error = await recv_sendable(comm)
    assert error["type"] == "chat.error" and error["code"] == "invalid_input"
    assert "client_msg_id" not in error
    await send(comm, {"type": "chat.nope", "client_msg_id": client_msg_id})
    assert (await recv_sendable(comm))["code"] == "invalid_input"
    await send(comm, send_frame("still there?"))
    assert (await recv(comm))["type"] == "chat.accepted"


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        (b"evil.example", "/api/feedback/", 400),
        (b"\xff", "/accounts/login/", 400),
        (b"evil.example", "/", 400),
        (b"testserver", "/nothing-here/", 404),
        (b"testserver", "/api/conversations/%ED%A0%80/", 404),
    ],
)
async def test_an_error_page_for_an_unreadable_body_is_not_a_500(host, path, expected):
    # Django's default error views check CSRF, which reads request.POST; a
    # multipart body without a boundary raised inside the error handler, and
    # a refused Host header (400) or an unknown URL (404) became a 500.
    headers = [
        (b"host", host),
        (b"content-type", b"multipart/form-data"),
        (b"cookie", b"csrftoken=" + b"Fz" * 16),
        (b"x-csrftoken", b"Fz" * 16),
    ]
    status, _headers, body = await asgi_http("POST", path, b"", headers, b"{}")
    assert status == expected, (status, body[:200])
    assert b"Traceback" not in body
