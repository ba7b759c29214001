"""Rating a reply over HTTP (SPEC: POST /api/feedback/), with the WebSocket frame's rules."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from chat.errors import InvalidInput, NotFound
from chat.models import Message
from chat.owners import Owner
from feedback import selectors, services
from feedback.models import Feedback, ReviewEvent
from tests.feedback import factories

pytestmark = pytest.mark.django_db

URL = "/api/feedback/"


def csrf_client(user: Any = None) -> tuple[Client, str]:
    """Return a client that enforces CSRF, signed in (or anonymous), and its token."""
    client = Client(enforce_csrf_checks=True)
    if user is not None:
        client.force_login(user)
    client.get("/")  # sets the session (anonymous) and the CSRF cookie
    return client, client.cookies["csrftoken"].value


def post(client: Client, token: str | None, body: Any) -> Any:
    headers = {"X-CSRFToken": token} if token else {}
    return client.post(URL, data=json.dumps(body), content_type="application/json", headers=headers)


def test_rating_over_http_is_saved_and_shown_after_reload(make_user):
    alice = make_user("alice")
    _, reply = factories.exchange(factories.conversation(user=alice))
    client, token = csrf_client(alice)

    response = post(
        client,
        token,
        {"message": reply.pk, "rating": -1, "reasons": ["inaccurate"], "comment": "Wrong year."},
    )

    assert response.status_code == 200
    assert response.json() == {"type": "feedback.saved", "message": reply.pk, "rating": -1}
    row = Feedback.objects.get()
    assert (row.message_id, row.rating, row.reasons, row.comment) == (
        reply.pk,
        -1,
        ["inaccurate"],
        "Wrong year.",
    )
    assert (row.model, row.owner_key, row.review_status) == ("demo:demo", f"u:{alice.pk}", "new")
    assert selectors.ratings_for(owner=Owner(user_id=alice.pk), message_ids=[reply.pk]) == {
        reply.pk: {"rating": -1, "reasons": ["inaccurate"], "comment": "Wrong year."}
    }


def test_post_without_csrf_token_is_refused(make_user):
    alice = make_user("alice")
    _, reply = factories.exchange(factories.conversation(user=alice))
    client, _token = csrf_client(alice)

    response = post(client, None, {"message": reply.pk, "rating": 1})

    assert response.status_code == 403
    assert not Feedback.objects.exists()


def test_change_and_withdraw_keep_one_row_per_user_and_message(make_user):
    alice = make_user("alice")
    _, reply = factories.exchange(factories.conversation(user=alice))
    client, token = csrf_client(alice)

    post(client, token, {"message": reply.pk, "rating": -1, "reasons": ["unhelpful"]})
    changed = post(client, token, {"message": reply.pk, "rating": 1, "reasons": ["helpful"]})
    assert changed.json()["rating"] == 1
    assert Feedback.objects.count() == 1
    assert Feedback.objects.get().reasons == ["helpful"]

    withdrawn = post(client, token, {"message": reply.pk, "rating": 0})
    assert withdrawn.json() == {"type": "feedback.saved", "message": reply.pk, "rating": None}
    row = Feedback.objects.get()
    assert (row.rating, row.reasons, row.comment) == (None, [], "")
    assert selectors.ratings_for(owner=Owner(user_id=alice.pk), message_ids=[reply.pk]) == {}
    # The user's changes are in the row's history.
    assert list(ReviewEvent.objects.order_by("id").values_list("kind", "after")) == [
        ("rating", "thumbs up; reasons: helpful"),
        ("rating", "withdrawn"),
    ]


def test_anonymous_visitor_rates_by_session_and_the_key_is_not_the_session(settings):
    settings.CHAT_ALLOW_ANONYMOUS = True
    client, token = csrf_client(None)
    session_key = client.session.session_key
    _, reply = factories.exchange(factories.conversation(session_key=session_key))

    response = post(client, token, {"message": reply.pk, "rating": 1, "reasons": ["fast"]})

    assert response.status_code == 200
    row = Feedback.objects.get()
    assert row.user is None and row.owner_key.startswith("s:")
    assert session_key not in row.owner_key
    owner = Owner(user_id=None, session_key=session_key)
    assert selectors.ratings_for(owner=owner, message_ids=[reply.pk])[reply.pk]["rating"] == 1


@pytest.mark.parametrize("kind", ["someone_elses", "user_message", "missing", "not_an_int"])
def test_rating_what_is_not_your_reply_is_not_found(make_user, kind):
    alice, bob = make_user("alice"), make_user("bob")
    _, reply = factories.exchange(factories.conversation(user=bob))
    _, own_reply = factories.exchange(factories.conversation(user=alice))
    target = {
        "someone_elses": reply.pk,
        "user_message": own_reply.reply_to_id,
        "missing": reply.pk + 1000,
        "not_an_int": str(own_reply.pk),
    }[kind]
    client, token = csrf_client(alice)

    response = post(client, token, {"message": target, "rating": 1})

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert not Feedback.objects.exists()


def test_an_unfinished_reply_cannot_be_rated_yet(make_user):
    alice = make_user("alice")
    _, reply = factories.exchange(factories.conversation(user=alice), status=Message.Status.PENDING)
    client, token = csrf_client(alice)

    response = post(client, token, {"message": reply.pk, "rating": -1})

    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "invalid_input",
        "message": "You can rate a reply once it has finished.",
    }


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"rating": 2}, "A rating must be"),
        ({"rating": True}, "A rating must be"),
        ({"rating": "1"}, "A rating must be"),
        ({"rating": -1, "reasons": ["helpful"]}, "not a reason you can give"),
        ({"rating": 1, "reasons": "fast"}, "must be a list"),
        ({"rating": -1, "comment": "x" * 1001}, "limit is 1,000"),
        ({"rating": -1, "comment": "bad\u202eword"}, "text-direction control"),
        ({"rating": -1, "comment": 42}, "must be text"),
    ],
)
def test_bad_rating_reason_or_comment_is_invalid_input(make_user, body, fragment):
    alice = make_user("alice")
    _, reply = factories.exchange(factories.conversation(user=alice))
    client, token = csrf_client(alice)

    response = post(client, token, {"message": reply.pk, **body})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_input" and fragment in error["message"]
    assert not Feedback.objects.exists()


def test_body_that_is_not_a_json_object_is_invalid_input(make_user):
    alice = make_user("alice")
    client, token = csrf_client(alice)
    response = client.post(
        URL, data="[1, 2]", content_type="application/json", headers={"X-CSRFToken": token}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_input"


def test_feedback_api_is_rate_limited(make_user, settings):
    settings.FEEDBACK_RATELIMIT = "2/m"
    alice = make_user("alice")
    _, reply = factories.exchange(factories.conversation(user=alice))
    client, token = csrf_client(alice)

    codes = [post(client, token, {"message": reply.pk, "rating": 1}).status_code for _ in range(3)]

    assert codes == [200, 200, 429]


def test_service_refuses_other_owner_with_not_found_and_comment_goes_through_checker(make_user):
    alice, bob = make_user("alice"), make_user("bob")
    _, reply = factories.exchange(factories.conversation(user=alice))
    with pytest.raises(NotFound):
        services.feedback_submit(
            owner=Owner(user_id=bob.pk),
            client_ip="127.0.0.1",
            message_id=reply.pk,
            rating=1,
            reasons=[],
            comment=None,
        )
    with pytest.raises(InvalidInput):
        services.feedback_submit(
            owner=Owner(user_id=alice.pk),
            client_ip="127.0.0.1",
            message_id=reply.pk,
            rating=1,
            reasons=[],
            comment="nul\x00byte",
        )
    result = services.feedback_submit(
        owner=Owner(user_id=alice.pk),
        client_ip="127.0.0.1",
        message_id=reply.pk,
        rating=1,
        reasons=None,
        comment="  Great\u200b answer  ",
    )
    assert result == services.FeedbackResult(message_id=reply.pk, rating=1)
    assert Feedback.objects.get().comment == "  Great answer"
