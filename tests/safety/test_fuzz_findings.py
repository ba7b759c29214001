"""Defects the protocol fuzzer (test_protocol_fuzz.py) found, each pinned by its smallest case."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.asgi_ws import WebsocketCommunicator
from tests.chat.helpers import recv, send, send_frame
from tests.safety.helpers import asgi_http, cookie_for, replies_settled

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def _replies_settled() -> AsyncIterator[None]:
    yield
    await replies_settled()


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


async def test_resuming_a_running_reply_again_does_not_double_its_feed(ws, make_user, settings):
    # Each chat.resume of a running reply added the socket to its listeners
    # once more: k resumes made every later delta and the chat.done arrive k
    # times, and a client could grow the list (and the frames sent per
    # delta) without bound with small frames.
    settings.CHAT_DEMO_TPS = 40.0
    settings.CHAT_DEMO_REPLY_TOKENS = 40
    cookie = await cookie_for(make_user)
    writer, reader = await ws(cookie), await ws(cookie)
    await send(writer, send_frame("a long answer please"))
    accepted = await recv(writer)
    assert accepted["type"] == "chat.accepted"
    resumes = 5
    for _ in range(resumes):
        await send(reader, {"type": "chat.resume", "message": accepted["message"], "after": 0})
    frames = []
    while True:
        frame = await recv(reader)
        if frame["type"] == "chat.started":
            continue
        assert frame["message"] == accepted["message"], frame
        frames.append(frame)
        if frame["type"] == "chat.done":
            break
    assert frame["finish_reason"] == "stop"
    # Only the replayed backlogs may repeat a delta; the live feed comes once.
    seqs = [f["seq"] for f in frames if f["type"] == "chat.delta"]
    assert seqs.count(max(seqs)) == 1, seqs
    assert all(seqs.count(s) <= resumes for s in set(seqs)), seqs
    assert await reader.receive_nothing(timeout=0.1)


@pytest.mark.parametrize("origin", [b"http://[::1", b"http://[evil", b"https://testserver]"])
async def test_an_unparseable_origin_is_refused_not_a_crash(make_user, origin):
    # Channels' origin check parses the header with urlparse, which raises
    # ValueError for an IPv6 bracket left open (or closed unopened): the
    # handshake crashed the application (an exception logged per attempt)
    # instead of being refused.
    from config.asgi import application

    cookie = (await cookie_for(make_user)).encode()
    comm = WebsocketCommunicator(
        application, "/ws/chat/", [(b"origin", origin), (b"cookie", cookie)]
    )
    connected, code = await comm.connect()
    assert connected is False and code == 1000


async def test_a_form_posted_to_the_feedback_api_is_a_400(make_user):
    # The CSRF check reads a POST's form data (request.POST) first; the view
    # then read request.body, which Django refuses once the stream was read
    # (RawPostDataException): a multipart post to /api/feedback/ was a 500.
    cookie = (await cookie_for(make_user)).encode()
    form = b'--zz\r\nContent-Disposition: form-data; name="rating"\r\n\r\n1\r\n--zz--\r\n'
    headers = [
        (b"host", b"testserver"),
        (b"cookie", cookie + b"; csrftoken=" + b"Fz" * 16),
        (b"x-csrftoken", b"Fz" * 16),
        (b"content-type", b"multipart/form-data; boundary=zz"),
        (b"content-length", str(len(form)).encode()),
    ]
    status, _headers, body = await asgi_http("POST", "/api/feedback/", b"", headers, form)
    assert status == 400, body[:300]
    assert json.loads(body)["error"]["code"] == "invalid_input"
