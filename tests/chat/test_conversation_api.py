"""The conversation API over HTTP: search, rename; bad input is a JSON 400, never a 500."""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db

LIST = "/api/conversations/"


@pytest.fixture
def alice(make_user: Any) -> Any:
    return make_user("alice")


@pytest.fixture
def api(alice: Any) -> Client:
    # A server error raises here instead of passing as a 500 page.
    client = Client(raise_request_exception=True)
    client.force_login(alice)
    return client


@pytest.fixture
def conversations(alice: Any) -> dict[str, Conversation]:
    lasagne = Conversation.objects.create(user=alice, title="Lasagne")
    Message.objects.create(
        conversation=lasagne, role=Message.Role.USER, content="béchamel or ricotta?"
    )
    trip = Conversation.objects.create(user=alice, title="Trip to Lyon")
    return {"lasagne": lasagne, "trip": trip}


def _titles(response: Any) -> list[str]:
    assert response.status_code == 200, response.content
    return [c["title"] for c in response.json()["conversations"]]


def _refused(response: Any) -> str:
    """Assert the response is the JSON invalid_input error; return its sentence."""
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    return str(error["message"])


def test_search_matches_titles_and_message_text(api, conversations):
    assert _titles(api.get(LIST, {"q": "lyon"})) == ["Trip to Lyon"]
    assert _titles(api.get(LIST, {"q": "  béCHAMEL  "})) == ["Lasagne"]
    assert _titles(api.get(LIST)) == ["Trip to Lyon", "Lasagne"]


def test_search_typed_decomposed_finds_text_stored_composed(api, conversations):
    assert _titles(api.get(LIST, {"q": "be\u0301chamel"})) == ["Lasagne"]


def test_search_with_a_null_character_is_refused_as_invalid_input(api, conversations):
    """PostgreSQL refused the NUL with a 500; SQLite matched every conversation."""
    sentence = _refused(api.get(f"{LIST}?q=%00abc"))
    assert "null character" in sentence


@pytest.mark.parametrize(
    "query",
    ["%00", "lyon%00", "%1B%5B31m", "%7F", "%C2%80", "ly%E2%80%AEon"],
    ids=["nul", "trailing-nul", "escape", "delete", "c1-control", "bidi-override"],
)
def test_search_with_text_no_one_can_store_is_refused(api, conversations, query):
    _refused(api.get(f"{LIST}?q={query}"))


def test_search_of_only_spaces_or_invisible_characters_lists_everything(api, conversations):
    assert len(_titles(api.get(LIST, {"q": "   "}))) == 2
    assert len(_titles(api.get(LIST, {"q": "\u200b\ufeff"}))) == 2


def test_a_long_search_is_cut_not_refused(api, conversations):
    assert _titles(api.get(LIST, {"q": "lyon" * 5000})) == []
    assert _titles(api.get(LIST, {"q": "lyon" + " " * 5000 + "lyon"})) == []


def _rename(api: Client, conversation: Conversation, body: bytes | str) -> Any:
    return api.patch(
        f"/api/conversations/{conversation.pk}/", data=body, content_type="application/json"
    )


def test_rename_sets_the_title(api, conversations):
    response = _rename(api, conversations["trip"], json.dumps({"title": "Lyon in May"}))
    assert response.status_code == 200
    assert response.json()["title"] == "Lyon in May"


@pytest.mark.parametrize(
    "body",
    [
        # Small enough for the size limit; the parser gives up with RecursionError.
        b"[" * 50_000 + b"]" * 50_000,
        b'{"title": ' + b"[" * 50_000,
        # The audit's body, over the size limit.
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe not utf-8",
        b"{",
        b"",
        b"null",
        b'["title", "x"]',
    ],
    ids=[
        "deeply-nested",
        "deeply-nested-in-object",
        "oversized",
        "not-utf8",
        "truncated",
        "empty",
        "null",
        "array",
    ],
)
def test_rename_with_a_body_that_is_no_json_object_is_a_json_400(api, conversations, body, caplog):
    caplog.set_level(logging.WARNING)
    _refused(_rename(api, conversations["trip"], body))
    conversations["trip"].refresh_from_db()
    assert conversations["trip"].title == "Trip to Lyon"
    # A client's mistake: no ERROR log line (which would also be a Sentry event).
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("title", ["Lyon\x00", "\u202eLyon", 5, None])
def test_rename_to_a_title_no_one_can_store_is_refused(api, conversations, title):
    _refused(_rename(api, conversations["trip"], json.dumps({"title": title})))
    conversations["trip"].refresh_from_db()
    assert conversations["trip"].title == "Trip to Lyon"


# --------------------------------------------------------------------------- paging


def _spread(owner: Any, count: int, *, title: str, start: datetime, ties: int = 1) -> list[int]:
    """Create `count` conversations a minute apart, `ties` at a time sharing one updated_at."""
    created = Conversation.objects.bulk_create(
        [Conversation(user=owner, title=f"{title} {i}") for i in range(count)]
    )
    for i, conversation in enumerate(created):
        Conversation.objects.filter(pk=conversation.pk).update(
            updated_at=start + timedelta(minutes=i // ties)
        )
    return [c.pk for c in created]


def _walk(
    api: Client, *, params: dict[str, str] | None = None, between: Any = None
) -> list[dict[str, Any]]:
    """Follow `next` from the first page to the last; call `between(page_number)` after each."""
    seen: list[dict[str, Any]] = []
    cursor = ""
    pages = 0
    while True:
        response = api.get(LIST, {**(params or {}), **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.content
        body = response.json()
        assert set(body) == {"conversations", "next"}
        assert len(body["conversations"]) <= 100
        seen += body["conversations"]
        pages += 1
        assert pages < 50, "the cursor does not advance"
        if body["next"] is None:
            return seen
        cursor = body["next"]
        if between is not None:
            between(pages)


def _keys(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(r["updated_at"], r["id"]) for r in rows]


def test_the_list_pages_past_100_without_repeats_or_gaps_while_conversations_change(
    api, alice, make_user
):
    """250 conversations, ties on updated_at across page edges, and between pages new
    conversations, an update to one already seen and one not yet seen, and someone
    else's: every conversation that stayed put comes exactly once, in order."""
    bob = make_user("bob")
    start = datetime(2024, 1, 1, tzinfo=UTC)
    # Seven to a timestamp: pages of 100 end inside a tie, kept apart by id.
    ids = _spread(alice, 250, title="Old", start=start, ties=7)
    _spread(bob, 40, title="Bob's", start=start, ties=3)
    moved_unseen = ids[5]  # among the oldest: on the last page until it is updated
    moved: list[int] = []
    created: list[int] = []

    def meanwhile(page: int) -> None:
        first_seen = ids[-1]  # the newest: on the first page
        for pk in (first_seen, moved_unseen) if page == 1 else ():
            Conversation.objects.filter(pk=pk).update(updated_at=timezone.now())
            moved.append(pk)
        created.extend(_spread(alice, 3, title=f"New {page}", start=timezone.now()))
        _spread(bob, 2, title="Bob's new", start=timezone.now())

    walked = _walk(api, between=meanwhile)
    walked_ids = [r["id"] for r in walked]
    assert len(walked_ids) == len(set(walked_ids)), "a conversation came twice"
    assert set(walked_ids) == set(ids) - {moved_unseen}
    assert _keys(walked) == sorted(_keys(walked), reverse=True)
    # What moved or was created meanwhile is at the top of the list.
    top = api.get(LIST).json()
    assert {r["id"] for r in top["conversations"][: len(created) + 2]} == {
        *created,
        *moved,
    }
    assert len(top["conversations"]) == 100 and top["next"]


def test_search_results_page_the_same_way(api, alice, make_user):
    """150 matching conversations (by title or by messages, some by several) page
    through ?q= with no repeats and nothing that does not match."""
    start = datetime(2024, 1, 1, tzinfo=UTC)
    by_title = _spread(alice, 90, title="Kayak", start=start, ties=4)
    by_text = _spread(alice, 60, title="Trip", start=start + timedelta(days=1), ties=5)
    for pk in by_text:
        Message.objects.bulk_create(
            [
                Message(conversation_id=pk, role=Message.Role.USER, content="A kayak on the Rhône"),
                Message(conversation_id=pk, role=Message.Role.USER, content="Which kayak?"),
            ]
        )
    _spread(alice, 120, title="Lasagne", start=start, ties=2)
    _spread(make_user("bob"), 20, title="Kayak", start=start)

    walked = _walk(api, params={"q": "KAYAK"})
    walked_ids = [r["id"] for r in walked]
    assert len(walked_ids) == len(set(walked_ids)) == 150
    assert set(walked_ids) == {*by_title, *by_text}
    assert _keys(walked) == sorted(_keys(walked), reverse=True)


def test_a_short_list_is_one_page_shaped_as_before(api, conversations):
    """Clients that know nothing of paging get the same object, with `next` null."""
    body = api.get(LIST).json()
    assert body["next"] is None
    assert [c["title"] for c in body["conversations"]] == ["Trip to Lyon", "Lasagne"]
    assert set(body["conversations"][0]) == {"id", "title", "titled", "updated_at"}


def test_someone_elses_cursor_is_only_a_position_in_ones_own_list(api, alice, make_user):
    """A cursor made from another user's list shows nothing of theirs."""
    bob = make_user("bob")
    start = datetime(2024, 1, 1, tzinfo=UTC)
    mine = _spread(alice, 30, title="Mine", start=start)
    _spread(bob, 130, title="Bob's", start=start)
    bobs_api = Client(raise_request_exception=True)
    bobs_api.force_login(bob)
    bobs_cursor = bobs_api.get(LIST).json()["next"]
    assert bobs_cursor

    shown = api.get(LIST, {"cursor": bobs_cursor}).json()["conversations"]
    assert shown and {c["id"] for c in shown} <= set(mine)
    assert {c["id"] for c in _walk(bobs_api)}.isdisjoint(mine)


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!",
        "%00",
        "a",  # a length no base64 has
        "A" * 5000,
        "é",
        _b64("hello"),
        _b64("12:"),
        _b64(":12"),
        _b64("-1:5"),
        _b64("1:-5"),
        _b64("1:0"),
        _b64("1.5:2"),
        _b64("1:2:3"),
        _b64(" 1:2"),
        _b64("1:2\n"),
        _b64("1:" + "9" * 19),  # past bigint
        _b64("9" * 18 + ":1"),  # past the year 9999
        _b64(b"\xff\xfe:1"),
        _b64("\u0661:\u0662"),  # digits, but not ASCII ones
    ],
)
def test_a_cursor_the_server_did_not_make_is_invalid_input(api, conversations, cursor):
    """Any cursor but one the server made is a JSON 400, never a 500 or a wrong page."""
    _refused(api.get(f"{LIST}?cursor={cursor}"))
    _refused(api.get(LIST, {"cursor": cursor, "q": "lyon"}))
