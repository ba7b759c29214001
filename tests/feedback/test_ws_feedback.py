"""The `feedback` frame over the WebSocket follows the same rules as the HTTP API."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from feedback.models import Feedback
from tests.chat.helpers import recv, recv_until_done, send, send_frame
from tests.conftest import session_cookie_for

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def cookie(make_user, name: str) -> str:
    return session_cookie_for(make_user(name))


@database_sync_to_async
def rows(message_id: int) -> list[tuple[int | None, list[str], str]]:
    return [
        (f.rating, f.reasons, f.comment) for f in Feedback.objects.filter(message_id=message_id)
    ]


async def test_rate_change_and_withdraw_over_the_socket(ws, make_user):
    comm = await ws(await cookie(make_user, "alice"))
    await send(comm, send_frame("rate me"))
    accepted = await recv(comm)
    await recv_until_done(comm)

    frame = {
        "type": "feedback",
        "message": accepted["message"],
        "rating": -1,
        "reasons": ["inaccurate"],
        "comment": "wrong year",
    }
    await send(comm, frame)
    assert await recv(comm) == {
        "type": "feedback.saved",
        "message": accepted["message"],
        "rating": -1,
    }
    await send(comm, {**frame, "rating": 1, "reasons": [], "comment": ""})
    assert (await recv(comm))["rating"] == 1
    assert await rows(accepted["message"]) == [(1, [], "")]
    await send(comm, {**frame, "rating": 0, "reasons": [], "comment": ""})
    assert (await recv(comm))["rating"] is None
    assert len(await rows(accepted["message"])) == 1


async def test_rating_what_is_not_yours_or_not_a_reply_is_refused(ws, make_user):
    alice = await ws(await cookie(make_user, "alice"))
    await send(alice, send_frame("mine"))
    accepted = await recv(alice)
    await recv_until_done(alice)
    mallory = await ws(await cookie(make_user, "mallory"))
    await send(mallory, {"type": "feedback", "message": accepted["message"], "rating": 1})
    assert (await recv(mallory))["code"] == "not_found"
    await send(alice, {"type": "feedback", "message": accepted["user_message"], "rating": 1})
    assert (await recv(alice))["code"] == "not_found"
    await send(alice, {"type": "feedback", "message": accepted["message"], "rating": 5})
    assert (await recv(alice))["code"] == "invalid_input"
    assert await rows(accepted["message"]) == []
