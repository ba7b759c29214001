"""What limits do when their counter store (Redis in the scaled mode) is down.

The choice is docs/decisions/0004-ratelimit-when-redis-is-down.md: fail open to
a per-process fallback (RATELIMIT_FAIL_OPEN, the default), or fail closed.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.safety.helpers import chat, cookie_for

pytestmark = pytest.mark.django_db(transaction=True)

DEAD_REDIS = {
    "BACKEND": "chat.safety.cache.FailSoftRedisCache",
    "LOCATION": "redis://127.0.0.1:9/0",
    "OPTIONS": {"socket_connect_timeout": 0.2, "socket_timeout": 0.2},
}


@pytest.fixture
def store_down(settings: Any) -> None:
    settings.CACHES = {**settings.CACHES, "ratelimit": DEAD_REDIS}


async def test_chat_keeps_working_and_limits_fall_back_to_this_process(
    ws, make_user, settings, store_down, caplog
):
    settings.CHAT_RATELIMIT_USER = "2/m"
    comm = await ws(await cookie_for(make_user))
    assert (await chat(comm))[-1]["type"] == "chat.done"
    assert (await chat(comm))[-1]["type"] == "chat.done"
    [error] = await chat(comm)
    assert error["code"] == "rate_limited" and 1 <= error["retry_after"] <= 60
    assert "rate-limit cache unavailable" in caplog.text


async def test_budget_falls_back_to_the_stored_spend(ws, make_user, settings, store_down):
    settings.CHAT_RATELIMIT_USER = "100/m"
    settings.CHAT_DAILY_BUDGET_TOKENS = 30
    comm = await ws(await cookie_for(make_user))
    outcomes = [(await chat(comm, f"hi {n}"))[0] for n in range(4)]  # new questions: not cached
    codes = [o.get("code", o["type"]) for o in outcomes]
    assert codes[0] == "chat.accepted" and "budget_exceeded" in codes


async def test_fail_closed_refuses_every_message(ws, make_user, settings, store_down):
    settings.RATELIMIT_FAIL_OPEN = False
    comm = await ws(await cookie_for(make_user))
    [error] = await chat(comm)
    assert error["code"] == "rate_limited"


def test_sign_in_still_works_with_the_store_down(make_user, store_down):
    make_user("alice")
    response = Client().post("/accounts/login/", {"username": "alice", "password": "pw-123456!"})
    assert response.status_code == 302


def test_counting_many_with_the_store_down_counts_none(store_down, caplog, monkeypatch):
    from django.core.cache import caches

    from chat.safety.cache import FailSoftRedisCache

    monkeypatch.setattr(FailSoftRedisCache, "_last_warning", 0.0)  # one warning per 30 s

    assert caches["ratelimit"].count_many([("a", 60), ("b", 60)]) == [None, None]
    assert "rate-limit cache unavailable (count_many)" in caplog.text
