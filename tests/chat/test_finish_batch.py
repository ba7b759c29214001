"""Replies that end together share commits, and each is still stored on its own if a lot fails."""

from __future__ import annotations

import contextvars
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.core.cache import caches
from django.db import OperationalError, connections

from chat import pipeline, response_cache
from chat.batching import Call
from chat.errors import BudgetExceeded
from chat.models import Message
from chat.owners import Owner
from chat.safety import limits
from config.sqlite_cache import SQLiteCache

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("titles_enqueued")]

# A cache whose server refuses connections (nothing listens on port 9).
DEAD_REDIS = {
    "BACKEND": "config.redis_cache.SharedRedisCache",
    "LOCATION": "redis://127.0.0.1:9/0",
    "OPTIONS": {"socket_connect_timeout": 0.2, "socket_timeout": 0.2},
}


def _call(kwargs: dict[str, Any]) -> Call:
    return Call(contextvars.copy_context(), kwargs)


def _pending(owners: list[Owner]) -> list[Any]:
    """Accept one send of each owner; return what their replies need."""
    sends = [
        _call(
            {
                "owner": owner,
                "client_ip": "10.0.0.8",
                "request": pipeline.SendRequest(
                    content=f"question {n}", client_msg_id=uuid.uuid4(), conversation_id=None
                ),
                "content": f"question {n}",
                "injection": None,
                "screen": None,
            }
        )
        for n, owner in enumerate(owners)
    ]
    outcomes = pipeline._admit_all(sends)
    assert all(ok for ok, _ in outcomes)
    return [accepted for _, (accepted, _prepared) in outcomes]


def _finish(accepted: Any, text: str) -> Call:
    return _call(
        {
            "accepted": accepted,
            "priced": True,
            "finish_kwargs": {
                "reply_id": accepted.reply_id,
                "content": text,
                "finish_reason": "stop",
                "model": accepted.model,
                "ttft_ms": 5,
                "latency_ms": 900,
                "prompt_tokens": 12,
                "completion_tokens": 30,
                "usage_estimated": False,
                "cost_usd": Decimal("0"),
                "error_code": "",
                "call_path": [{"model": accepted.model, "outcome": "ok"}],
                "moderation": None,
                "cached": False,
            },
        }
    )


@pytest.fixture
def owners(make_user) -> list[Owner]:
    return [Owner(user_id=make_user(f"user{n}").pk) for n in range(5)]


def poison(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
    """Fail any statement that would store the text "poison" (alone or among many rows)."""
    rows = params if many else [params]
    if any(row and "poison" in row for row in rows):
        raise OperationalError("canceling statement due to statement timeout")
    return execute(sql, params, many, context)


def _finished(accepted: list[Any]) -> list[tuple[str, str]]:
    rows = Message.objects.in_bulk([a.reply_id for a in accepted])
    return [(rows[a.reply_id].status, rows[a.reply_id].content) for a in accepted]


def test_replies_that_end_together_share_commits(owners, commits, monkeypatch, settings):
    settings.CHAT_DAILY_BUDGET_USD = "0.02"
    settings.CHAT_BUDGET_RESERVE_USD = "0.02"  # one reservation fills a day
    monkeypatch.setattr(pipeline, "FINISHES_PER_COMMIT", 2)
    accepted = _pending(owners)
    commits.made.clear()
    updates: list[int] = []  # rows per UPDATE call to the driver

    def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql.startswith("UPDATE"):
            updates.append(len(params) if many else 1)
        return execute(sql, params, many, context)

    with connections["default"].execute_wrapper(count):
        outcomes = pipeline._finish_all([_finish(a, f"answer {n}") for n, a in enumerate(accepted)])
    assert [ok for ok, _ in outcomes] == [True] * 5
    assert all(isinstance(cost, Decimal) for _, cost in outcomes)
    # Two lots of two in a transaction and one call to the driver each; the
    # last reply, alone, is one statement that commits itself.
    assert commits.made == ["default"] * 2
    assert updates == [2, 2, 1]
    assert _finished(accepted) == [("finished", f"answer {n}") for n in range(5)]
    # Each reservation was settled with the reply's real cost (the demo model's
    # is 0): every owner can reserve today's budget once more, and only once.
    for owner in owners:
        limits.check_send_limits(owner=owner, client_ip="10.0.0.8")
        with pytest.raises(BudgetExceeded):
            limits.check_send_limits(owner=owner, client_ip="10.0.0.8")


def test_a_lot_whose_commit_fails_is_stored_reply_by_reply(owners, monkeypatch, commits):
    monkeypatch.setattr(pipeline, "FINISHES_PER_COMMIT", 2)
    accepted = _pending(owners)
    before = commits.tried
    commits.fail_at = {before + 2}  # the second lot's
    outcomes = pipeline._finish_all([_finish(a, f"answer {n}") for n, a in enumerate(accepted)])
    # The first lot committed, the second failed to; the rest wrote one by one.
    assert commits.tried == before + 2
    assert len(commits.made) == before + 1
    assert [ok for ok, _ in outcomes] == [True] * 5
    assert _finished(accepted) == [("finished", f"answer {n}") for n in range(5)]


def test_one_reply_that_cannot_be_stored_costs_the_others_nothing(owners, monkeypatch):
    monkeypatch.setattr(pipeline, "FINISHES_PER_COMMIT", 2)
    accepted = _pending(owners)

    texts = ["answer 0", "poison", "answer 2", "answer 3", "answer 4"]
    with connections["default"].execute_wrapper(poison):
        outcomes = pipeline._finish_all(
            [_finish(a, text) for a, text in zip(accepted, texts, strict=True)]
        )
    assert [ok for ok, _ in outcomes] == [True, False, True, True, True]
    assert isinstance(outcomes[1][1], OperationalError)
    finished = _finished(accepted)
    assert finished[1] == ("pending", "")  # left to the reaper, as a failed store always was
    # Its lot-mate was rolled back with it, then stored on its own.
    assert [f for n, f in enumerate(finished) if n != 1] == [
        ("finished", text) for n, text in enumerate(texts) if n != 1
    ]


def _kept(accepted: Any, text: str) -> Call:
    """A finished reply that the response cache keeps, under a key of its own."""
    call = _finish(accepted, text)
    reply = response_cache.CachedReply(text=text, prompt_tokens=12, completion_tokens=30)
    call.kwargs["remember"] = {f"chat:response:test-{uuid.uuid4()}": reply}
    return call


def _keys(calls: list[Call]) -> list[str]:
    return [key for call in calls for key in call.kwargs["remember"]]


def test_replies_that_end_together_are_kept_in_the_response_cache_in_one_write(owners):
    accepted = _pending(owners)
    calls = [_kept(a, f"answer {n}") for n, a in enumerate(accepted)]
    cache = caches["default"]
    statements: list[str] = []
    if isinstance(cache, SQLiteCache):
        cache._db().set_trace_callback(statements.append)  # this thread's: the one _finish_all uses
    try:
        outcomes = pipeline._finish_all(calls)
    finally:
        if isinstance(cache, SQLiteCache):
            cache._db().set_trace_callback(None)
    assert [ok for ok, _ in outcomes] == [True] * 5
    found = response_cache.cache_lookup_many(_keys(calls))
    assert [found[key].text for key in _keys(calls)] == [f"answer {n}" for n in range(5)]
    if isinstance(cache, SQLiteCache):
        # One transaction for the five, and one read of the staff switch.
        writes = [i for i, sql in enumerate(statements) if "chat:response:test-" in sql]
        assert len(writes) == 5
        begins = [i for i, sql in enumerate(statements) if sql == "BEGIN IMMEDIATE"]
        begin = max(i for i in begins if i < writes[0])
        commit = statements.index("COMMIT", writes[-1])
        assert begin < writes[0] and writes[-1] < commit
        inside = statements[begin + 1 : commit]
        assert not any(sql.startswith(("BEGIN", "COMMIT")) for sql in inside)
        assert sum("response-cache:off" in sql for sql in statements) == 1


def test_a_reply_that_could_not_be_stored_is_not_kept_in_the_response_cache(owners):
    accepted = _pending(owners)

    calls = [_kept(a, "poison" if n == 1 else f"answer {n}") for n, a in enumerate(accepted)]
    with connections["default"].execute_wrapper(poison):
        outcomes = pipeline._finish_all(calls)
    assert [ok for ok, _ in outcomes] == [True, False, True, True, True]
    found = response_cache.cache_lookup_many(_keys(calls))
    assert sorted(found[key].text for key in found) == [f"answer {n}" for n in (0, 2, 3, 4)]


def test_a_response_cache_that_cannot_be_reached_costs_the_replies_nothing(
    owners, settings, caplog
):
    accepted = _pending(owners)
    settings.CACHES = {**settings.CACHES, "default": DEAD_REDIS}
    outcomes = pipeline._finish_all([_kept(a, f"answer {n}") for n, a in enumerate(accepted)])
    assert [ok for ok, _ in outcomes] == [True] * 5
    assert _finished(accepted) == [("finished", f"answer {n}") for n in range(5)]
    logged = "response cache unavailable (ConnectionError): the answers of 5 replies not kept"
    assert logged in caplog.text
