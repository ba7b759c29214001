"""The conversation API over HTTP: search, rename; bad input is a JSON 400, never a 500."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from django.test import Client

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
