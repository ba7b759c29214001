"""The `feedback` frame over the WebSocket follows the same rules as the HTTP API."""

from __future__ import annotations

from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model

from feedback.models import Feedback, ReviewEvent
from tests.asgi_ws import WebsocketCommunicator
from tests.chat.helpers import recv, recv_until_done, send, send_frame
from tests.conftest import session_cookie_for
from tests.feedback.test_rating import csrf_client, post
from tests.monitoring.helpers import TOKEN, scrape, value

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


@database_sync_to_async
def review_events(message_id: int) -> int:
    return ReviewEvent.objects.filter(feedback__message_id=message_id).count()


async def rated_reply(ws, make_user, name: str = "alice") -> tuple[WebsocketCommunicator, int]:
    """Open alice's socket and return it with a finished reply of hers to rate."""
    comm = await ws(await cookie(make_user, name))
    await send(comm, send_frame("rate me"))
    accepted = await recv(comm)
    await recv_until_done(comm)
    return comm, accepted["message"]


async def test_feedback_frames_past_the_limit_are_refused_write_nothing_and_keep_the_socket(
    ws, make_user, settings
):
    settings.FEEDBACK_RATELIMIT = "5/m"
    comm, message = await rated_reply(ws, make_user)

    answers = []
    for i in range(40):
        await send(comm, {"type": "feedback", "message": message, "rating": 1 if i % 2 else -1})
        answers.append(await recv(comm))

    assert [a["type"] for a in answers[:5]] == ["feedback.saved"] * 5
    for refused in answers[5:]:
        assert refused["type"] == "chat.error" and refused["code"] == "rate_limited", refused
        assert 1 <= refused["retry_after"] <= 60
    # The first frame made the row, the next four each changed it: nothing after.
    assert await rows(message) == [(-1, [], "")]
    assert await review_events(message) == 4
    # The socket stays open and chat goes on; only ratings wait.
    await send(comm, send_frame("still here?"))
    assert (await recv(comm))["type"] == "chat.accepted"


async def test_socket_and_http_share_one_feedback_limit(ws, make_user, settings):
    settings.FEEDBACK_RATELIMIT = "3/m"
    comm, message = await rated_reply(ws, make_user)
    alice = await database_sync_to_async(get_user_model().objects.get)(username="alice")
    client, token = await database_sync_to_async(csrf_client)(alice)

    def over_http(rating: int) -> Any:
        return post(client, token, {"message": message, "rating": rating})

    for rating in (1, -1):
        await send(comm, {"type": "feedback", "message": message, "rating": rating})
        assert (await recv(comm))["type"] == "feedback.saved"
    assert (await database_sync_to_async(over_http)(1)).status_code == 200
    refused = await database_sync_to_async(over_http)(-1)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused["Retry-After"]) == refused.json()["error"]["retry_after"] <= 60
    await send(comm, {"type": "feedback", "message": message, "rating": -1})
    assert (await recv(comm))["code"] == "rate_limited"
    assert await rows(message) == [(1, [], "")]


async def test_feedback_metric_counts_thumbs_given_not_frames(ws, make_user, settings):
    settings.METRICS_TOKEN = TOKEN
    comm, message = await rated_reply(ws, make_user)
    before = await database_sync_to_async(scrape)()

    for rating, comment in (
        (1, ""),  # a first thumb up: counted
        (1, ""),  # the same again, a retry: nothing changes
        (1, "nice"),  # the same thumb with a comment: an edit, not a new vote
        (-1, "nice"),  # changed its mind: a thumb down
        (-1, "nice"),
        (0, ""),  # withdrawn: no thumb
        (1, ""),  # given again: counted
    ):
        frame = {"type": "feedback", "message": message, "rating": rating, "comment": comment}
        await send(comm, frame)
        assert (await recv(comm))["type"] == "feedback.saved"
    after = await database_sync_to_async(scrape)()

    def given(rating: str) -> float:
        return value(after, "ai_feedback_total", rating=rating) - value(
            before, "ai_feedback_total", rating=rating
        )

    assert (given("up"), given("down")) == (2, 1)
