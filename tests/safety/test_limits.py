"""Rate limits, daily budgets and abuse blocks on chat messages (chat/safety/limits.py)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.test import Client
from django.utils import timezone

from chat.models import AbuseBlock
from tests.chat.helpers import recv, recv_until_done, send, send_frame
from tests.safety.helpers import blocks, chat, cookie_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    scopes: list[str] = []
    monkeypatch.setattr("chat.safety.limits.metrics.ratelimited", scopes.append)
    return scopes


async def test_signed_in_user_is_limited_per_user_with_retry_after(
    ws, make_user, settings, counted
):
    settings.CHAT_RATELIMIT_USER = "3/m"
    comm = await ws(await cookie_for(make_user))
    for _ in range(3):
        assert (await chat(comm))[-1]["type"] == "chat.done"
    [error] = await chat(comm)
    assert error["code"] == "rate_limited"
    assert 1 <= error["retry_after"] <= 60
    assert f"wait {error['retry_after']} second" in error["message"]
    assert counted == ["user"]
    # Another user is counted on their own.
    other = await ws(await cookie_for(make_user, "bob"))
    assert (await chat(other))[-1]["type"] == "chat.done"
    # A second socket of the same user shares the counter.
    again = await ws(await _same_user_cookie())
    [error] = await chat(again)
    assert error["code"] == "rate_limited"


@database_sync_to_async
def _same_user_cookie() -> str:
    from django.contrib.auth import get_user_model

    from tests.conftest import session_cookie_for

    return session_cookie_for(get_user_model().objects.get(username="alice"))


async def test_anonymous_visitors_are_limited_per_ip(ws, settings, counted):
    settings.CHAT_RATELIMIT_ANON = "2/m"
    settings.CHAT_RATELIMIT_USER = "100/m"
    first = await ws(await cookie_for(None, None))
    second = await ws(await cookie_for(None, None))  # a new session, the same IP
    assert (await chat(first))[-1]["type"] == "chat.done"
    assert (await chat(second))[-1]["type"] == "chat.done"
    [error] = await chat(first)
    assert error["code"] == "rate_limited" and error["retry_after"] >= 1
    assert counted == ["anon"]


def test_anonymous_visitors_on_other_ips_are_counted_apart(db, settings):
    from chat.errors import RateLimited
    from chat.owners import Owner
    from chat.safety.limits import check_send_limits

    settings.CHAT_RATELIMIT_ANON = "1/m"
    settings.CHAT_RATELIMIT_USER = "1/m"
    check_send_limits(owner=Owner(user_id=None, session_key="s1"), client_ip="10.0.0.1")
    with pytest.raises(RateLimited):  # another session, the same address
        check_send_limits(owner=Owner(user_id=None, session_key="s2"), client_ip="10.0.0.1")
    check_send_limits(owner=Owner(user_id=None, session_key="s3"), client_ip="10.0.0.2")
    # Signed-in users are counted by user, wherever they send from.
    check_send_limits(owner=Owner(user_id=1), client_ip="10.0.0.2")
    check_send_limits(owner=Owner(user_id=2), client_ip="10.0.0.2")
    with pytest.raises(RateLimited):
        check_send_limits(owner=Owner(user_id=1), client_ip="10.0.0.3")


def test_anonymous_ipv6_visitors_are_counted_per_64_network(db, settings):
    # One host can hold a whole /64: its addresses share a count.
    from chat.errors import RateLimited
    from chat.owners import Owner
    from chat.safety.limits import check_send_limits

    settings.CHAT_RATELIMIT_ANON = "1/m"
    check_send_limits(owner=Owner(user_id=None, session_key="s1"), client_ip="2001:db8:1:2::10")
    with pytest.raises(RateLimited):
        check_send_limits(owner=Owner(user_id=None, session_key="s2"), client_ip="2001:db8:1:2::99")
    check_send_limits(owner=Owner(user_id=None, session_key="s3"), client_ip="2001:db8:1:3::10")


def test_a_window_ends_when_its_retry_after_says(db, settings, monkeypatch):
    from chat.errors import RateLimited
    from chat.owners import Owner
    from chat.safety import limits

    settings.CHAT_RATELIMIT_USER = "2/m"
    now = [1_700_000_000.0]
    monkeypatch.setattr(limits.time, "time", lambda: now[0])
    owner = Owner(user_id=7)
    limits.check_send_limits(owner=owner, client_ip="")
    limits.check_send_limits(owner=owner, client_ip="")
    with pytest.raises(RateLimited) as refused:
        limits.check_send_limits(owner=owner, client_ip="")
    wait = refused.value.retry_after
    assert wait is not None and 1 <= wait <= 60
    now[0] += wait - 1.5
    with pytest.raises(RateLimited):  # still the same window
        limits.check_send_limits(owner=owner, client_ip="")
    now[0] += 1.5
    limits.check_send_limits(owner=owner, client_ip="")  # a new window
    # Other users' windows end at other times (an offset per user), not all at once.
    ends = set()
    for user_id in range(20):
        other = Owner(user_id=1000 + user_id)
        limits.check_send_limits(owner=other, client_ip="")
        limits.check_send_limits(owner=other, client_ip="")
        with pytest.raises(RateLimited) as refused:
            limits.check_send_limits(owner=other, client_ip="")
        ends.add(refused.value.retry_after)
    assert len(ends) > 1


def test_rate_limits_can_be_switched_off(db, settings):
    from chat.owners import Owner
    from chat.safety.limits import check_send_limits

    settings.CHAT_RATELIMIT_USER = "1/m"
    settings.RATELIMIT_ENABLE = False
    for _ in range(3):
        check_send_limits(owner=Owner(user_id=1), client_ip="10.0.0.1")


def test_checking_a_send_reads_no_setting_that_is_not_defined(db, monkeypatch):
    # django-ratelimit reads its settings with getattr(settings, name,
    # default) on every send; for a name that is not defined Django raises
    # and catches an AttributeError each time (~5 us, never cached), which
    # a burst of sends pays thousands of times.
    from django.conf import LazySettings

    from chat.owners import Owner
    from chat.safety.limits import check_send_limits

    undefined: list[str] = []
    lookup = LazySettings.__getattr__

    def spy(self: LazySettings, name: str) -> Any:
        try:
            return lookup(self, name)
        except AttributeError:
            undefined.append(name)
            raise

    monkeypatch.setattr(LazySettings, "__getattr__", spy)
    check_send_limits(owner=Owner(user_id=1), client_ip="10.0.0.1")
    check_send_limits(owner=Owner(user_id=None, session_key="s1"), client_ip="10.0.0.1")
    check_send_limits(owner=Owner(user_id=None, session_key="s2"), client_ip="2001:db8::1")
    assert undefined == []


async def test_repeated_violations_block_the_user_until_staff_lift_it(ws, make_user, settings):
    settings.CHAT_RATELIMIT_USER = "1/m"
    settings.CHAT_ABUSE_THRESHOLD = 3
    settings.CHAT_ABUSE_BLOCK_SECONDS = 600
    comm = await ws(await cookie_for(make_user))
    assert (await chat(comm))[-1]["type"] == "chat.done"
    for _ in range(3):
        [error] = await chat(comm)
        assert error["code"] == "rate_limited"
    [block] = await blocks()
    assert block.subject.startswith("u:") and "rate_limited" in block.reason
    [error] = await chat(comm)
    assert error["code"] == "forbidden"
    assert "temporarily blocked" in error["message"] and "UTC" in error["message"]
    assert 590 <= error["retry_after"] <= 600

    # Staff lift it in the admin; the user may chat again once the rate allows.
    await database_sync_to_async(_lift_in_admin)(make_user, block.pk)
    [block] = await blocks()
    assert block.lifted_at is not None and block.lifted_by is not None
    settings.CHAT_RATELIMIT_USER = "100/m"
    assert (await chat(comm))[-1]["type"] == "chat.done"


async def test_a_retried_send_is_answered_not_refused_at_the_limit(
    ws, make_user, settings, counted
):
    # The socket drops before the answer; the page sends the same frame again.
    settings.CHAT_RATELIMIT_USER = "1/m"
    settings.CHAT_ABUSE_THRESHOLD = 2
    cookie = await cookie_for(make_user)
    frame = send_frame("sent once, on a flaky connection")
    first = await ws(cookie)
    await send(first, frame)
    accepted = await recv(first)
    assert accepted["type"] == "chat.accepted"
    await recv_until_done(first)
    for _ in range(2):  # a retry at the limit, and another: never a violation
        again = await ws(cookie)
        await send(again, frame)
        duplicate = await recv(again)
        assert duplicate["type"] == "chat.accepted" and duplicate["duplicate"] is True
        assert duplicate["message"] == accepted["message"]
    assert counted == [] and await blocks() == []
    # A new message is still limited, and counted.
    [error] = await chat(first, "a new question")
    assert error["code"] == "rate_limited" and counted == ["user"]


async def test_a_retried_send_is_answered_past_the_budget(ws, make_user, settings):
    settings.CHAT_DAILY_BUDGET_TOKENS = 10
    settings.CHAT_BUDGET_RESERVE_TOKENS = 10
    comm = await ws(await cookie_for(make_user))
    frame = send_frame("one question")
    await send(comm, frame)
    accepted = await recv(comm)
    await recv_until_done(comm)  # spends the day's budget
    [error] = await chat(comm, "another question")
    assert error["code"] == "budget_exceeded"
    await send(comm, frame)
    duplicate = await recv(comm)
    assert duplicate["duplicate"] is True and duplicate["message"] == accepted["message"]


def _lift_in_admin(make_user: Any, block_id: int) -> None:
    staff = Client()
    staff.force_login(make_user("staff", staff=True))
    listing = staff.get("/admin/chat/abuseblock/?state=active")
    assert listing.status_code == 200 and b"u:" in listing.content
    response = staff.post(
        "/admin/chat/abuseblock/",
        {"action": "lift_blocks", "_selected_action": [block_id]},
        follow=True,
    )
    assert response.status_code == 200
    assert b"Lifted 1 block." in response.content


async def test_blocked_inputs_count_as_violations(ws, make_user, settings):
    settings.CHAT_ABUSE_THRESHOLD = 2
    comm = await ws(await cookie_for(make_user))
    for _ in range(2):
        [error] = await chat(comm, "how to make a pipe bomb")
        assert error["code"] == "blocked_input"
    [block] = await blocks()
    assert "blocked_input" in block.reason
    [error] = await chat(comm, "a harmless question")
    assert error["code"] == "forbidden"


async def test_blocked_ip_refuses_anonymous_visitors_but_not_signed_in_users(ws, make_user):
    await database_sync_to_async(AbuseBlock.objects.create)(
        subject="ip:127.0.0.1", reason="test", expires_at=timezone.now() + timedelta(minutes=5)
    )
    anonymous = await ws(await cookie_for(None, None))
    [error] = await chat(anonymous)
    assert error["code"] == "forbidden"
    signed_in = await ws(await cookie_for(make_user))
    assert (await chat(signed_in))[-1]["type"] == "chat.done"


async def test_expired_and_lifted_blocks_do_not_apply(ws, make_user):
    comm = await ws(await cookie_for(make_user))
    subject = f"u:{(await database_sync_to_async(_alice_id)())}"
    now = timezone.now()
    await database_sync_to_async(AbuseBlock.objects.create)(
        subject=subject, reason="old", expires_at=now - timedelta(seconds=1)
    )
    await database_sync_to_async(AbuseBlock.objects.create)(
        subject=subject, reason="lifted", expires_at=now + timedelta(hours=1), lifted_at=now
    )
    assert (await chat(comm))[-1]["type"] == "chat.done"


def _alice_id() -> int:
    from django.contrib.auth import get_user_model

    return int(get_user_model().objects.get(username="alice").pk)


# --- the daily budget ------------------------------------------------------------


async def test_token_budget_refuses_once_spent_and_says_when_it_resets(ws, make_user, settings):
    # The demo model reports its tokens: each reply costs ~12 + prompt tokens.
    settings.CHAT_DAILY_BUDGET_TOKENS = 40
    settings.CHAT_BUDGET_RESERVE_TOKENS = 10
    comm = await ws(await cookie_for(make_user))
    spent = 0
    refused = None
    for n in range(6):
        frames = await chat(comm, f"hi {n}")  # each a new question: cached answers are free
        if frames[0]["type"] == "chat.error":
            refused = frames[0]
            break
        usage = frames[-1]["usage"]
        spent += usage["prompt_tokens"] + usage["completion_tokens"]
    assert refused is not None and refused["code"] == "budget_exceeded"
    assert 30 <= spent <= 40 + 30  # at most one reply past the cap
    now = timezone.now()
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert abs(refused["retry_after"] - (midnight - now).total_seconds()) <= 5
    assert "midnight UTC" in refused["message"]
    # Another user has their own budget.
    other = await ws(await cookie_for(make_user, "bob"))
    assert (await chat(other, "hi"))[-1]["type"] == "chat.done"


async def own_answer(comm):
    """Return this socket's answer to its send, past notices of the other tabs' replies."""
    while (frame := await recv(comm))["type"] == "chat.started":
        pass
    return frame


async def test_parallel_sends_cannot_reserve_past_the_budget(ws, make_user, settings):
    """Replies still running hold their reservation, so a third parallel send is refused."""
    settings.CHAT_DAILY_BUDGET_USD = "0.05"
    settings.CHAT_BUDGET_RESERVE_USD = "0.02"
    settings.CHAT_DEMO_TTFT_MS = 5000  # both replies stay pending
    cookie = await cookie_for(make_user)
    sockets = [await ws(cookie) for _ in range(3)]
    for comm in sockets:
        await send(comm, send_frame("hello"))
    answers = [await own_answer(comm) for comm in sockets]
    kinds = sorted(a["type"] if a["type"] != "chat.error" else a["code"] for a in answers)
    assert kinds == ["budget_exceeded", "chat.accepted", "chat.accepted"]
    # Stopping a reply settles it (the demo model is free) and frees its reservation.
    running = next(
        (comm, a) for comm, a in zip(sockets, answers, strict=True) if a["type"] != "chat.error"
    )
    await send(running[0], {"type": "chat.stop", "message": running[1]["message"]})
    while (await recv(running[0]))["type"] != "chat.done":
        pass
    settings.CHAT_DEMO_TTFT_MS = 0
    # The other tab's "chat.started" may still be on its way (through Redis
    # when scaled): the answer to this send is what counts.
    await send(running[0], send_frame("hello again"))
    assert (await own_answer(running[0]))["type"] == "chat.accepted"
    # No reply may outlive the test's event loop.
    while (await recv(running[0]))["type"] != "chat.done":
        pass
    other = next(
        (comm, a)
        for comm, a in zip(sockets, answers, strict=True)
        if a["type"] == "chat.accepted" and comm is not running[0]
    )
    await send(other[0], {"type": "chat.stop", "message": other[1]["message"]})
    while (await recv(other[0]))["type"] != "chat.done":
        pass


async def test_concurrent_reservations_are_exact(make_user, settings):
    """Many threads reserving at once never hold more than the budget allows."""
    from django.db import connections

    from chat.errors import BudgetExceeded
    from chat.owners import Owner
    from chat.safety.limits import check_send_limits

    settings.CHAT_DAILY_BUDGET_USD = "1.00"
    settings.CHAT_BUDGET_RESERVE_USD = "0.10"
    settings.CHAT_RATELIMIT_USER = "1000/m"
    user = await database_sync_to_async(make_user)()
    owner = Owner(user_id=user.pk)

    def attempt() -> bool:
        try:
            check_send_limits(owner=owner, client_ip="10.0.0.1")
        except BudgetExceeded:
            return False
        finally:
            # This thread's database connection would outlive the test (and
            # keep PostgreSQL from dropping the test database at the end).
            connections.close_all()
        return True

    results = await asyncio.gather(*[asyncio.to_thread(attempt) for _ in range(25)])
    assert sum(results) == 10


async def test_a_send_refused_after_its_reservation_gives_the_budget_back(ws, make_user, settings):
    """A send to someone else's chat is refused after limits ran; it must not keep budget."""
    settings.CHAT_DAILY_BUDGET_USD = "0.05"
    settings.CHAT_BUDGET_RESERVE_USD = "0.02"
    alice = await ws(await cookie_for(make_user))
    theirs = (await chat(alice))[0]["conversation"]
    mallory = await ws(await cookie_for(make_user, "mallory"))
    for _ in range(4):  # more than the budget could hold if each kept its reservation
        refused = await chat(mallory, "let me in", conversation=theirs)
        assert refused[0]["code"] == "not_found"
    assert (await chat(mallory))[-1]["type"] == "chat.done"


def test_a_lone_send_whose_counter_store_raises_is_counted_here(db, settings, monkeypatch, caplog):
    # Decision 0004 for one send as for a batch: the store is down, not the send.
    import sqlite3

    from django.core.cache import caches

    from chat.errors import RateLimited
    from chat.owners import Owner
    from chat.safety import limits

    def locked(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")

    settings.CHAT_RATELIMIT_USER = "1/m"
    monkeypatch.setattr(type(caches["ratelimit"]), "add", locked)
    monkeypatch.setattr(limits, "_local", limits._LocalWindows())
    limits.check_send_limits(owner=Owner(user_id=5), client_ip="10.0.0.1")
    with pytest.raises(RateLimited):
        limits.check_send_limits(owner=Owner(user_id=5), client_ip="10.0.0.1")
    assert "rate-limit counters unavailable (OperationalError)" in caplog.text
