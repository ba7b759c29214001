"""The exact-match response cache: same version + same context → same answer, free."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from chat.models import Message
from chat.response_cache import cache_switch
from tests.chat.helpers import delta_text, recv, recv_until_done, send, send_frame
from tests.conftest import session_cookie_for

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def user_cookie(make_user, name: str) -> str:
    return session_cookie_for(make_user(name))


@database_sync_to_async
def reload(pk: int) -> Message:
    return Message.objects.get(pk=pk)


async def ask(comm, content: str, **extra) -> tuple[dict, list[dict]]:
    await send(comm, send_frame(content, **extra))
    accepted = await recv(comm)
    return accepted, await recv_until_done(comm)


async def test_a_repeated_question_is_answered_from_the_cache(ws, make_user):
    alice = await ws(await user_cookie(make_user, "alice"))
    _, first = await ask(alice, "What is a circuit breaker?")
    assert first[-1]["cached"] is False

    bob = await ws(await user_cookie(make_user, "bob"))
    accepted, second = await ask(bob, "What is  a circuit breaker?")  # same after normalising
    done = second[-1]
    assert done["cached"] is True and done["cost_usd"] == 0.0 and done["finish_reason"] == "stop"
    assert done["ttft_ms"] is not None
    assert delta_text(second) == delta_text(first)
    reply = await reload(accepted["message"])
    assert reply.cached is True and reply.content == delta_text(first)
    assert reply.call_path == [{"model": "demo:demo", "outcome": "cache"}]


async def test_a_new_version_or_context_misses_the_cache(ws, make_user, settings):
    comm = await ws(await user_cookie(make_user, "alice"))
    await ask(comm, "Explain retries")
    settings.CHAT_SYSTEM_PROMPT = "You are terse."
    _, frames = await ask(comm, "Explain retries")
    assert frames[-1]["cached"] is False


async def test_staff_switch_turns_the_cache_off(ws, make_user):
    comm = await ws(await user_cookie(make_user, "alice"))
    await ask(comm, "Explain backoff")
    await database_sync_to_async(cache_switch)(enabled=False)
    other = await ws(await user_cookie(make_user, "bob"))
    _, frames = await ask(other, "Explain backoff")
    assert frames[-1]["cached"] is False
    await database_sync_to_async(cache_switch)(enabled=True)
    third = await ws(await user_cookie(make_user, "carol"))
    _, frames = await ask(third, "Explain backoff")
    assert frames[-1]["cached"] is True


async def test_regenerate_asks_the_model_again(ws, make_user):
    comm = await ws(await user_cookie(make_user, "alice"))
    await ask(comm, "Explain jitter")
    other = await ws(await user_cookie(make_user, "bob"))
    cached, frames = await ask(other, "Explain jitter")
    assert frames[-1]["cached"] is True
    _, regenerated = await ask(
        other, "", conversation=cached["conversation"], regenerate=cached["message"]
    )
    assert regenerated[-1]["cached"] is False


def test_staff_switch_it_from_the_admin(client, make_user):
    staff = make_user("admin", staff=True)
    client.force_login(staff)
    page = client.get("/admin/chat/message/response-cache/")
    assert page.status_code == 200 and b'id="cache-state">on<' in page.content
    response = client.post("/admin/chat/message/response-cache/", {"enabled": "0"})
    assert response.status_code == 302
    assert b'id="cache-state">off<' in client.get("/admin/chat/message/response-cache/").content
    from chat.response_cache import cache_enabled

    assert cache_enabled() is False


def test_non_staff_cannot_reach_the_switch(client, make_user):
    client.force_login(make_user("bob"))
    response = client.post("/admin/chat/message/response-cache/", {"enabled": "0"})
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    from chat.response_cache import cache_enabled

    assert cache_enabled() is True


async def test_a_fallback_answer_is_not_cached_for_the_primary(
    ws, make_user, settings, unused_tcp_port
):
    settings.CHAT_MODEL = "openai:unreachable"
    settings.OPENAI_BASE_URL = f"http://127.0.0.1:{unused_tcp_port}/v1"  # nothing listens
    settings.CHAT_RETRY_MAX_ATTEMPTS = 1
    settings.CHAT_FALLBACK_MODELS = ["demo:demo"]
    comm = await ws(await user_cookie(make_user, "alice"))
    _, frames = await ask(comm, "Who answers?")
    assert frames[-1]["model"] == "demo:demo" and frames[-1]["cached"] is False
    other = await ws(await user_cookie(make_user, "bob"))
    _, again = await ask(other, "Who answers?")
    assert again[-1]["cached"] is False and again[-1]["model"] == "demo:demo"


async def test_when_every_model_fails_an_earlier_answer_is_given_and_counted_as_the_caches(
    ws, make_user, settings, unused_tcp_port
):
    from tests.monitoring.helpers import TOKEN, scrape, value

    settings.METRICS_TOKEN = TOKEN
    alice = await ws(await user_cookie(make_user, "alice"))
    _, first = await ask(alice, "What does a bulkhead do?")
    assert first[-1]["finish_reason"] == "stop" and first[-1]["cached"] is False

    settings.CHAT_MODEL = "openai:unreachable"
    settings.OPENAI_BASE_URL = f"http://127.0.0.1:{unused_tcp_port}/v1"  # nothing listens
    settings.CHAT_RETRY_MAX_ATTEMPTS = 1
    settings.CHAT_FALLBACK_MODELS = []
    before = await database_sync_to_async(scrape)()
    bob = await ws(await user_cookie(make_user, "bob"))
    accepted, frames = await ask(bob, "what does a  bulkhead do?")
    after = await database_sync_to_async(scrape)()

    done = frames[-1]
    assert (done["finish_reason"], done["cached"], done["cost_usd"]) == ("stop", True, 0.0)
    assert delta_text(frames) == delta_text(first)
    reply = await reload(accepted["message"])
    assert [(e["model"], e["outcome"]) for e in reply.call_path] == [
        ("openai:unreachable", "connect"),
        ("cache", "ok"),
    ]

    def counted(model: str) -> float:
        return value(after, "ai_requests_total", model=model, outcome="stop") - value(
            before, "ai_requests_total", model=model, outcome="stop"
        )

    # Dashboards must not show the failed model as answering.
    assert counted("cache") == 1
    assert counted("openai:unreachable") == 0
