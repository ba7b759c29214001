"""Regenerate the last reply, and edit-and-resend (which replaces, not branches)."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from chat.models import Message
from tests.chat.helpers import recv, recv_until_done, send, send_frame
from tests.conftest import session_cookie_for

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def user_cookie(make_user, name: str = "alice") -> str:
    return session_cookie_for(make_user(name))


@database_sync_to_async
def visible(conversation_id: int) -> list[tuple[str, str]]:
    rows = Message.objects.filter(conversation_id=conversation_id, superseded_at__isnull=True)
    return [(m.role, m.content) for m in rows.order_by("id")]


@database_sync_to_async
def all_rows(conversation_id: int) -> int:
    return Message.objects.filter(conversation_id=conversation_id).count()


async def chat(comm, content: str, **extra) -> tuple[dict, list[dict]]:
    await send(comm, send_frame(content, **extra))
    accepted = await recv(comm)
    assert accepted["type"] == "chat.accepted", accepted
    return accepted, await recv_until_done(comm)


async def test_regenerate_answers_the_same_question_and_hides_the_old_reply(ws, make_user):
    comm = await ws(await user_cookie(make_user))
    first, _ = await chat(comm, "question one")
    frame = send_frame("ignored", conversation=first["conversation"], regenerate=first["message"])
    await send(comm, frame)
    again = await recv(comm)
    await recv_until_done(comm)
    assert again["user_message"] == first["user_message"]
    assert again["message"] != first["message"]
    history = await visible(first["conversation"])
    assert [role for role, _ in history] == ["user", "assistant"]
    assert await all_rows(first["conversation"]) == 3  # the old reply is kept

    # A retried regenerate is answered once.
    await send(comm, frame)
    dup = await recv(comm)
    assert dup["duplicate"] is True and dup["message"] == again["message"]
    assert await all_rows(first["conversation"]) == 3


async def test_only_the_last_finished_reply_can_be_regenerated(ws, make_user):
    comm = await ws(await user_cookie(make_user))
    first, _ = await chat(comm, "one")
    await chat(comm, "two", conversation=first["conversation"])
    await send(
        comm, send_frame("", conversation=first["conversation"], regenerate=first["message"])
    )
    error = await recv(comm)
    assert error["code"] == "invalid_input" and "last reply" in error["message"]


async def test_edit_replaces_the_message_and_everything_after_it(ws, make_user):
    comm = await ws(await user_cookie(make_user))
    first, _ = await chat(comm, "what is 2+2")
    await chat(comm, "and 3+3", conversation=first["conversation"])
    edited, _ = await chat(
        comm, "what is 2+3", conversation=first["conversation"], edit=first["user_message"]
    )
    assert edited["conversation"] == first["conversation"]
    history = await visible(first["conversation"])
    assert [content for role, content in history if role == "user"] == ["what is 2+3"]
    assert await all_rows(first["conversation"]) == 6


async def test_nobody_can_edit_or_regenerate_another_users_messages(ws, make_user):
    alice = await ws(await user_cookie(make_user, "alice"))
    first, _ = await chat(alice, "private")
    mallory = await ws(await user_cookie(make_user, "mallory"))
    for extra in ({"regenerate": first["message"]}, {"edit": first["user_message"]}):
        await send(mallory, send_frame("hijack", **extra))
        assert (await recv(mallory))["code"] == "not_found"
    assert await all_rows(first["conversation"]) == 2
