"""Signing up or signing in keeps the chats the visitor had anonymously, and nobody else's."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.sessions.models import Session
from django.db import connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext

from chat import adopt, services, signout
from chat.models import Conversation, Message
from chat.owners import Owner
from feedback.models import Feedback
from feedback.versions import version_for
from tests.chat.helpers import TIMEOUT, recv, recv_until_done, send, send_frame

PASSWORD = "pw-123456!"  # tests/conftest.py's make_user
NEW_PASSWORD = "a-long-pass-phrase-42"


def visitor() -> Client:
    """A browser that opened the chat page anonymously: it has a stored session."""
    client = Client(raise_request_exception=True)
    assert client.get("/").status_code == 200
    return client


def owner_of(client: Client) -> Owner:
    return Owner(user_id=None, session_key=client.cookies["sessionid"].value)


def chat(owner: Owner, text: str, *, client_msg_id: uuid.UUID | None = None) -> tuple[int, int]:
    """Send as the consumer does (the same services) and finish the reply; return its ids."""
    accepted = services.message_accept(
        owner=owner,
        content=text,
        client_msg_id=client_msg_id or uuid.uuid4(),
        conversation_id=None,
        version_for=version_for,
    )
    services.reply_finish(
        reply_id=accepted.reply_id,
        content=f"An answer to {text}",
        finish_reason="stop",
        model="demo:demo",
        ttft_ms=1,
        latency_ms=2,
        prompt_tokens=3,
        completion_tokens=4,
        cost_usd=Decimal("0"),
    )
    return accepted.conversation_id, accepted.reply_id


def rate(client: Client, reply_id: int, rating: int, comment: str = "") -> None:
    response = client.post(
        "/api/feedback/",
        json.dumps({"message": reply_id, "rating": rating, "reasons": [], "comment": comment}),
        content_type="application/json",
    )
    assert response.status_code == 200, response.content


def listed(client: Client) -> list[int]:
    response = client.get("/api/conversations/")
    assert response.status_code == 200, response.content
    return [c["id"] for c in response.json()["conversations"]]


def ratings(client: Client, conversation_id: int) -> dict[int, Any]:
    response = client.get(f"/api/conversations/{conversation_id}/messages/")
    assert response.status_code == 200, response.content
    return {
        m["id"]: (m["feedback"] or {}).get("rating")
        for m in response.json()["messages"]
        if m["role"] == "assistant"
    }


def sign_up(client: Client, username: str) -> None:
    response = client.post(
        "/accounts/signup/",
        {"username": username, "password1": NEW_PASSWORD, "password2": NEW_PASSWORD},
    )
    assert response.status_code == 302, response.content


def sign_in(client: Client, username: str, password: str = PASSWORD) -> int:
    return client.post("/accounts/login/", {"username": username, "password": password}).status_code


# --- over HTTP ----------------------------------------------------------------------


@pytest.mark.django_db
def test_signing_in_keeps_the_anonymous_chats_and_ratings_with_the_account(make_user):
    alice = make_user("alice")
    older = chat(Owner(user_id=alice.pk), "Alice's own question")[0]
    browser = visitor()
    first, rated = chat(owner_of(browser), "What is a roux?")
    second, _ = chat(owner_of(browser), "And a béchamel?")
    rate(browser, rated, -1, "Too short")
    assert sorted(listed(browser)) == sorted([first, second])

    assert sign_in(browser, "alice") == 302
    assert sorted(listed(browser)) == sorted([older, first, second])
    assert ratings(browser, first) == {rated: -1}
    feedback = Feedback.objects.get(message_id=rated)
    assert (feedback.owner_key, feedback.user_id, feedback.comment) == (
        f"u:{alice.pk}",
        alice.pk,
        "Too short",
    )
    # Nothing stays keyed by the session that is gone.
    assert not Message.objects.filter(owner_key__startswith="s:").exists()
    assert not Conversation.objects.filter(user__isnull=True).exists()

    # Signed in elsewhere, the same account sees them too.
    elsewhere = Client()
    elsewhere.force_login(alice)
    assert sorted(listed(elsewhere)) == sorted([older, first, second])


@pytest.mark.django_db
@pytest.mark.parametrize("ended", ["deleted elsewhere", "deactivated by staff"])
def test_chats_after_the_previous_account_ended_are_kept_at_the_next_sign_in(make_user, ended):
    """A browser whose account went on as an anonymous visitor: its chats are theirs to keep.

    Its session still names the account that ended (Django keeps the stale
    user id; the visitor is anonymous all the same), so it is an anonymous
    session, and the page said so while they chatted.
    """
    alice, bob = make_user("alice"), make_user("bob")
    browser = Client(raise_request_exception=True)
    assert sign_in(browser, "alice") == 302
    if ended == "deleted elsewhere":
        elsewhere = Client()
        elsewhere.force_login(alice)
        gone = elsewhere.post("/accounts/data/delete/", {"password": PASSWORD})
        assert gone.status_code == 302
    else:
        alice.is_active = False
        alice.save()
    assert browser.get("/").status_code == 200  # anonymous chat is allowed
    mine, reply = chat(owner_of(browser), "What is a roux?")
    rate(browser, reply, 1)
    assert listed(browser) == [mine]

    assert sign_in(browser, "bob") == 302
    assert listed(browser) == [mine]
    assert ratings(browser, mine) == {reply: 1}
    assert Conversation.objects.get(pk=mine).user_id == bob.pk


@pytest.mark.django_db
def test_signing_up_keeps_the_anonymous_chats(django_user_model):
    browser = visitor()
    mine, reply = chat(owner_of(browser), "Plan a trip to Lyon")
    rate(browser, reply, 1)

    sign_up(browser, "dora")
    dora = django_user_model.objects.get(username="dora")
    assert listed(browser) == [mine]
    assert ratings(browser, mine) == {reply: 1}
    assert Conversation.objects.get(pk=mine).user_id == dora.pk


@pytest.mark.django_db
def test_a_send_id_the_account_already_used_is_cleared_on_the_moved_message_only(make_user):
    """client_msg_id is unique per owner: a collision must not fail the sign-in or merge sends."""
    alice = make_user("alice")
    shared, kept = uuid.uuid4(), uuid.uuid4()
    hers, _ = chat(Owner(user_id=alice.pk), "Alice's send", client_msg_id=shared)
    browser = visitor()
    clashing, _ = chat(owner_of(browser), "The visitor's send", client_msg_id=shared)
    other, _ = chat(owner_of(browser), "Another send", client_msg_id=kept)

    assert sign_in(browser, "alice") == 302
    assert sorted(listed(browser)) == sorted([hers, clashing, other])
    ids = dict(
        Message.objects.filter(role=Message.Role.USER).values_list(
            "conversation_id", "client_msg_id"
        )
    )
    assert ids == {hers: shared, clashing: None, other: kept}
    # A retry of either id as the account is answered with what was stored, once.
    account = Owner(user_id=alice.pk)
    for client_msg_id, conversation in ((shared, hers), (kept, other)):
        again = services.message_accept(
            owner=account,
            content="retried",
            client_msg_id=client_msg_id,
            conversation_id=None,
            version_for=version_for,
        )
        assert again.duplicate and again.conversation_id == conversation
    assert Conversation.objects.count() == 3


@pytest.mark.django_db
def test_another_visitors_session_is_never_adopted(make_user):
    make_user("alice")
    browser, neighbour = visitor(), visitor()
    mine, _ = chat(owner_of(browser), "Mine")
    theirs, theirs_reply = chat(owner_of(neighbour), "Theirs")
    rate(neighbour, theirs_reply, 1)
    # Naming the other session anywhere but this browser's own cookie counts for nothing.
    response = browser.post(
        "/accounts/login/",
        {"username": "alice", "password": PASSWORD, "session_key": owner_of(neighbour).session_key},
        HTTP_X_SESSION_KEY=owner_of(neighbour).session_key,
    )
    assert response.status_code == 302

    assert listed(browser) == [mine]
    assert listed(neighbour) == [theirs]
    assert ratings(neighbour, theirs) == {theirs_reply: 1}
    assert Conversation.objects.get(pk=theirs).user_id is None


@pytest.mark.django_db
def test_a_replayed_or_expired_session_key_claims_nothing(make_user):
    """Only a live session, carried by the browser that signs in, is adopted: a key read
    from somewhere (a rotated one, an expired one) claims nobody's chats."""
    alice, mallory = make_user("alice"), make_user("mallory")
    browser = visitor()
    hers, _ = chat(owner_of(browser), "Alice's anonymous chat")
    rotated_key = owner_of(browser).session_key
    assert sign_in(browser, "alice") == 302
    assert listed(browser) == [hers]

    gone = visitor()
    orphaned, _ = chat(owner_of(gone), "Left behind")
    expired_key = owner_of(gone).session_key
    Session.objects.filter(session_key=expired_key).delete()

    for stale in (rotated_key, expired_key):
        attacker = Client(raise_request_exception=True)
        attacker.cookies["sessionid"] = stale
        assert sign_in(attacker, "mallory") == 302
        assert listed(attacker) == []
    assert Conversation.objects.get(pk=hers).user_id == alice.pk
    assert Conversation.objects.get(pk=orphaned).user_id is None
    assert not Conversation.objects.filter(user=mallory).exists()


@pytest.mark.django_db
def test_a_failed_sign_in_moves_nothing_and_the_right_one_then_does(make_user):
    alice = make_user("alice")
    browser = visitor()
    mine, _ = chat(owner_of(browser), "Still anonymous")
    assert sign_in(browser, "alice", "not-the-password") == 200
    assert listed(browser) == [mine]
    assert Conversation.objects.get(pk=mine).user_id is None

    assert sign_in(browser, "alice") == 302
    assert listed(browser) == [mine]
    assert Conversation.objects.get(pk=mine).user_id == alice.pk


@pytest.mark.django_db
def test_a_visitor_with_many_chats_is_adopted_page_by_page(make_user):
    """Thousands of conversations cost a few statements a page, not one per row."""
    alice = make_user("alice")
    browser = visitor()
    key = owner_of(browser).session_key
    conversations = Conversation.objects.bulk_create(
        [Conversation(session_key=key, title=f"chat {i}") for i in range(1_050)]
    )
    Message.objects.bulk_create(
        [
            Message(
                conversation=c,
                role=Message.Role.USER,
                content="hi",
                owner_key=f"s:{key}",
                client_msg_id=uuid.uuid4(),
            )
            for c in conversations
        ]
    )
    assert adopt.ADOPT_PAGE == 500
    with CaptureQueriesContext(connection) as queries:
        assert sign_in(browser, "alice") == 302
    moves = [
        q["sql"] for q in queries if q["sql"].startswith('UPDATE "chat_conversation" SET "user_id"')
    ]
    assert len(moves) == 3  # 500 + 500 + 50
    assert Conversation.objects.filter(user=alice).count() == 1_050
    assert Message.objects.filter(owner_key=f"u:{alice.pk}").count() == 1_050


@pytest.mark.django_db
def test_adopting_twice_moves_nothing_more(make_user):
    alice = make_user("alice")
    key = "k" * 32
    conversation = Conversation.objects.create(session_key=key)
    with transaction.atomic():
        first = adopt.conversations_adopt(session_key=key, user_id=alice.pk)
        again = adopt.conversations_adopt(session_key=key, user_id=alice.pk)
    assert first.conversations == 1
    assert again == adopt.Adopted()
    conversation.refresh_from_db()
    assert (conversation.user_id, conversation.session_key) == (alice.pk, "")


# --- over the WebSocket ---------------------------------------------------------------


async def next_close(comm: Any) -> dict[str, Any]:
    """Return the socket's close, past any frames still on their way."""
    while True:
        output = await comm.receive_output(timeout=TIMEOUT)
        if output["type"] == "websocket.close":
            return dict(output)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("titles_enqueued")
async def test_an_anonymous_tab_reconnects_as_the_new_account_and_keeps_its_chat(ws):
    """Chat and rate anonymously, sign up: the chat is the account's, the old socket is
    closed with the reconnect code (not "signed out"), and a resend is answered once."""
    browser = await database_sync_to_async(visitor)()
    tab = await ws(f"sessionid={browser.cookies['sessionid'].value}")
    frame = send_frame("What is a walking skeleton?")
    await send(tab, frame)
    frames = await recv_until_done(tab)
    accepted = next(f for f in frames if f["type"] == "chat.accepted")
    await send(tab, {"type": "feedback", "message": accepted["message"], "rating": 1})
    assert (await recv(tab))["type"] == "feedback.saved"

    await database_sync_to_async(sign_up)(browser, "erin")
    assert await next_close(tab) == {"type": "websocket.close", "code": signout.SIGNED_IN}
    assert await database_sync_to_async(listed)(browser) == [accepted["conversation"]]
    assert await database_sync_to_async(ratings)(browser, accepted["conversation"]) == {
        accepted["message"]: 1
    }

    # The page reconnects with the new cookie and resends what it had in flight.
    again = await ws(f"sessionid={browser.cookies['sessionid'].value}")
    await send(again, frame)
    duplicate = await recv(again)
    assert duplicate["type"] == "chat.accepted" and duplicate.get("duplicate"), duplicate
    assert duplicate["conversation"] == accepted["conversation"]
    assert duplicate["message"] == accepted["message"]
    # And it chats on as the account in the same conversation.
    await send(again, send_frame("And then?", conversation=accepted["conversation"]))
    assert (await recv(again))["type"] == "chat.accepted"
    await recv_until_done(again)


@pytest.mark.django_db(transaction=True)
async def test_signing_in_closes_only_the_sockets_of_the_session_that_signed_in(ws, make_user):
    """Another visitor's tab, and the account's other sign-ins, keep their sockets."""
    alice = await database_sync_to_async(make_user)("alice")
    browser = await database_sync_to_async(visitor)()
    neighbour = await database_sync_to_async(visitor)()
    tab = await ws(f"sessionid={browser.cookies['sessionid'].value}")
    other = await ws(f"sessionid={neighbour.cookies['sessionid'].value}")

    def signed_in_elsewhere() -> str:
        client = Client()
        client.force_login(alice)
        return f"sessionid={client.cookies['sessionid'].value}"

    hers = await ws(await database_sync_to_async(signed_in_elsewhere)())

    assert await database_sync_to_async(sign_in)(browser, "alice") == 302
    assert await next_close(tab) == {"type": "websocket.close", "code": signout.SIGNED_IN}
    for socket in (other, hers):
        await send(socket, send_frame("still here"))
        assert (await recv(socket))["type"] == "chat.accepted"
        await recv_until_done(socket)
