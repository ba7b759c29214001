"""Nobody reads, stops, resumes or rates another owner's messages, over WS or HTTP."""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from tests.chat.helpers import recv, send
from tests.safety.helpers import chat, cookie_for, reload

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def alices_reply(ws, make_user) -> dict:
    comm = await ws(await cookie_for(make_user, "alice"))
    frames = await chat(comm, "my private question")
    return frames[0]


def _http_client(cookie: str) -> Client:
    client = Client()
    name, value = cookie.split("=", 1)
    client.cookies[name] = value
    return client


@pytest.mark.parametrize("intruder", ["bob", None])
async def test_another_owner_cannot_stop_or_resume_over_the_websocket(
    ws, make_user, alices_reply, intruder
):
    comm = await ws(await cookie_for(make_user, intruder))
    message = alices_reply["message"]
    for frame in (
        {"type": "chat.stop", "message": message},
        {"type": "chat.resume", "message": message, "after": 0},
        {"type": "chat.resume", "message": alices_reply["user_message"], "after": 0},
    ):
        await send(comm, frame)
        error = await recv(comm)
        assert error["type"] == "chat.error" and error["code"] == "not_found", frame
        assert "private" not in json.dumps(error)
    reply = await reload(message)
    assert reply.finish_reason == "stop"  # not cancelled by the intruder


@pytest.mark.parametrize("intruder", ["bob", None])
async def test_another_owner_cannot_continue_the_conversation(
    ws, make_user, alices_reply, intruder
):
    comm = await ws(await cookie_for(make_user, intruder))
    [error] = await chat(comm, "let me in", conversation=alices_reply["conversation"])
    assert error["code"] == "not_found"


@pytest.mark.parametrize("intruder", ["bob", None])
async def test_another_owner_cannot_read_or_rate_over_http(ws, make_user, alices_reply, intruder):
    cookie = await cookie_for(make_user, intruder)

    def attempt() -> None:
        client = _http_client(cookie)
        conversation = alices_reply["conversation"]
        read = client.get(f"/api/conversations/{conversation}/messages/")
        assert read.status_code in (403, 404)
        assert b"private" not in read.content
        listing = client.get("/api/conversations/")
        assert b"private" not in listing.content
        rate = client.post(
            "/api/feedback/",
            json.dumps({"message": alices_reply["message"], "rating": -1}),
            content_type="application/json",
        )
        assert rate.status_code in (403, 404)

    await database_sync_to_async(attempt)()


async def test_the_owner_can_read_their_own_messages(ws, make_user, alices_reply):
    from django.contrib.auth import get_user_model

    def read() -> None:
        client = Client()
        client.force_login(get_user_model().objects.get(username="alice"))
        response = client.get(f"/api/conversations/{alices_reply['conversation']}/messages/")
        assert response.status_code == 200
        assert response.json()["messages"][0]["content"] == "my private question"

    await database_sync_to_async(read)()
