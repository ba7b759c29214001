"""Each vendor fault, through the WebSocket, against the fake vendor over real HTTP.

For every fault: the frames the user sees, the stored reply, and the attempts
the vendor saw (count, and the waits between them on the manual clock).
"""

from __future__ import annotations

import json
import logging
from contextlib import aclosing

import pytest
from channels.db import database_sync_to_async

from chat.callpath import CallOutcome, ModelPlan, call_model
from chat.errors import Unavailable
from chat.providers import ChatMessage
from tests.chat.callpath_support import *  # noqa: F403
from tests.chat.callpath_support import FALLBACK, PRIMARY, ask, cookie_for, reload
from tests.chat.helpers import delta_text, recv, recv_until_done, send
from tests.fakevendor import Fault, prompt_tokens_for, reply_text
from tests.monitoring.helpers import TOKEN, scrape, value

pytestmark = pytest.mark.django_db(transaction=True)


def errors_in(frames):
    return [f for f in frames if f["type"] == "chat.error"]


async def test_healthy_reply_names_the_model_and_stores_vendor_usage(ws, make_user, wired):
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm, "Tell me about tests")
    assert accepted["model"] == PRIMARY
    frames = await recv_until_done(comm)
    done = frames[-1]

    assert delta_text(frames) == reply_text(20)
    assert errors_in(frames) == []
    assert (done["finish_reason"], done["model"]) == ("stop", PRIMARY)
    [request] = wired.requests
    assert request.body["model"] == "gpt-fake"  # the provider prefix is not sent
    assert done["usage"] == {
        "prompt_tokens": prompt_tokens_for(request.body),
        "completion_tokens": 20,
    }
    reply = await reload(accepted["message"])
    assert (reply.content, reply.finish_reason, reply.model, reply.error_code) == (
        reply_text(20),
        "stop",
        PRIMARY,
        "",
    )
    assert reply.usage_estimated is False
    assert reply.call_path == [{"model": PRIMARY, "outcome": "ok"}]


async def test_missing_vendor_usage_is_estimated_and_marked(ws, make_user, wired):
    wired.script([Fault.no_usage()])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    await recv_until_done(comm)
    reply = await reload(accepted["message"])
    assert reply.usage_estimated is True
    assert reply.completion_tokens == -(-len(reply_text(20)) // 4)


async def test_replies_reuse_the_vendor_connection(ws, make_user, wired):
    comm = await ws(await cookie_for(make_user))
    for n in range(2):
        await ask(comm, f"question {n}")
        await recv_until_done(comm)
    first, second = wired.requests
    assert first.client_port == second.client_port


async def test_429_honours_retry_after_then_succeeds(ws, make_user, wired, clock):
    wired.script([Fault.rate_limited(retry_after=2)])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    frames = await recv_until_done(comm)

    assert errors_in(frames) == [] and delta_text(frames) == reply_text(20)
    assert [r.status for r in wired.requests] == [429, 200]
    assert clock.sleeps == [2.0]
    reply = await reload(accepted["message"])
    assert reply.call_path == [
        {"model": PRIMARY, "outcome": "rate_limited", "status": 429, "waited_s": 2.0},
        {"model": PRIMARY, "outcome": "ok"},
    ]


@pytest.mark.parametrize("model", [PRIMARY, FALLBACK], ids=["openai", "anthropic"])
async def test_5xx_is_retried_with_capped_exponential_backoff(
    ws, make_user, wired, clock, settings, model
):
    settings.CHAT_MODEL = model
    wired.script([Fault.server_error(500), Fault.server_error(503)])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    frames = await recv_until_done(comm)

    assert frames[-1]["finish_reason"] == "stop" and errors_in(frames) == []
    assert [r.status for r in wired.requests] == [500, 503, 200]
    # Full jitter drawn at its maximum: base 0.5 s, doubled per attempt.
    assert clock.sleeps == [0.5, 1.0]
    reply = await reload(accepted["message"])
    assert [(e["outcome"], e.get("status")) for e in reply.call_path] == [
        ("server", 500),
        ("server", 503),
        ("ok", None),
    ]


async def test_persistent_5xx_gives_up_after_the_attempt_cap(ws, make_user, wired, clock):
    wired.default = Fault.server_error(503)
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    frames = await recv_until_done(comm)

    [error] = errors_in(frames)
    assert error["code"] == "unavailable"
    assert error["message"] == "The model is unavailable right now. Please try again shortly."
    assert frames[-1]["finish_reason"] == "error"
    assert len(wired.requests) == 3
    assert clock.sleeps == [0.5, 1.0]
    reply = await reload(accepted["message"])
    assert (reply.content, reply.finish_reason, reply.error_code) == ("", "error", "unavailable")
    assert [e["outcome"] for e in reply.call_path] == ["server"] * 3


async def test_total_wait_budget_bounds_retries(ws, make_user, wired, clock, settings):
    settings.CHAT_RETRY_MAX_ATTEMPTS = 10
    settings.CHAT_RETRY_TOTAL_WAIT_S = 3.0
    wired.default = Fault.rate_limited(retry_after=1.5)
    comm = await ws(await cookie_for(make_user))
    await ask(comm)
    frames = await recv_until_done(comm)

    [error] = errors_in(frames)
    assert error["code"] == "unavailable" and error["retry_after"] == 2
    assert clock.sleeps == [1.5, 1.5]
    assert len(wired.requests) == 3


@pytest.mark.parametrize(
    "fault",
    [Fault.bad_request(), Fault.unauthorized(), Fault.status(404), Fault.status(422)],
    ids=["400", "401", "404", "422"],
)
async def test_client_errors_are_never_retried(ws, make_user, wired, clock, fault):
    wired.script([fault])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    frames = await recv_until_done(comm)

    assert [e["code"] for e in errors_in(frames)] == ["unavailable"]
    assert len(wired.requests) == 1 and clock.sleeps == []
    reply = await reload(accepted["message"])
    assert reply.error_code == "unavailable"
    assert reply.call_path[0]["status"] == fault.http_status


async def test_slow_first_token_times_out_closes_the_stream_and_retries(
    ws, make_user, wired, clock
):
    wired.script([Fault.slow_first_token(600)])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    await wired.wait_for_requests_async(1)
    await clock.wait_armed()
    clock.advance(5.01)

    frames = await recv_until_done(comm)
    assert errors_in(frames) == [] and delta_text(frames) == reply_text(20)
    assert (await wired.wait_for_disconnect_async(index=0)).tokens_sent == 0
    reply = await reload(accepted["message"])
    assert reply.call_path == [
        {"model": PRIMARY, "outcome": "timeout", "deadline": "first_token", "waited_s": 0.5},
        {"model": PRIMARY, "outcome": "ok"},
    ]


async def test_slow_first_token_without_retries_left_tells_the_user_timeout(
    ws, make_user, wired, clock, settings
):
    settings.CHAT_RETRY_MAX_ATTEMPTS = 1
    # A per-model override beats the global deadline.
    settings.CHAT_TIMEOUTS = {PRIMARY: {"first_token": 42}}
    wired.script([Fault.slow_first_token(600)])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    await wired.wait_for_requests_async(1)
    await clock.wait_armed()
    clock.advance(41)
    assert clock.pending_deadlines == 1  # not yet
    clock.advance(1.01)

    frames = await recv_until_done(comm)
    [error] = errors_in(frames)
    assert error["code"] == "timeout"
    assert error["message"] == "The model took too long to answer. Please try again."
    reply = await reload(accepted["message"])
    assert (reply.content, reply.finish_reason, reply.error_code) == ("", "error", "timeout")
    await wired.wait_for_disconnect_async(index=0)
    assert len(wired.requests) == 1


async def test_stall_mid_stream_ends_with_timeout_and_keeps_the_text(ws, make_user, wired, clock):
    wired.script([Fault.stall(after=5)])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    await clock.wait_armed(count=6)  # five tokens read, waiting for the sixth
    clock.advance(5.01)

    frames = await recv_until_done(comm)
    [error] = errors_in(frames)
    assert error["code"] == "timeout"
    assert delta_text(frames) == reply_text(5)
    assert frames[-1]["finish_reason"] == "error"
    reply = await reload(accepted["message"])
    assert (reply.content, reply.finish_reason, reply.error_code) == (
        reply_text(5),
        "error",
        "timeout",
    )
    assert reply.call_path == [
        {"model": PRIMARY, "outcome": "timeout", "deadline": "idle", "delivered": True}
    ]
    assert (await wired.wait_for_disconnect_async(index=0)).tokens_sent == 5
    assert len(wired.requests) == 1  # no silent restart


async def test_whole_reply_deadline_cuts_a_slow_trickle(ws, make_user, wired, clock, settings):
    settings.CHAT_TIMEOUT_TOTAL_S = 9.0
    wired.script([Fault.paced(20, tokens=200)])  # never idle 5 s, but 10 s in all
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    await clock.wait_armed(count=2)
    clock.advance(4.5)
    # The next read's deadline is the whole reply's (start + 9), not the idle gap's.
    await clock.wait_armed(count=clock.armed_total + 1)
    clock.advance(4.6)

    frames = await recv_until_done(comm)
    assert [e["code"] for e in errors_in(frames)] == ["timeout"]
    reply = await reload(accepted["message"])
    assert reply.call_path == [
        {"model": PRIMARY, "outcome": "timeout", "deadline": "total", "delivered": True}
    ]
    assert 0 < len(reply.content) < len(reply_text(200))
    await wired.wait_for_disconnect_async(index=0)


async def test_disconnect_mid_stream_is_unavailable_with_the_text_kept(
    ws, make_user, wired, settings
):
    settings.CHAT_FALLBACK_MODELS = [FALLBACK]  # never used once text was delivered
    wired.script([Fault.disconnect(after=7)])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    frames = await recv_until_done(comm)

    assert [e["code"] for e in errors_in(frames)] == ["unavailable"]
    assert delta_text(frames) == reply_text(7)
    reply = await reload(accepted["message"])
    assert (reply.content, reply.finish_reason, reply.error_code) == (
        reply_text(7),
        "error",
        "unavailable",
    )
    assert reply.call_path == [
        {"model": PRIMARY, "outcome": "connect", "delivered": True},
    ]
    assert reply.usage_estimated is True and reply.completion_tokens > 0
    assert len(wired.requests) == 1


@pytest.mark.parametrize(
    "fault",
    [
        Fault.malformed_sse(after=0),
        Fault.malformed_sse(after=3),
        Fault.wrong_schema(after=0),
        Fault.empty_stream(),
        Fault.not_json_body(),
        Fault.truncated(after=0),
    ],
    ids=["malformed-first", "malformed-later", "wrong-schema", "empty", "not-json", "truncated"],
)
@pytest.mark.parametrize("model", [PRIMARY, FALLBACK], ids=["openai", "anthropic"])
async def test_broken_vendor_answers_are_a_clean_unavailable(
    ws, make_user, wired, caplog, settings, fault, model
):
    settings.CHAT_MODEL = model
    wired.default = fault
    comm = await ws(await cookie_for(make_user))
    with caplog.at_level(logging.INFO):
        accepted = await ask(comm)
        frames = await recv_until_done(comm)
        # The socket is still open and useful.
        await send(comm, {"type": "chat.explode"})
        assert (await recv(comm))["code"] == "invalid_input"

    assert [e["code"] for e in errors_in(frames)] == ["unavailable"]
    assert frames[-1]["finish_reason"] == "error"
    reply = await reload(accepted["message"])
    assert reply.status == "finished" and reply.error_code == "unavailable"
    assert reply.content == delta_text(frames)
    assert not [r for r in caplog.records if r.exc_info], "a traceback reached the logs"
    assert "Traceback" not in caplog.text


async def test_a_50000_token_stream_arrives_whole(ws, make_user, wired, settings):
    # The product's own framing: moderation windows and coalesced frames.
    settings.CHAT_MODERATION_WINDOW_TOKENS = 20
    settings.CHAT_COALESCE_MS = 25
    wired.script([Fault.huge(50_000)])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    frames = await recv_until_done(comm)

    assert frames[-1]["finish_reason"] == "stop"
    assert frames[-1]["usage"]["completion_tokens"] == 50_000
    reply = await reload(accepted["message"])
    assert reply.content == reply_text(50_000) == delta_text(frames)


async def test_stop_closes_the_vendor_stream_at_once(ws, make_user, wired):
    wired.script([Fault.stall(after=3)])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    first = await recv(comm)
    assert first["type"] == "chat.delta"
    await send(comm, {"type": "chat.stop", "message": accepted["message"]})

    record = await wired.wait_for_disconnect_async(index=0)
    assert record.tokens_sent == 3 and record.completed_at is None
    frames = await recv_until_done(comm)
    assert frames[-1]["finish_reason"] == "cancelled"
    reply = await reload(accepted["message"])
    assert reply.finish_reason == "cancelled"


async def test_failed_replies_are_counted_by_model_and_code(ws, make_user, wired, clock, settings):
    settings.METRICS_TOKEN = TOKEN
    settings.CHAT_RETRY_MAX_ATTEMPTS = 1
    before = await database_sync_to_async(scrape)()
    wired.script([Fault.server_error(503), Fault.stall(after=2), Fault.ok()])
    comm = await ws(await cookie_for(make_user))
    await ask(comm, "one")
    assert [e["code"] for e in errors_in(await recv_until_done(comm))] == ["unavailable"]
    await ask(comm, "two")
    await clock.wait_armed(count=3)  # two tokens read, waiting for the third
    clock.advance(5.01)
    assert [e["code"] for e in errors_in(await recv_until_done(comm))] == ["timeout"]
    await ask(comm, "three")
    assert errors_in(await recv_until_done(comm)) == []
    after = await database_sync_to_async(scrape)()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ai_errors_total", model=PRIMARY, code="unavailable") == 1
    assert delta("ai_errors_total", model=PRIMARY, code="timeout") == 1
    assert delta("ai_requests_total", model=PRIMARY, outcome="error") == 2
    assert delta("ai_requests_total", model=PRIMARY, outcome="stop") == 1
    assert delta("ai_request_duration_seconds_count", model=PRIMARY) == 3


# --------------------------------------------------------------------------- fallbacks


async def test_rate_limit_beyond_the_cap_falls_back_to_the_next_model(
    ws, make_user, wired, clock, settings
):
    settings.CHAT_FALLBACK_MODELS = [FALLBACK]
    wired.script([Fault.rate_limited(retry_after=60)])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    frames = await recv_until_done(comm)

    done = frames[-1]
    assert (done["finish_reason"], done["model"]) == ("stop", FALLBACK)
    assert errors_in(frames) == [] and delta_text(frames) == reply_text(20)
    assert [r.path for r in wired.requests] == ["/v1/chat/completions", "/v1/messages"]
    assert wired.requests[1].body["model"] == "claude-fake"
    assert clock.sleeps == []
    reply = await reload(accepted["message"])
    assert reply.model == FALLBACK
    assert reply.call_path == [
        {"model": PRIMARY, "outcome": "rate_limited", "status": 429},
        {"model": FALLBACK, "outcome": "ok"},
    ]


@pytest.mark.parametrize("retry_after", ["Fri, 31 Dec 2099 23:59:59 GMT", "1e12"])
async def test_a_vendor_asking_to_wait_for_ages_is_told_as_an_hour(
    ws, make_user, wired, clock, retry_after
):
    wired.script([Fault.rate_limited(retry_after=retry_after)])
    comm = await ws(await cookie_for(make_user))
    await ask(comm)
    frames = await recv_until_done(comm)
    [error] = [f for f in frames if f["type"] == "chat.error"]
    assert error["code"] == "unavailable" and error["retry_after"] == 3600
    assert clock.sleeps == []  # far past the longest wait worth retrying after


async def test_content_policy_refusal_falls_back(ws, make_user, wired, settings):
    settings.CHAT_FALLBACK_MODELS = [FALLBACK]
    wired.script([Fault.content_policy()])
    comm = await ws(await cookie_for(make_user))
    await ask(comm)
    frames = await recv_until_done(comm)
    assert frames[-1]["model"] == FALLBACK and errors_in(frames) == []
    assert len(wired.requests) == 2


async def test_context_length_trims_the_history_and_retries_once(ws, make_user, wired, settings):
    settings.CHAT_FALLBACK_MODELS = [FALLBACK]
    comm = await ws(await cookie_for(make_user))
    first = await ask(comm, "first question")
    await recv_until_done(comm)
    wired.script([Fault.context_length()])
    second = await ask(comm, "second question", conversation=first["conversation"])
    frames = await recv_until_done(comm)

    assert frames[-1]["model"] == PRIMARY and errors_in(frames) == []
    full, trimmed = (r.body["messages"] for r in wired.requests[1:])
    assert [m["role"] for m in full] == ["system", "user", "assistant", "user"]
    assert trimmed == [full[0], full[-1]]
    reply = await reload(second["message"])
    assert [e["outcome"] for e in reply.call_path] == ["context_length", "ok"]


async def test_every_model_failing_is_unavailable_naming_the_path(ws, make_user, wired, settings):
    settings.CHAT_FALLBACK_MODELS = [FALLBACK]
    settings.CHAT_RETRY_MAX_ATTEMPTS = 1
    wired.default = Fault.server_error(500)
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    frames = await recv_until_done(comm)
    assert [e["code"] for e in errors_in(frames)] == ["unavailable"]
    reply = await reload(accepted["message"])
    assert [(e["model"], e["outcome"]) for e in reply.call_path] == [
        (PRIMARY, "server"),
        (FALLBACK, "server"),
    ]
    json.dumps(reply.call_path)  # stored as plain JSON


# --------------------------------------------------------------------------- the cached answer


async def test_when_every_model_fails_an_earlier_answer_to_the_question_is_given(
    ws, make_user, wired, clock, settings
):
    settings.CHAT_FALLBACK_MODELS = [FALLBACK]
    settings.CHAT_RETRY_MAX_ATTEMPTS = 1
    comm = await ws(await cookie_for(make_user))
    first = await ask(comm, "What is a circuit breaker?")
    answered = await recv_until_done(comm)
    assert answered[-1]["cached"] is False

    wired.default = Fault.server_error(503)
    # A second turn is another context: the exact-match cache misses it.
    again = await ask(comm, "What is a  circuit breaker?", conversation=first["conversation"])
    frames = await recv_until_done(comm)
    assert errors_in(frames) == [] and delta_text(frames) == delta_text(answered)
    assert (frames[-1]["finish_reason"], frames[-1]["cached"]) == ("stop", True)
    reply = await reload(again["message"])
    assert (reply.content, reply.error_code, reply.cached) == (delta_text(answered), "", True)
    assert [(e["model"], e["outcome"]) for e in reply.call_path] == [
        (PRIMARY, "server"),
        (FALLBACK, "server"),
        ("cache", "ok"),
    ]

    # A question nobody asked before gets the plain error.
    await ask(comm, "What is a bulkhead?", conversation=first["conversation"])
    frames = await recv_until_done(comm)
    assert [e["code"] for e in errors_in(frames)] == ["unavailable"]


async def collect(events):
    out = []
    async with aclosing(events):
        async for event in events:
            out.append(event)
    return out


async def no_queue(position: int) -> None:
    raise AssertionError("nothing should queue here")


async def test_when_no_model_answers_the_cached_answer_hook_is_the_last_resort(wired, settings):
    settings.CHAT_RETRY_MAX_ATTEMPTS = 1
    wired.default = Fault.server_error(500)
    history = [ChatMessage("user", "asked before")]

    async def cached() -> str | None:
        return "the answer we gave last time"

    *chunks, outcome = await collect(
        call_model(
            ModelPlan(model=PRIMARY, fallbacks=(FALLBACK,)),
            history,
            owner_key="u:1",
            on_queued=no_queue,
            cached_answer=cached,
        )
    )
    assert chunks == ["the answer we gave last time"]
    assert isinstance(outcome, CallOutcome)
    assert (outcome.cached, outcome.fallback, outcome.error, outcome.usage) == (
        True,
        True,
        None,
        None,
    )
    assert [(e["model"], e["outcome"]) for e in outcome.path] == [
        (PRIMARY, "server"),
        (FALLBACK, "server"),
        ("cache", "ok"),
    ]

    async def nothing_cached() -> str | None:
        return None

    seen = []
    with pytest.raises(Unavailable):
        async with aclosing(
            call_model(
                ModelPlan(model=PRIMARY),
                history,
                owner_key="u:1",
                on_queued=no_queue,
                cached_answer=nothing_cached,
            )
        ) as events:
            async for event in events:
                seen.append(event)
    [failed] = seen  # the outcome still comes first, naming the attempts
    assert failed.error == "unavailable" and failed.path[0]["outcome"] == "server"
