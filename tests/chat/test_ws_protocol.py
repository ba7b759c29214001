"""The WebSocket contract (SPEC: WebSocket), through the real ASGI application."""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from chat.models import Conversation, Message
from tests.asgi_ws import WebsocketCommunicator
from tests.chat.helpers import TIMEOUT, delta_text, recv, recv_until_done, send, send_frame
from tests.conftest import session_cookie_for

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def cookie_for(make_user, username: str | None = "alice") -> str:
    return session_cookie_for(make_user(username) if username else None)


@database_sync_to_async
def messages_of(conversation_id: int) -> list[Message]:
    return list(Message.objects.filter(conversation_id=conversation_id).order_by("id"))


async def test_send_streams_numbered_deltas_and_stores_the_reply(ws, make_user):
    comm = await ws(await cookie_for(make_user))
    frame = send_frame("What is a walking skeleton?")
    await send(comm, frame)

    accepted = await recv(comm)
    assert accepted["type"] == "chat.accepted"
    assert accepted["client_msg_id"] == frame["client_msg_id"]
    assert accepted["model"] == "demo:demo"
    frames = await recv_until_done(comm)
    deltas = [f for f in frames if f["type"] == "chat.delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert all(d["message"] == accepted["message"] for d in deltas)
    done = frames[-1]
    assert done["finish_reason"] == "stop"
    assert done["message"] == accepted["message"]
    assert done["usage"]["completion_tokens"] == 12
    assert done["cost_usd"] == 0.0
    assert done["ttft_ms"] is not None and done["latency_ms"] >= done["ttft_ms"]

    user_msg, reply = await messages_of(accepted["conversation"])
    assert (user_msg.pk, user_msg.role, user_msg.content) == (
        accepted["user_message"],
        "user",
        "What is a walking skeleton?",
    )
    assert reply.pk == accepted["message"]
    assert reply.status == "finished" and reply.finish_reason == "stop"
    assert reply.content == delta_text(frames)
    assert reply.content.startswith("Demo reply to")
    assert reply.completion_tokens == 12 and reply.ttft_ms == done["ttft_ms"]


async def test_second_message_continues_the_same_conversation(ws, make_user):
    comm = await ws(await cookie_for(make_user))
    await send(comm, send_frame("first"))
    first = await recv(comm)
    await recv_until_done(comm)
    await send(comm, send_frame("second", conversation=first["conversation"]))
    second = await recv(comm)
    await recv_until_done(comm)
    assert second["conversation"] == first["conversation"]
    assert [m.content for m in await messages_of(first["conversation"]) if m.role == "user"] == [
        "first",
        "second",
    ]


async def test_duplicate_client_msg_id_is_answered_once(ws, make_user):
    comm = await ws(await cookie_for(make_user))
    frame = send_frame("only once please")
    await send(comm, frame)
    first = await recv(comm)
    await recv_until_done(comm)

    await send(comm, frame)
    again = await recv(comm)
    assert again["type"] == "chat.accepted" and again["duplicate"] is True
    assert (again["conversation"], again["user_message"], again["message"]) == (
        first["conversation"],
        first["user_message"],
        first["message"],
    )
    assert await comm.receive_nothing(timeout=0.2)
    assert len(await messages_of(first["conversation"])) == 2


async def test_client_msg_id_comes_back_as_the_client_wrote_it(ws, make_user):
    # Swift's UUID().uuidString is upper case; a client matches replies by string.
    comm = await ws(await cookie_for(make_user))
    frame = send_frame("Which id is mine?", client_msg_id="0F8FAD5B-D9CB-469F-A165-70867728950E")
    await send(comm, frame)
    accepted = await recv(comm)
    assert accepted["client_msg_id"] == "0F8FAD5B-D9CB-469F-A165-70867728950E"
    await recv_until_done(comm)
    # The same id in another spelling is the same send, answered once, in its own spelling.
    braced = "{0f8fad5b-d9cb-469f-a165-70867728950e}"
    await send(comm, {**frame, "client_msg_id": braced})
    again = await recv(comm)
    assert again["duplicate"] is True and again["client_msg_id"] == braced
    assert again["message"] == accepted["message"]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("this is not json", "not valid JSON"),
        ("[1, 2, 3]", "JSON object"),
        (json.dumps({"type": "chat.explode"}), "Unknown frame type 'chat.explode'"),
        (json.dumps({"content": "no type"}), "Unknown frame type"),
        (json.dumps({"type": "chat.send", "content": "hi"}), "client_msg_id"),
        (json.dumps({"type": "chat.send", "content": "hi", "client_msg_id": "nope"}), "UUID"),
        (json.dumps(send_frame("   \n\t ")), "only spaces"),
        (json.dumps(send_frame(None)), "must be text"),
        (json.dumps(send_frame(["a"])), "must be text"),
        (json.dumps(send_frame("hi", conversation="12")), "whole number"),
        (json.dumps({"type": "chat.stop"}), "whole number"),
        (json.dumps({"type": "chat.stop", "message": True}), "whole number"),
        (json.dumps({"type": "chat.resume", "message": -4}), "whole number"),
    ],
)
async def test_bad_frames_get_invalid_input_and_the_socket_stays_open(
    ws, make_user, payload, expected
):
    comm = await ws(await cookie_for(make_user))
    await send(comm, payload)
    error = await recv(comm)
    assert error["type"] == "chat.error" and error["code"] == "invalid_input"
    assert expected in error["message"]
    # Still open and working.
    await send(comm, send_frame("still there?"))
    assert (await recv(comm))["type"] == "chat.accepted"
    await recv_until_done(comm)


async def test_binary_and_oversized_frames_are_refused_without_closing(ws, make_user, settings):
    settings.CHAT_MAX_FRAME_BYTES = 1000
    comm = await ws(await cookie_for(make_user))
    await comm.send_to(bytes_data=b"\x00\x01binary")
    assert "Binary frames" in (await recv(comm))["message"]
    await send(comm, send_frame("x" * 2000))
    error = await recv(comm)
    assert error["code"] == "invalid_input" and "1,000 bytes" in error["message"]
    await send(comm, send_frame("small"))
    assert (await recv(comm))["type"] == "chat.accepted"
    await recv_until_done(comm)


async def test_message_over_the_input_limit_is_refused_and_nothing_is_stored(
    ws, make_user, settings
):
    settings.CHAT_MAX_INPUT_CHARS = 50
    comm = await ws(await cookie_for(make_user))
    frame = send_frame("y" * 51)
    await send(comm, frame)
    error = await recv(comm)
    assert error["code"] == "invalid_input" and error["client_msg_id"] == frame["client_msg_id"]
    assert "limit is 50" in error["message"]
    assert await database_sync_to_async(Message.objects.count)() == 0


async def test_cross_site_origin_is_refused(make_user):
    from config.asgi import application

    cookie = await cookie_for(make_user)
    comm = WebsocketCommunicator(
        application,
        "/ws/chat/",
        headers=[(b"origin", b"http://evil.example"), (b"cookie", cookie.encode())],
    )
    connected, _ = await comm.connect()
    assert not connected
    no_origin = WebsocketCommunicator(
        application, "/ws/chat/", headers=[(b"cookie", cookie.encode())]
    )
    connected, _ = await no_origin.connect()
    assert not connected


async def test_nobody_can_touch_another_users_conversation_or_reply(ws, make_user):
    alice = await ws(await cookie_for(make_user, "alice"))
    await send(alice, send_frame("alice's secret"))
    accepted = await recv(alice)
    await recv_until_done(alice)

    mallory = await ws(await cookie_for(make_user, "mallory"))
    attempts = [
        send_frame("let me in", conversation=accepted["conversation"]),
        {"type": "chat.stop", "message": accepted["message"]},
        {"type": "chat.resume", "message": accepted["message"], "after": 0},
        {"type": "chat.resume", "message": accepted["user_message"], "after": 0},
    ]
    for attempt in attempts:
        await send(mallory, attempt)
        error = await recv(mallory)
        assert error["code"] == "not_found", attempt
        # The same answer as for an id that never existed.
        missing = dict(attempt)
        key = "conversation" if attempt["type"] == "chat.send" else "message"
        missing[key] = 10**9
        await send(mallory, missing)
        assert (await recv(mallory))["message"] == error["message"]
    assert next(m.content for m in await messages_of(accepted["conversation"])) == "alice's secret"
    assert len(await messages_of(accepted["conversation"])) == 2


async def test_anonymous_visitors_chat_by_session_when_allowed(ws, settings):
    comm = await ws(await cookie_for(None, None))
    await send(comm, send_frame("hi, no account"))
    accepted = await recv(comm)
    assert accepted["type"] == "chat.accepted"
    await recv_until_done(comm)
    conversation = await database_sync_to_async(Conversation.objects.get)(
        pk=accepted["conversation"]
    )
    assert conversation.user_id is None and conversation.session_key

    settings.CHAT_ALLOW_ANONYMOUS = False
    await send(comm, send_frame("and now?"))
    error = await recv(comm)
    assert error["code"] == "forbidden" and "sign in" in error["message"]


async def test_without_a_session_sending_is_forbidden(ws):
    comm = await ws(None)
    await send(comm, send_frame("who am I?"))
    error = await recv(comm)
    assert error["code"] == "forbidden" and "Reload the page" in error["message"]
    forged = await ws("sessionid=made-up-session-key-1234567890")
    await send(forged, send_frame("who am I?"))
    assert (await recv(forged))["code"] == "forbidden"


def test_a_replys_streaming_settings_are_read_once_and_follow_a_change(settings):
    from chat import pipeline

    settings.CHAT_COALESCE_MS = 40
    settings.CHAT_MODERATION_WINDOW_TOKENS = 5
    first = pipeline._streaming_settings()
    assert first.coalesce_s == 0.04 and first.window_tokens == 5
    assert pipeline._streaming_settings() is first
    settings.CHAT_MODERATION_WINDOW_TOKENS = 3
    assert pipeline._streaming_settings().window_tokens == 3


async def test_signing_out_closes_the_sockets_of_that_session_only(ws, make_user):
    """A tab left open after signing out elsewhere cannot go on chatting as the user;
    the same user's other sign-ins keep their sockets."""
    user = await database_sync_to_async(make_user)("alice")

    def signed_in() -> Client:
        client = Client()
        client.force_login(user)
        return client

    leaving = await database_sync_to_async(signed_in)()
    staying = await database_sync_to_async(signed_in)()
    left_open = await ws(f"sessionid={leaving.cookies['sessionid'].value}")
    elsewhere = await ws(f"sessionid={staying.cookies['sessionid'].value}")

    response = await database_sync_to_async(leaving.post)("/accounts/logout/")
    assert response.status_code == 302
    closed = await left_open.receive_output(timeout=TIMEOUT)
    assert closed == {"type": "websocket.close", "code": 4401}

    await send(elsewhere, send_frame("still signed in here"))
    assert (await recv(elsewhere))["type"] == "chat.accepted"
    await recv_until_done(elsewhere)


@pytest.mark.django_db(transaction=True)
async def test_deleting_an_account_closes_all_its_sockets_and_no_others(
    ws, make_user, django_user_model
):
    """A deleted account's tabs, in any browser, cannot go on sending as it."""
    alice = await database_sync_to_async(make_user)("alice")
    bob = await database_sync_to_async(make_user)("bob")

    def cookie(user) -> str:
        client = Client()
        client.force_login(user)
        return f"sessionid={client.cookies['sessionid'].value}"

    here = await ws(await database_sync_to_async(cookie)(alice))
    elsewhere = await ws(await database_sync_to_async(cookie)(alice))
    other = await ws(await database_sync_to_async(cookie)(bob))

    await database_sync_to_async(django_user_model.objects.filter(pk=alice.pk).delete)()
    for socket in (here, elsewhere):
        closed = await socket.receive_output(timeout=TIMEOUT)
        assert closed == {"type": "websocket.close", "code": 4401}

    await send(other, send_frame("bob is still here"))
    assert (await recv(other))["type"] == "chat.accepted"
    await recv_until_done(other)
