"""Replies outlive their socket: `chat.resume` replays and continues live."""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from chat.models import Message
from tests.chat.helpers import delta_text, recv, recv_until_done, send, send_frame
from tests.conftest import session_cookie_for

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def user_cookie(make_user, name: str = "alice") -> str:
    return session_cookie_for(make_user(name))


@database_sync_to_async
def reload(pk: int) -> Message:
    return Message.objects.get(pk=pk)


@pytest.fixture
def paced_demo(settings):
    settings.CHAT_DEMO_TPS = 50
    settings.CHAT_DEMO_REPLY_TOKENS = 30


async def wait_finished(pk: int) -> Message:
    """Wait for the reply to be stored; the generating task runs on its own."""
    from chat.replay import hub

    task = hub.running_task(pk)
    if task is not None:
        await asyncio.wait_for(asyncio.shield(task), timeout=20)
    return await reload(pk)


async def test_dropped_socket_does_not_stop_the_reply(ws, make_user, paced_demo):
    comm = await ws(await user_cookie(make_user))
    await send(comm, send_frame("keep going without me"))
    accepted = await recv(comm)
    first = await recv(comm)
    assert first["type"] == "chat.delta"
    await comm.disconnect()

    reply = await wait_finished(accepted["message"])
    assert reply.finish_reason == "stop" and reply.completion_tokens == 30
    assert reply.content.startswith(first["text"]) and len(reply.content) > len(first["text"])


async def test_resume_on_a_new_socket_replays_then_continues_without_gaps(
    ws, make_user, paced_demo
):
    cookie = await user_cookie(make_user)
    comm = await ws(cookie)
    await send(comm, send_frame("resume me"))
    accepted = await recv(comm)
    got = [await recv(comm), await recv(comm)]
    await comm.disconnect()

    again = await ws(cookie)
    await send(
        again, {"type": "chat.resume", "message": accepted["message"], "after": got[-1]["seq"]}
    )
    rest = await recv_until_done(again)
    seqs = [f["seq"] for f in got + rest if f["type"] == "chat.delta"]
    assert seqs == list(range(1, len(seqs) + 1))
    assert rest[-1]["finish_reason"] == "stop"
    reply = await reload(accepted["message"])
    assert delta_text(got) + delta_text(rest) == reply.content


async def test_resume_after_the_end_replays_the_whole_reply(ws, make_user):
    cookie = await user_cookie(make_user)
    comm = await ws(cookie)
    await send(comm, send_frame("short one"))
    accepted = await recv(comm)
    original = await recv_until_done(comm)

    other_tab = await ws(cookie)
    await send(other_tab, {"type": "chat.resume", "message": accepted["message"], "after": 0})
    replayed = await recv_until_done(other_tab)
    assert [f for f in replayed if f["type"] == "chat.delta"] == [
        f for f in original if f["type"] == "chat.delta"
    ]
    assert replayed[-1]["finish_reason"] == "stop"


async def test_resume_from_storage_when_the_stream_is_gone(ws, make_user, settings):
    from chat.replay import hub

    cookie = await user_cookie(make_user)
    comm = await ws(cookie)
    await send(comm, send_frame("old reply"))
    accepted = await recv(comm)
    original = await recv_until_done(comm)
    hub._buffers.pop(accepted["message"], None)  # as if the TTL had passed
    if settings.REDIS_URL:
        if hub._flusher is not None:
            await hub._flusher  # the stream is fully written; now let it expire
        import redis

        redis.from_url(settings.REDIS_URL).delete(f"chat:replay:{accepted['message']}")

    await send(comm, {"type": "chat.resume", "message": accepted["message"], "after": 0})
    delta = await recv(comm)
    done = await recv(comm)
    assert delta["text"] == delta_text(original) and "replace" not in delta
    assert done["type"] == "chat.done" and done["finish_reason"] == "stop"


async def test_stop_from_another_socket_of_the_same_user(ws, make_user, settings):
    settings.CHAT_DEMO_TPS = 5
    settings.CHAT_DEMO_REPLY_TOKENS = 50
    cookie = await user_cookie(make_user)
    comm = await ws(cookie)
    await send(comm, send_frame("long"))
    accepted = await recv(comm)
    await recv(comm)
    other = await ws(cookie)
    await send(other, {"type": "chat.stop", "message": accepted["message"]})
    frames = await recv_until_done(comm)
    assert frames[-1]["finish_reason"] == "cancelled"
    reply = await wait_finished(accepted["message"])
    assert reply.finish_reason == "cancelled"


async def test_another_user_cannot_resume_or_stop_a_running_reply(ws, make_user, settings):
    settings.CHAT_DEMO_TPS = 20
    settings.CHAT_DEMO_REPLY_TOKENS = 20
    comm = await ws(await user_cookie(make_user, "alice"))
    await send(comm, send_frame("mine"))
    accepted = await recv(comm)
    mallory = await ws(await user_cookie(make_user, "mallory"))
    for frame in (
        {"type": "chat.resume", "message": accepted["message"], "after": 0},
        {"type": "chat.stop", "message": accepted["message"]},
    ):
        await send(mallory, frame)
        error = await recv(mallory)
        assert error["code"] == "not_found"
    frames = await recv_until_done(comm)
    assert frames[-1]["finish_reason"] == "stop"


async def test_the_same_users_other_tab_hears_of_a_new_reply_and_can_follow_it(ws, make_user):
    cookie = await user_cookie(make_user)
    tab_a = await ws(cookie)
    tab_b = await ws(cookie)
    stranger = await ws(await user_cookie(make_user, "bob"))
    await send(tab_a, send_frame("seen everywhere"))
    accepted = await recv(tab_a)
    started = await recv(tab_b)
    assert started == {
        "type": "chat.started",
        "conversation": accepted["conversation"],
        "message": accepted["message"],
    }
    await send(tab_b, {"type": "chat.resume", "message": started["message"], "after": 0})
    followed = await recv_until_done(tab_b)
    original = await recv_until_done(tab_a)
    assert delta_text(followed) == delta_text(original)
    assert await stranger.receive_nothing(timeout=0.2)


@database_sync_to_async
def reply_left_by_a_dead_process(
    make_user, name: str, settings, seen: list[str]
) -> tuple[str, int]:
    """Leave a reply as a process killed mid-reply does: the row pending, and the
    text its user saw where that process kept it (the checkpoint in the shared
    cache when embedded; a Redis stream naming a writer that no longer lives
    when scaled). Return the owner's cookie and the reply's id."""
    from django.core.cache import cache

    from chat.models import Conversation
    from chat.replay import partial_key

    user = make_user(name)
    conversation = Conversation.objects.create(user=user)
    question = Message.objects.create(
        conversation=conversation, role=Message.Role.USER, content="tell me a story"
    )
    reply = Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Message.Status.PENDING,
        reply_to=question,
        model="demo:demo",
    )
    if settings.REDIS_URL:
        import redis

        client = redis.from_url(settings.REDIS_URL)
        key = f"chat:replay:{reply.pk}"
        client.xadd(key, {"writer": "a-host:4242:gone"})
        for seq, text in enumerate(seen, 1):
            client.xadd(key, {"seq": str(seq), "text": text})
        client.expire(key, 60)
    else:
        cache.set(partial_key(reply.pk), "".join(seen))
    return session_cookie_for(user), reply.pk


def unavailable_errors() -> float:
    from tests.monitoring.helpers import scrape, value

    return value(scrape(), "ai_errors_total", model="demo:demo", code="unavailable")


async def test_resuming_a_reply_whose_process_died_ends_it_at_once_as_failed(
    ws, make_user, settings
):
    """The page reconnects after a crash: the reply ends now, failed, with the text
    the user saw, stored once and counted once, instead of streaming forever."""
    from asgiref.sync import sync_to_async

    from tests.monitoring.helpers import TOKEN

    settings.METRICS_TOKEN = TOKEN
    settings.CHAT_WRITER_ALIVE_S = 0.2  # scaled: how soon a quiet writer is checked
    seen = ["Once ", "upon ", "a time"]
    cookie, reply_id = await reply_left_by_a_dead_process(make_user, "alice", settings, seen)
    errors_before = await sync_to_async(unavailable_errors)()

    comm = await ws(cookie)
    await send(comm, {"type": "chat.resume", "message": reply_id, "after": 2})
    frames = await recv_until_done(comm)

    assert [f["type"] for f in frames if f["type"] != "chat.delta"] == ["chat.done"]
    assert frames[-1]["finish_reason"] == "error"
    last = [f for f in frames if f["type"] == "chat.delta"][-1]
    assert last["replace"] is True and last["text"] == "".join(seen)
    reply = await reload(reply_id)
    assert (reply.status, reply.finish_reason, reply.error_code) == (
        "finished",
        "error",
        "unavailable",
    )
    assert reply.content == "".join(seen)

    # Another tab resuming it now gets the stored reply; nothing is counted twice.
    other = await ws(cookie)
    await send(other, {"type": "chat.resume", "message": reply_id, "after": 0})
    replayed = await recv_until_done(other)
    assert delta_text(replayed) == "".join(seen)
    assert replayed[-1]["finish_reason"] == "error"
    assert await sync_to_async(unavailable_errors)() == errors_before + 1


async def test_deleting_a_conversation_stops_its_running_reply(ws, make_user, settings):
    """The model is not left writing (and billing) a reply its user has deleted."""
    settings.CHAT_DEMO_TPS = 5
    settings.CHAT_DEMO_REPLY_TOKENS = 50
    user = await database_sync_to_async(make_user)("alice")

    def signed_in() -> Client:
        client = Client()
        client.force_login(user)
        return client

    client = await database_sync_to_async(signed_in)()
    comm = await ws(f"sessionid={client.cookies['sessionid'].value}")
    await send(comm, send_frame("a long answer, please"))
    accepted = await recv(comm)
    assert (await recv(comm))["type"] == "chat.delta"

    url = f"/api/conversations/{accepted['conversation']}/"
    deleted = await database_sync_to_async(client.delete)(url)
    assert deleted.status_code == 204
    frames = await recv_until_done(comm)
    assert frames[-1]["finish_reason"] == "cancelled"
    assert frames[-1]["usage"]["completion_tokens"] < 50
    assert not await database_sync_to_async(
        Message.objects.filter(conversation_id=accepted["conversation"]).exists
    )()
