"""The hostile corpus through the WebSocket and HTTP: the right error or stored verbatim-safe.

tests/safety/data/hostile.jsonl holds payloads with the outcome each must get:
`stored` (accepted, stored exactly as the input checker cleans it, and read
back over HTTP unchanged), `invalid_input` or `blocked_input`. Frame-level
attacks (huge, deeply nested, binary, wrong types) are generated here. Nothing
may crash the socket or answer `internal`. The number of payloads tried is
printed.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from chat.models import Conversation, Message
from chat.safety.input import check_user_text
from tests.chat.helpers import recv, recv_until_done, send, send_frame
from tests.safety.helpers import chat, cookie_for

pytestmark = pytest.mark.django_db(transaction=True)

CORPUS = [
    json.loads(line)
    for line in (Path(__file__).parent / "data" / "hostile.jsonl").read_text().splitlines()
    if line.strip()
]
TRIED: dict[str, int] = {}


def _count(channel: str, n: int = 1) -> None:
    TRIED[channel] = TRIED.get(channel, 0) + n


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    if TRIED:
        total = sum(TRIED.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items()))
        print(f"\nhostile payloads tried: {total} ({detail})")


@pytest.fixture
def roomy(settings: Any) -> None:
    settings.CHAT_RATELIMIT_USER = "10000/m"
    settings.CHAT_ABUSE_THRESHOLD = 10_000


@database_sync_to_async
def stored_user_message(message_id: int) -> Message:
    return Message.objects.get(pk=message_id)


async def test_corpus_through_the_websocket_and_read_back_over_http(ws, make_user, roomy):
    comm = await ws(await cookie_for(make_user))
    outcomes: dict[str, str] = {}
    conversations: dict[int, str] = {}
    for row in CORPUS:
        payload, expect = row["payload"], row["expect"]
        frames = await chat(comm, payload)
        _count("websocket")
        first = frames[0]
        got = first["code"] if first["type"] == "chat.error" else "stored"
        outcomes[payload] = got
        assert got == expect, (row, first)
        if got == "stored":
            assert frames[-1]["type"] == "chat.done" and frames[-1]["finish_reason"] == "stop"
            stored = await stored_user_message(first["user_message"])
            assert stored.content == check_user_text(payload, max_chars=10**6)
            conversations[first["conversation"]] = stored.content
        else:
            assert (first["message"] and payload not in first["message"]) or len(payload) < 2
    assert len(outcomes) == len({r["payload"] for r in CORPUS})

    def read_back() -> None:
        from django.contrib.auth import get_user_model

        client = Client()
        client.force_login(get_user_model().objects.get(username="alice"))
        for conversation, content in conversations.items():
            response = client.get(f"/api/conversations/{conversation}/messages/")
            _count("http read-back")
            assert response.status_code == 200
            assert response["Content-Type"] == "application/json"
            assert response.json()["messages"][0]["content"] == content

    await database_sync_to_async(read_back)()


def _frames() -> list[tuple[str, str | bytes]]:
    nested = "[" * 50_000 + "]" * 50_000
    nested_obj = '{"type":"chat.send","content":' + '{"a":' * 20_000 + "1" + "}" * 20_000 + "}"
    return [
        ("not json", "<script>alert(1)</script>"),
        ("deeply nested array", nested[:60_000]),
        ("deeply nested object", nested_obj[:60_000]),
        ("huge frame", json.dumps(send_frame("x" * 200_000))),
        ("huge content under the frame limit", json.dumps(send_frame("x" * 20_000))),
        ("array", "[]"),
        ("number", "42"),
        ("null", "null"),
        ("string", '"chat.send"'),
        ("type is a list", json.dumps({"type": ["chat.send"]})),
        ("type is huge", json.dumps({"type": "x" * 10_000})),
        ("content is an object", json.dumps(send_frame({"$ne": None}))),
        ("content is a number", json.dumps(send_frame(1e308))),
        ("client_msg_id is html", json.dumps({**send_frame("hi"), "client_msg_id": "<b>"})),
        ("conversation is a float", json.dumps(send_frame("hi", conversation=1.5))),
        ("conversation is negative", json.dumps(send_frame("hi", conversation=-1))),
        ("conversation is huge", json.dumps(send_frame("hi", conversation=10**40))),
        ("stop with a string id", json.dumps({"type": "chat.stop", "message": "1 OR 1=1"})),
        (
            "resume with negative after",
            json.dumps({"type": "chat.resume", "message": 1, "after": -5}),
        ),
        ("NaN", '{"type":"chat.send","content":NaN,"client_msg_id":"' + str(uuid.uuid4()) + '"}'),
        ("duplicate keys", '{"type":"chat.send","type":"chat.stop"}'),
        ("binary frame", b"\x00\xff\xfe binary"),
        ("invalid utf-8 as bytes", b'{"type":"chat.send","content":"\xc3\x28"}'),
    ]


async def test_hostile_frames_get_an_error_frame_and_the_socket_survives(ws, make_user, roomy):
    comm = await ws(await cookie_for(make_user))
    for name, frame in _frames():
        if isinstance(frame, bytes):
            await comm.send_to(bytes_data=frame)
        else:
            await send(comm, frame)
        _count("websocket frames")
        reply = await recv(comm)
        if reply["type"] == "chat.accepted":
            await recv_until_done(comm)
            continue
        assert reply["type"] == "chat.error", name
        assert reply["code"] in ("invalid_input", "not_found"), (name, reply)
    # Still alive and serving.
    assert (await chat(comm, "still there?"))[-1]["type"] == "chat.done"


def _http_targets(payload: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("/accounts/login/", {"username": payload, "password": payload}),
        ("/accounts/signup/", {"username": payload, "password1": payload, "password2": payload}),
    ]


def test_corpus_through_http_forms_and_the_feedback_api(make_user, settings):
    settings.CHAT_RATELIMIT_LOGIN = "100000/m"
    settings.CHAT_RATELIMIT_SIGNUP = "100000/m"
    settings.CHAT_RATELIMIT_PASSWORD_RESET = "100000/m"
    settings.FEEDBACK_RATELIMIT = "100000/m"
    make_user("alice")
    client = Client(raise_request_exception=True)
    api = Client(raise_request_exception=True)
    api.login(username="alice", password="pw-123456!")
    for row in CORPUS:
        payload = row["payload"]
        for path, data in _http_targets(payload):
            # Encoded by hand: lone surrogates go out as the raw bytes a hostile
            # client would send (the test client refuses to encode them).
            body = urlencode({k: v.encode("utf-8", "surrogatepass") for k, v in data.items()})
            response = client.post(path, body, content_type="application/x-www-form-urlencoded")
            _count("http forms")
            assert response.status_code in (200, 302, 400), (path, payload)
            if "<script>" in payload and response.status_code == 200:
                assert b"<script>alert(1)</script>" not in response.content
        body = {"message": 999_999, "rating": -1, "reasons": [payload], "comment": payload}
        response = api.post("/api/feedback/", json.dumps(body), content_type="application/json")
        _count("http feedback api")
        assert response.status_code in (400, 404), (payload, response.content)
        assert response["Content-Type"].startswith("application/json")
    raw_bodies = [b"{", b"[" * 10, b"\xff\xfe", b'{"message": NaN}', b"null", b"1e999"]
    for raw in raw_bodies:
        response = api.post("/api/feedback/", raw, content_type="application/json")
        _count("http feedback api")
        assert response.status_code in (400, 404), raw


def test_corpus_through_the_conversation_api(make_user):
    """Each payload as a search and as a new title: a list, a title or a JSON 400."""
    alice = make_user("alice")
    conversation = Conversation.objects.create(user=alice, title="Kept")
    api = Client(raise_request_exception=True)
    api.force_login(alice)
    for row in CORPUS:
        payload = row["payload"]
        # Encoded by hand, as above: a lone surrogate goes out as raw bytes.
        query = urlencode({"q": payload.encode("utf-8", "surrogatepass")})
        searched = api.get(f"/api/conversations/?{query}")
        body = json.dumps({"title": payload})
        renamed = api.patch(
            f"/api/conversations/{conversation.pk}/", body, content_type="application/json"
        )
        _count("http conversation api", 2)
        for response in (searched, renamed):
            assert response.status_code in (200, 400), (payload, response.content)
            assert response["Content-Type"] == "application/json"
            if response.status_code == 400:
                assert response.json()["error"]["code"] == "invalid_input", payload


def test_deeply_nested_json_body_is_a_400_not_a_500(make_user):
    make_user("alice")
    api = Client(raise_request_exception=True)
    api.login(username="alice", password="pw-123456!")
    response = api.post("/api/feedback/", b"[" * 10_000, content_type="application/json")
    _count("http feedback api")
    assert response.status_code == 400
