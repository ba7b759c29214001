"""SPEC "Data that is never lost": every reply is stored once, whatever happens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from channels.db import database_sync_to_async

from chat.models import Conversation, Message
from chat.providers import ChatMessage, ProviderError, StreamEvent, StreamOptions
from chat.services import reply_finish
from chat.tasks import conversation_title, conversation_titles
from tests.chat.helpers import delta_text, recv, recv_until_done, send, send_frame
from tests.conftest import session_cookie_for

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def user_cookie(make_user) -> str:
    return session_cookie_for(make_user("alice"))


@database_sync_to_async
def reload(pk: int) -> Message:
    return Message.objects.get(pk=pk)


@pytest.fixture
def slow_demo(settings):
    # A token every 200 ms: anything that takes the consumer longer than that
    # to act on would show up as an extra delta.
    settings.CHAT_DEMO_TPS = 5
    settings.CHAT_DEMO_REPLY_TOKENS = 40


async def test_stop_mid_stream_saves_exactly_the_text_sent(ws, make_user, slow_demo):
    comm = await ws(await user_cookie(make_user))
    await send(comm, send_frame("tell me a long story"))
    accepted = await recv(comm)
    received = [await recv(comm), await recv(comm)]
    assert [f["type"] for f in received] == ["chat.delta", "chat.delta"]

    await send(comm, {"type": "chat.stop", "message": accepted["message"]})
    done = await recv(comm)
    # The very next frame is the end: no token slipped out after Stop.
    assert done["type"] == "chat.done" and done["finish_reason"] == "cancelled"
    reply = await reload(accepted["message"])
    assert reply.status == "finished" and reply.finish_reason == "cancelled"
    assert reply.content == delta_text(received)
    assert reply.latency_ms is not None and reply.ttft_ms is not None


async def test_stop_pressed_again_while_the_reply_is_stored_still_ends_it(
    ws, make_user, slow_demo, monkeypatch
):
    # A double click on Stop, or a stop from another process seen twice.
    import threading

    from chat import services

    stored = threading.Event()
    release = threading.Event()
    real = services.reply_finish

    def slow_reply_finish(**kwargs):
        stored.set()
        assert release.wait(10)
        return real(**kwargs)

    monkeypatch.setattr(services, "reply_finish", slow_reply_finish)
    comm = await ws(await user_cookie(make_user))
    await send(comm, send_frame("tell me a long story"))
    accepted = await recv(comm)
    assert (await recv(comm))["type"] == "chat.delta"
    await send(comm, {"type": "chat.stop", "message": accepted["message"]})
    await asyncio.to_thread(stored.wait, 10)  # the reply is being stored now
    await send(comm, {"type": "chat.stop", "message": accepted["message"]})
    # The socket answers frames in order: once this is answered, so was the second
    # Stop. (A frame the database thread would answer waits for the store.)
    await send(comm, {"type": "no.such.frame"})
    frames = [await recv(comm)]
    release.set()
    while frames[-1]["type"] != "chat.done":
        frames.append(await recv(comm))
    assert [f.get("code") for f in frames if f["type"] == "chat.error"] == ["invalid_input"]
    assert frames[-1]["finish_reason"] == "cancelled"
    reply = await reload(accepted["message"])
    assert reply.status == "finished" and reply.finish_reason == "cancelled"


async def test_disconnect_mid_stream_saves_exactly_the_text_sent_when_set_to_cancel(
    ws, make_user, slow_demo, settings
):
    settings.CHAT_CANCEL_ON_DISCONNECT = True
    comm = await ws(await user_cookie(make_user))
    await send(comm, send_frame("tell me a long story"))
    accepted = await recv(comm)
    received = [await recv(comm)]
    await comm.disconnect()

    reply = await reload(accepted["message"])
    assert reply.status == "finished" and reply.finish_reason == "cancelled"
    assert reply.content == delta_text(received)


class BreaksMidStream:
    name = "broken"

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def stream(
        self, messages: list[ChatMessage], options: StreamOptions
    ) -> AsyncIterator[StreamEvent]:
        for token in ["One", " two", " three"]:
            yield token
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "code", "logged"),
    [
        (ProviderError("server", "upstream 502", status=502), "unavailable", "failed: unavailable"),
        (ProviderError("timeout", "idle gap"), "timeout", "failed: timeout"),
        (RuntimeError("a bug of ours"), "internal", "unexpected failure"),
    ],
)
async def test_failure_mid_stream_keeps_what_was_delivered_and_tells_the_user(
    ws, make_user, monkeypatch, caplog, exc, code, logged
):
    monkeypatch.setattr("chat.callpath.provider_for", lambda spec: BreaksMidStream(exc))
    comm = await ws(await user_cookie(make_user))
    frame = send_frame("this will break")
    await send(comm, frame)
    accepted = await recv(comm)
    frames = await recv_until_done(comm)

    errors = [f for f in frames if f["type"] == "chat.error"]
    assert len(errors) == 1 and errors[0]["code"] == code
    assert errors[0]["client_msg_id"] == frame["client_msg_id"]
    assert "Traceback" not in errors[0]["message"] and "bug" not in errors[0]["message"]
    assert frames[-1]["finish_reason"] == "error"
    assert delta_text(frames) == "One two three"
    reply = await reload(accepted["message"])
    assert (reply.content, reply.finish_reason, reply.error_code) == (
        "One two three",
        "error",
        code,
    )
    assert logged in caplog.text
    # The user's text never reaches the logs.
    assert "this will break" not in caplog.text
    # The socket is still usable.
    monkeypatch.undo()
    await send(comm, send_frame("again"))
    assert (await recv(comm))["type"] == "chat.accepted"
    await recv_until_done(comm)


async def test_a_reply_is_finished_exactly_once(ws, make_user):
    comm = await ws(await user_cookie(make_user))
    await send(comm, send_frame("hello"))
    accepted = await recv(comm)
    await recv_until_done(comm)
    stored = await reload(accepted["message"])

    late = await database_sync_to_async(reply_finish)(
        reply_id=accepted["message"],
        content="overwritten!",
        finish_reason="error",
        model="demo:demo",
        ttft_ms=1,
        latency_ms=1,
        prompt_tokens=1,
        completion_tokens=1,
        cost_usd=stored.cost_usd,
        error_code="internal",
    )
    assert late is False
    again = await reload(accepted["message"])
    assert (again.content, again.finish_reason) == (stored.content, "stop")


def test_title_task_titles_a_conversation_once(make_user):
    user = make_user("bob")
    conversation = Conversation.objects.create(user=user)
    Message.objects.create(
        conversation=conversation,
        role="user",
        content="How do I roll back a bad deploy without losing data today?",
    )
    conversation_title.apply(args=[conversation.pk])
    conversation.refresh_from_db()
    assert conversation.title == "How do I roll back a bad deploy…"
    conversation.title = "Renamed by the user"
    conversation.save()
    conversation_title.apply(args=[conversation.pk])
    conversation.refresh_from_db()
    assert conversation.title == "Renamed by the user"


def test_conversations_started_together_are_titled_by_one_task(make_user):
    user = make_user("carol")
    started = []
    for question in ("Why is the sky blue at noon?", "What makes sunsets look red?"):
        conversation = Conversation.objects.create(user=user)
        Message.objects.create(conversation=conversation, role="user", content=question)
        started.append(conversation)
    conversation_titles.apply(args=[[c.pk for c in started]])
    for conversation in started:
        conversation.refresh_from_db()
    assert [c.title for c in started] == [
        "Why is the sky blue at noon?",
        "What makes sunsets look red?",
    ]


async def test_a_stopped_fallback_reply_records_the_model_that_wrote_it(
    ws, make_user, settings, unused_tcp_port
):
    settings.CHAT_MODEL = "openai:unreachable"
    settings.OPENAI_BASE_URL = f"http://127.0.0.1:{unused_tcp_port}/v1"  # nothing listens
    settings.CHAT_RETRY_MAX_ATTEMPTS = 1
    settings.CHAT_FALLBACK_MODELS = ["demo:demo"]
    settings.CHAT_DEMO_TPS = 5
    settings.CHAT_DEMO_REPLY_TOKENS = 40
    comm = await ws(await user_cookie(make_user))
    await send(comm, send_frame("primary is down"))
    accepted = await recv(comm)
    assert accepted["model"] == "openai:unreachable"
    first = await recv(comm)
    assert first["type"] == "chat.delta"
    await send(comm, {"type": "chat.stop", "message": accepted["message"]})
    frames = await recv_until_done(comm)
    assert frames[-1]["finish_reason"] == "cancelled" and frames[-1]["model"] == "demo:demo"
    reply = await reload(accepted["message"])
    assert reply.model == "demo:demo"
    assert [step["model"] for step in reply.call_path] == ["openai:unreachable"]


async def test_a_reply_past_its_longest_allowed_time_ends_as_a_timeout_with_its_text(
    ws, make_user, settings
):
    """No reply outlives CHAT_REPLY_MAX_SECONDS, or the reaper would fail it while it runs."""
    settings.CHAT_DEMO_TTFT_MS = 0
    settings.CHAT_DEMO_TPS = 20
    settings.CHAT_DEMO_REPLY_TOKENS = 2000  # 100 s at this pace
    settings.CHAT_REPLY_MAX_SECONDS = 0.5
    comm = await ws(await user_cookie(make_user))
    await send(comm, send_frame("tell me a very long story"))
    accepted = await recv(comm)
    frames = await recv_until_done(comm)

    errors = [f for f in frames if f["type"] == "chat.error"]
    assert [e["code"] for e in errors] == ["timeout"]
    assert frames[-1]["type"] == "chat.done" and frames[-1]["finish_reason"] == "error"
    shown = delta_text(frames)
    assert shown  # the text before the deadline was delivered...
    reply = await reload(accepted["message"])
    # ...and stored, with the reason.
    assert (reply.status, reply.finish_reason, reply.error_code) == ("finished", "error", "timeout")
    assert reply.content == shown
    assert 400 <= reply.latency_ms < 5000
