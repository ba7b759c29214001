"""Your own data over HTTP: download a conversation or everything, delete the account."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from chat import account
from chat.models import Conversation, Message
from feedback.models import Feedback, ReviewEvent
from monitoring.models import DailyUserSpend
from tests.chat.helpers import recv, send, send_frame
from tests.conftest import session_cookie_for
from tests.feedback.factories import conversation, exchange
from tests.monitoring.helpers import asgi_get

PASSWORD = "pw-123456!"  # tests/conftest.py's make_user
DATA = "/accounts/data/"
EXPORT_ALL = "/accounts/data/export/"
DELETE = "/accounts/data/delete/"
# Staff-only things seeded into alice's rows: none may reach her downloads.
STAFF_ONLY = (
    "STAFF-NOTE-MARK",
    "INJECTION-SIGNAL-MARK",
    "CALLPATH-MARK",
    "MODERATION-MARK",
    "injection_score",
    "call_path",
    "staff_note",
    "review_status",
    "assignee",
)


def export_url(conversation_id: int, format: str = "md") -> str:
    return f"/api/conversations/{conversation_id}/export/?format={format}"


def body(response: Any) -> str:
    assert response.streaming, "an export is streamed, not built in memory"
    return b"".join(response.streaming_content).decode()


@pytest.fixture
def alice(make_user: Any) -> Any:
    user = make_user("alice")
    user.email = "alice@example.org"
    user.save()
    return user


@pytest.fixture
def bob(make_user: Any) -> Any:
    return make_user("bob")


def client_for(user: Any) -> Client:
    client = Client(raise_request_exception=True)
    client.force_login(user)
    return client


@pytest.fixture
def story(alice: Any, bob: Any, make_user: Any) -> dict[str, Any]:
    """Alice's conversation (a replaced reply, a rating, staff-only marks) and Bob's."""
    staff = make_user("staff", staff=True)
    lasagne = conversation(user=alice)
    lasagne.title = "Lasagne"
    lasagne.save()
    asked, old = exchange(lasagne, question="Béchamel or ricotta?", answer="OLD-REPLY-MARK")
    Message.objects.filter(pk=asked.pk).update(
        injection_score=0.42, injection_signals=["INJECTION-SIGNAL-MARK"]
    )
    Message.objects.filter(pk=old.pk).update(superseded_at=timezone.now())
    reply = Message.objects.create(
        conversation=lasagne,
        role=Message.Role.ASSISTANT,
        content="Béchamel, **always**.",
        finish_reason=Message.FinishReason.STOP,
        reply_to=asked,
        model="openai:gpt-4o-mini",
        prompt_tokens=20,
        completion_tokens=40,
        cost_usd=Decimal("0.0012"),
        call_path=[{"model": "CALLPATH-MARK", "outcome": "ok"}],
        moderation={"stage": "output", "category": "MODERATION-MARK", "score": 0.1},
    )
    rated = Feedback.objects.create(
        message=reply,
        owner_key=f"u:{alice.pk}",
        user=alice,
        rating=1,
        reasons=["accurate"],
        comment="Exactly right",
        staff_note="STAFF-NOTE-MARK",
    )
    ReviewEvent.objects.create(feedback=rated, actor=staff, kind="note", after="STAFF-NOTE-MARK")
    empty = conversation(user=alice)
    trip = conversation(user=bob)
    exchange(trip, question="BOB-QUESTION-MARK", answer="BOB-ANSWER-MARK")
    return {"lasagne": lasagne, "reply": reply, "empty": empty, "trip": trip, "staff": staff}


# --- one conversation ---------------------------------------------------------------


@pytest.mark.django_db
def test_conversation_downloads_as_markdown_with_its_visible_messages(alice, story):
    response = client_for(alice).get(export_url(story["lasagne"].pk, "md"))
    assert response.status_code == 200
    assert response["Content-Type"] == "text/markdown; charset=utf-8"
    assert response["Content-Disposition"] == (
        f'attachment; filename="conversation-{story["lasagne"].pk}.md"'
    )
    assert response["Cache-Control"] == "private, no-store"
    text = body(response)
    assert text.startswith("# Lasagne\n")
    assert "## You · " in text and "Béchamel or ricotta?" in text
    assert "## Assistant (openai:gpt-4o-mini) · " in text and "Béchamel, **always**." in text
    assert text.index("Béchamel or ricotta?") < text.index("Béchamel, **always**.")
    assert "OLD-REPLY-MARK" not in text  # replaced by a regeneration: not in the history
    for mark in STAFF_ONLY:
        assert mark not in text


@pytest.mark.django_db
def test_conversation_downloads_as_json_with_role_text_time_model_finish_and_rating(alice, story):
    response = client_for(alice).get(export_url(story["lasagne"].pk, "json"))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"] == (
        f'attachment; filename="conversation-{story["lasagne"].pk}.json"'
    )
    text = body(response)
    data = json.loads(text)
    assert data["format"] == "chat-conversation" and data["version"] == 1
    conv = data["conversation"]
    assert conv["id"] == story["lasagne"].pk and conv["title"] == "Lasagne"
    question, reply = conv["messages"]
    assert question == {
        "id": question["id"],
        "role": "user",
        "text": "Béchamel or ricotta?",
        "created_at": question["created_at"],
    }
    dt.datetime.fromisoformat(question["created_at"])
    assert set(reply) == {
        "id",
        "role",
        "text",
        "created_at",
        "model",
        "finish_reason",
        "usage",
        "cost_usd",
        "feedback",
    }
    assert reply["role"] == "assistant" and reply["text"] == "Béchamel, **always**."
    assert reply["model"] == "openai:gpt-4o-mini" and reply["finish_reason"] == "stop"
    assert reply["usage"] == {"prompt_tokens": 20, "completion_tokens": 40}
    assert Decimal(reply["cost_usd"]) == Decimal("0.0012")
    assert reply["feedback"] == {"rating": 1, "reasons": ["accurate"], "comment": "Exactly right"}
    for mark in (*STAFF_ONLY, "OLD-REPLY-MARK"):
        assert mark not in text


@pytest.mark.django_db
def test_someone_elses_conversation_is_not_found_like_a_missing_one(alice, bob, story):
    """404, not 403: a guessed id must not tell whether the conversation exists."""
    as_bob = client_for(bob)
    missing = Conversation.objects.order_by("-pk").first().pk + 1000  # type: ignore[union-attr]
    for format in ("md", "json"):
        theirs = as_bob.get(export_url(story["lasagne"].pk, format))
        nothing = as_bob.get(export_url(missing, format))
        assert theirs.status_code == nothing.status_code == 404
        assert theirs.json() == nothing.json()
        assert theirs.json()["error"]["code"] == "not_found"
    visitor = Client()
    visitor.get("/")
    assert visitor.get(export_url(story["lasagne"].pk)).status_code == 404
    assert Client().get(export_url(story["lasagne"].pk)).status_code == 404


@pytest.mark.django_db
def test_an_unknown_format_is_refused_in_plain_words(alice, story):
    response = client_for(alice).get(export_url(story["lasagne"].pk, "pdf"))
    assert response.status_code == 400
    assert response.json()["error"]["message"] == 'The format must be "md" (Markdown) or "json".'


@pytest.mark.django_db
def test_an_anonymous_visitor_downloads_this_browsers_conversations():
    visitor = Client(raise_request_exception=True)
    visitor.get("/")
    mine = conversation(session_key=visitor.session.session_key)
    exchange(mine, question="VISITOR-QUESTION", answer="VISITOR-ANSWER")
    others = conversation(session_key="someone-elses-session")
    exchange(others, question="OTHER-VISITOR-MARK")

    one = body(visitor.get(export_url(mine.pk, "md")))
    assert "VISITOR-QUESTION" in one and "VISITOR-ANSWER" in one
    assert visitor.get(export_url(others.pk, "md")).status_code == 404

    everything = visitor.get(EXPORT_ALL)
    data = json.loads(body(everything))
    assert data["account"] is None
    assert [c["id"] for c in data["conversations"]] == [mine.pk]
    assert "OTHER-VISITOR-MARK" not in json.dumps(data)


# --- everything ---------------------------------------------------------------------


@pytest.mark.django_db
def test_all_my_data_is_one_json_file_with_account_conversations_and_ratings(alice, story):
    response = client_for(alice).get(EXPORT_ALL)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"].startswith('attachment; filename="chat-data-')
    assert response["Content-Disposition"].endswith('.json"')
    text = body(response)
    data = json.loads(text)
    assert data["format"] == "chat-account"
    assert data["account"]["username"] == "alice"
    assert data["account"]["email"] == "alice@example.org"
    dt.datetime.fromisoformat(data["account"]["date_joined"])
    conversations = {c["id"]: c for c in data["conversations"]}
    assert set(conversations) == {story["lasagne"].pk, story["empty"].pk}
    assert conversations[story["empty"].pk]["messages"] == []
    assert conversations[story["empty"].pk]["title"] == "New chat"
    assert [m["text"] for m in conversations[story["lasagne"].pk]["messages"]] == [
        "Béchamel or ricotta?",
        "Béchamel, **always**.",
    ]
    [rating] = data["feedback"]
    assert rating["message"] == story["reply"].pk
    assert rating["conversation"] == story["lasagne"].pk
    assert (rating["rating"], rating["reasons"], rating["comment"]) == (
        1,
        ["accurate"],
        "Exactly right",
    )
    for mark in (*STAFF_ONLY, "OLD-REPLY-MARK", "BOB-QUESTION-MARK", "BOB-ANSWER-MARK", "bob"):
        assert mark not in text


@pytest.mark.django_db
def test_a_big_account_is_read_page_by_page_and_still_complete(alice, monkeypatch):
    """Pages of 3 rows: conversations and messages cross page edges, nothing is lost."""
    monkeypatch.setattr(account, "PAGE_ROWS", 3)
    expected = {}
    for i in range(7):
        conv = conversation(user=alice)
        texts = []
        for j in range(i % 4):  # some with no messages, some over a page
            exchange(conv, question=f"q{i}.{j}", answer=f"a{i}.{j}")
            texts += [f"q{i}.{j}", f"a{i}.{j}"]
        expected[conv.pk] = texts
        if texts:
            Feedback.objects.create(
                message=conv.messages.filter(role="assistant").first(),
                owner_key=f"u:{alice.pk}",
                user=alice,
                rating=-1,
            )
    response = client_for(alice).get(EXPORT_ALL)
    chunks = list(response.streaming_content)
    assert len(chunks) > 7  # written as it is read, not in one piece
    data = json.loads(b"".join(chunks))
    got = {c["id"]: [m["text"] for m in c["messages"]] for c in data["conversations"]}
    assert got == expected
    assert [c["id"] for c in data["conversations"]] == sorted(expected)
    assert len(data["feedback"]) == 5


@pytest.mark.django_db(transaction=True)
async def test_under_asgi_the_download_is_sent_in_pieces(alice, story, monkeypatch):
    """The server (uvicorn) sends each chunk as it is made, not the whole file at the end."""
    monkeypatch.setattr(account, "PAGE_ROWS", 1)
    cookie = await database_sync_to_async(session_cookie_for)(alice)
    sent = await asgi_get(EXPORT_ALL, headers=[(b"cookie", cookie.encode())])
    start = sent[0]
    assert start["status"] == 200
    headers = {name.lower(): value for name, value in start["headers"]}
    assert headers[b"content-disposition"].startswith(b'attachment; filename="chat-data-')
    pieces = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert len(pieces) > 3
    data = json.loads(b"".join(p["body"] for p in pieces))
    assert {c["id"] for c in data["conversations"]} == {story["lasagne"].pk, story["empty"].pk}


@pytest.mark.django_db
def test_the_data_page_offers_the_download_and_the_deletion(alice):
    page = client_for(alice).get(DATA)
    assert page.status_code == 200
    html = page.content.decode()
    assert 'href="/accounts/data/export/"' in html
    assert 'action="/accounts/data/delete/"' in html
    assert "style=" not in html and "<style" not in html and "<script" not in html


# --- deleting the account -----------------------------------------------------------


def rows_of(user_id: int) -> dict[str, int]:
    return {
        "users": get_user_model().objects.filter(pk=user_id).count(),
        "conversations": Conversation.objects.filter(user_id=user_id).count(),
        "messages": Message.objects.filter(conversation__user_id=user_id).count(),
        "feedback": Feedback.objects.filter(owner_key=f"u:{user_id}").count()
        + Feedback.objects.filter(user_id=user_id).count(),
        "spend": DailyUserSpend.objects.filter(user_id=user_id).count(),
    }


@pytest.mark.django_db
def test_a_wrong_password_deletes_nothing_and_says_so(alice, story):
    client = client_for(alice)
    before = rows_of(alice.pk)
    response = client.post(DELETE, {"password": "not-my-password"})
    assert response.status_code == 400
    assert "That password is not right. Your account has not been deleted." in (
        response.content.decode()
    )
    assert rows_of(alice.pk) == before
    assert client.get(DATA).context["user"].is_authenticated
    assert client.post(DELETE, {}).status_code == 400


@pytest.mark.django_db
def test_deleting_the_account_leaves_no_row_of_it_and_signs_out(alice, bob, story):
    DailyUserSpend.objects.create(day=dt.date(2025, 1, 2), user_id=alice.pk, cost_usd=1)
    bobs = rows_of(bob.pk)
    client = client_for(alice)
    response = client.post(DELETE, {"password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/accounts/data/deleted/"
    assert rows_of(alice.pk) == {
        "users": 0,
        "conversations": 0,
        "messages": 0,
        "feedback": 0,
        "spend": 0,
    }
    assert not Message.objects.filter(content__contains="Béchamel").exists()
    assert not ReviewEvent.objects.filter(after="STAFF-NOTE-MARK").exists()
    assert rows_of(bob.pk) == bobs
    gone = client.get(response["Location"])
    assert gone.status_code == 200 and "Your account has been deleted" in gone.content.decode()
    assert not gone.context["user"].is_authenticated
    assert client.get(EXPORT_ALL).status_code in (200, 302)  # a visitor now, with nothing
    assert client.get(export_url(story["lasagne"].pk)).status_code == 404


@pytest.mark.django_db
def test_in_anonymise_mode_the_numbers_stay_without_text_or_owner(alice, story, settings):
    settings.MONITORING_RETENTION_MODE = "anonymise"
    day = dt.date(2025, 1, 2)
    DailyUserSpend.objects.create(day=day, user_id=alice.pk, replies=2, cost_usd=Decimal("1.5"))
    DailyUserSpend.objects.create(day=day, user_id=0, replies=1, cost_usd=Decimal("0.5"))
    lasagne = story["lasagne"].pk
    cost_before = sum(m.cost_usd for m in Message.objects.filter(conversation_id=lasagne))

    response = client_for(alice).post(DELETE, {"password": PASSWORD})
    assert response.status_code == 302
    assert rows_of(alice.pk)["users"] == 0
    kept = Conversation.objects.get(pk=lasagne)
    assert kept.user_id is None and kept.title == "" and kept.session_key == "anonymised"
    messages = Message.objects.filter(conversation_id=lasagne)
    assert {m.content for m in messages} == {""}
    assert sum(m.cost_usd for m in messages) == cost_before
    rating = Feedback.objects.get(message=story["reply"])
    assert (rating.rating, rating.reasons, rating.comment, rating.user_id) == (
        1,
        ["accurate"],
        "",
        None,
    )
    [anonymous] = DailyUserSpend.objects.filter(day=day)
    assert (anonymous.user_id, anonymous.replies, anonymous.cost_usd) == (0, 3, Decimal("2"))


@pytest.mark.django_db
def test_deleting_is_rate_limited_per_account(alice, settings):
    settings.CHAT_RATELIMIT_ACCOUNT_DELETE = "2/m"
    client = client_for(alice)
    for _ in range(2):
        assert client.post(DELETE, {"password": "guess"}).status_code == 400
    refused = client.post(DELETE, {"password": PASSWORD})
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert "too many attempts" in refused.content.decode().lower()
    assert rows_of(alice.pk)["users"] == 1


@pytest.mark.django_db
def test_deleting_needs_the_csrf_token_and_a_post(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.post(DELETE, {"password": PASSWORD}).status_code == 403
    assert client.get(DELETE).status_code == 405
    assert rows_of(alice.pk)["users"] == 1
    assert Client().post(DELETE, {"password": PASSWORD}).status_code == 302  # to sign in
    assert rows_of(alice.pk)["users"] == 1


@pytest.fixture
def slow_demo(settings: Any) -> None:
    settings.CHAT_DEMO_TPS = 20
    settings.CHAT_DEMO_REPLY_TOKENS = 60


@pytest.mark.parametrize("mode", ["delete", "anonymise"])
@pytest.mark.django_db(transaction=True)
async def test_a_reply_streaming_while_the_account_goes_stores_nothing_back(
    ws, alice, slow_demo, settings, mode
):
    """The reply's final store races the deletion: it must neither fail loudly nor write text."""
    settings.MONITORING_RETENTION_MODE = mode
    comm = await ws(await database_sync_to_async(session_cookie_for)(alice))
    await send(comm, send_frame("Tell me a long story"))
    accepted = await recv(comm)
    assert accepted["type"] == "chat.accepted", accepted
    first = await recv(comm)
    assert first["type"] == "chat.delta"

    await database_sync_to_async(account.account_delete)(user_id=alice.pk)
    # The account's sockets close once it is gone; no error is shown before.
    frames = []
    while (output := await comm.receive_output(timeout=10))["type"] == "websocket.send":
        frames.append(json.loads(output["text"]))
    assert output == {"type": "websocket.close", "code": 4401}
    assert not [f for f in frames if f["type"] == "chat.error"], frames

    from chat.replay import hub

    task = hub.running_task(accepted["message"])
    if task is not None:  # stopped by the deletion: it ends cancelled
        await asyncio.wait({task}, timeout=20)

    def stored() -> list[tuple[str, str]]:
        return list(
            Message.objects.filter(conversation_id=accepted["conversation"]).values_list(
                "content", "status"
            )
        )

    rows = await database_sync_to_async(stored)()
    if mode == "delete":
        assert rows == []
    else:
        assert rows and all(text == "" and status == "finished" for text, status in rows)
    assert await database_sync_to_async(rows_of)(alice.pk) == {
        "users": 0,
        "conversations": 0,
        "messages": 0,
        "feedback": 0,
        "spend": 0,
    }


@pytest.mark.django_db(transaction=True)
async def test_deleting_the_account_stops_the_reply_it_was_being_written(ws, alice, settings):
    """The model is not left writing (and billing) a reply for an account that is gone."""
    from chat.replay import hub
    from tests.monitoring.helpers import TOKEN, scrape, value

    settings.METRICS_TOKEN = TOKEN
    settings.CHAT_DEMO_TPS = 5
    settings.CHAT_DEMO_REPLY_TOKENS = 50
    client = await database_sync_to_async(client_for)(alice)
    comm = await ws(f"sessionid={client.cookies['sessionid'].value}")
    await send(comm, send_frame("a long answer, please"))
    accepted = await recv(comm)
    assert accepted["type"] == "chat.accepted", accepted
    assert (await recv(comm))["type"] == "chat.delta"
    before = await database_sync_to_async(scrape)()

    deleted = await database_sync_to_async(client.post)(DELETE, {"password": PASSWORD})
    assert deleted.status_code == 302
    while (output := await comm.receive_output(timeout=10))["type"] == "websocket.send":
        pass
    assert output == {"type": "websocket.close", "code": 4401}
    task = hub.running_task(accepted["message"])
    if task is not None:
        done, _ = await asyncio.wait({task}, timeout=30)
        assert done, "the reply is still being written"
    after = await database_sync_to_async(scrape)()

    def counted(outcome: str) -> float:
        return value(after, "ai_requests_total", model="demo:demo", outcome=outcome) - value(
            before, "ai_requests_total", model="demo:demo", outcome=outcome
        )

    assert (counted("cancelled"), counted("stop")) == (1, 0)
