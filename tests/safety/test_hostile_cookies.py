"""A session cookie that holds what no session key can: no session, never a 500."""

from __future__ import annotations

import json

import pytest

from tests.asgi_ws import WebsocketCommunicator
from tests.chat.helpers import send_frame

pytestmark = pytest.mark.django_db(transaction=True)

# Django's cookie parser turns the escaped \000 into a NUL, which PostgreSQL refuses.
HOSTILE = ['"abcdefgh\\000ijkl"', "abcdefgh%00ijkl", "abcdefgh/../ijkl", "ÀÀÀÀÀÀÀÀÀÀ"]


@pytest.mark.parametrize("value", HOSTILE)
def test_pages_and_apis_answer_as_to_a_visitor_without_a_session(client, value):
    client.cookies.load(f"sessionid={value}")
    assert client.get("/").status_code == 200
    response = client.get("/api/conversations/")
    assert response.status_code == 200 and response.json()["conversations"] == []


@pytest.mark.parametrize("value", HOSTILE)
async def test_the_websocket_handshake_answers_too(value):
    from config.asgi import application

    headers = [(b"origin", b"http://testserver"), (b"cookie", f"sessionid={value}".encode())]
    comm = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    connected, _ = await comm.connect()
    try:
        assert connected
        await comm.send_to(text_data=json.dumps(send_frame("hello")))
        frame = json.loads(await comm.receive_from(timeout=10))
        # No session to chat in: the same answer as for a visitor whose cookie expired.
        assert frame["type"] == "chat.error" and frame["code"] == "forbidden"
    finally:
        await comm.disconnect()
