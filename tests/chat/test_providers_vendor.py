"""Drive the OpenAI and Anthropic providers against the fake vendor over real HTTP."""

from __future__ import annotations

import asyncio
import email.utils
import math
import socket
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from chat.providers.anthropic import AnthropicProvider
from chat.providers.base import ChatMessage, Provider, ProviderError, StreamOptions, Usage
from chat.providers.openai import OpenAIProvider
from tests.fakevendor import FakeVendor, Fault, prompt_tokens_for, reply_text

MESSAGES = [
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "Say something nice about tests."),
]
OPTIONS = StreamOptions(model="model-under-test")
API_KEY = "sk-test-key"


def make_provider(
    flavor: str, base_url: str, *, read_timeout: float = 5.0, api_key: str | None = API_KEY
) -> OpenAIProvider | AnthropicProvider:
    if flavor == "openai":
        return OpenAIProvider(
            model="gpt-default",
            api_key=api_key,
            base_url=f"{base_url}/v1",
            connect_timeout=2.0,
            read_timeout=read_timeout,
        )
    return AnthropicProvider(
        model="claude-default",
        api_key=api_key,
        base_url=base_url,
        connect_timeout=2.0,
        read_timeout=read_timeout,
    )


@pytest.fixture(scope="module")
def vendor():
    with FakeVendor() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh_vendor(vendor):
    vendor.reset()


@pytest.fixture(params=["openai", "anthropic"])
def flavor(request) -> str:
    return request.param


@pytest.fixture
async def provider(flavor, vendor) -> AsyncIterator[OpenAIProvider | AnthropicProvider]:
    made = make_provider(flavor, vendor.base_url)
    yield made
    await made.aclose()


async def collect(
    provider: Provider, messages=MESSAGES, options=OPTIONS
) -> tuple[list[str], Usage]:
    """Consume a whole stream; check that exactly one Usage comes last."""
    chunks: list[str] = []
    usages: list[Usage] = []
    async with aclosing(provider.stream(messages, options)) as events:
        async for event in events:
            if isinstance(event, Usage):
                usages.append(event)
            else:
                assert not usages, "text after the Usage"
                assert isinstance(event, str) and event
                chunks.append(event)
    assert len(usages) == 1, usages
    return chunks, usages[0]


async def failure(
    provider: Provider, messages=MESSAGES, options=OPTIONS
) -> tuple[str, ProviderError]:
    """Consume a stream that must fail; return the text delivered before it did."""
    chunks: list[str] = []
    with pytest.raises(ProviderError) as info:
        async with aclosing(provider.stream(messages, options)) as events:
            async for event in events:
                assert isinstance(event, str), f"{event!r} before the failure"
                chunks.append(event)
    return "".join(chunks), info.value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- happy paths


async def test_normal_stream_yields_text_then_reported_usage(provider, vendor, flavor):
    chunks, usage = await collect(provider)

    assert "".join(chunks) == reply_text(20)
    assert len(chunks) == 20  # one vendor token per chunk, nothing merged or lost
    [request] = vendor.requests
    assert usage == Usage(
        prompt_tokens=prompt_tokens_for(request.body),
        completion_tokens=20,
        estimated=False,
        finish_reason="stop",
    )
    assert request.body["model"] == "model-under-test"
    assert request.body["stream"] is True
    # SDK retries are off: the call path owns retrying.
    assert request.headers.get("x-stainless-retry-count") == "0"
    if flavor == "openai":
        assert request.path == "/v1/chat/completions"
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        assert request.body["stream_options"] == {"include_usage": True}
        assert request.body["messages"] == [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something nice about tests."},
        ]
    else:
        assert request.path == "/v1/messages"
        # Anthropic SDK 2.x sends the key as a bearer token (older ones used x-api-key).
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        assert request.body["system"] == "You are terse."
        assert request.body["messages"] == [
            {"role": "user", "content": "Say something nice about tests."}
        ]
        assert request.body["max_tokens"] == 4096


async def test_sequential_requests_reuse_one_connection(provider, vendor):
    # A fresh connection per reply would add a TCP (and, for real vendors, TLS) handshake
    # to every first token.
    for _ in range(3):
        await collect(provider)

    ports = {r.client_port for r in vendor.requests}
    assert len(vendor.requests) == 3
    assert len(ports) == 1, ports


async def test_max_tokens_cut_maps_to_length(provider, vendor, flavor):
    options = StreamOptions(model="m", max_tokens=5, temperature=0.3, extra={"top_p": 0.5})

    chunks, usage = await collect(provider, options=options)

    assert "".join(chunks) == reply_text(5)
    assert usage.finish_reason == "length"
    assert usage.completion_tokens == 5
    body = vendor.requests[0].body
    assert body["temperature"] == 0.3
    assert body["top_p"] == 0.5  # extra is passed through untouched
    # A custom base URL means an OpenAI-compatible server, which knows `max_tokens`.
    assert body["max_tokens"] == 5
    assert "max_completion_tokens" not in body


async def test_missing_usage_is_estimated(provider, vendor):
    vendor.script([Fault.no_usage()])

    chunks, usage = await collect(provider)

    assert "".join(chunks) == reply_text(20)
    prompt_chars = sum(len(m.content) for m in MESSAGES)
    assert usage == Usage(
        prompt_tokens=math.ceil(prompt_chars / 4),
        completion_tokens=math.ceil(len(reply_text(20)) / 4),
        estimated=True,
        finish_reason="stop",
    )


async def test_huge_stream_completes(provider, vendor):
    vendor.script([Fault.huge(50_000)])
    options = StreamOptions(model="m", max_tokens=60_000)

    started = time.monotonic()
    chunks, usage = await collect(provider, options=options)

    assert len(chunks) == 50_000
    assert "".join(chunks) == reply_text(50_000)
    assert usage.completion_tokens == 50_000
    assert not usage.estimated
    assert time.monotonic() - started < 8


async def test_anthropic_merges_turns_and_drops_empty_ones(vendor):
    provider = make_provider("anthropic", vendor.base_url)
    messages = [
        ChatMessage("system", "Rule one."),
        ChatMessage("user", "Hello"),
        ChatMessage("assistant", ""),  # a reply that failed before its first token
        ChatMessage("user", "Anyone there?"),
        ChatMessage("system", "Rule two."),
    ]
    try:
        await collect(provider, messages=messages)
    finally:
        await provider.aclose()

    body = vendor.requests[0].body
    assert body["system"] == "Rule one.\n\nRule two."
    assert body["messages"] == [{"role": "user", "content": "Hello\n\nAnyone there?"}]


async def test_no_api_key_still_sends_and_lets_the_vendor_judge(vendor, flavor, monkeypatch):
    # Local OpenAI-compatible servers need no key; a real vendor answers 401 ("auth").
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    provider = make_provider(flavor, vendor.base_url, api_key=None)
    vendor.script([Fault.ok(), Fault.unauthorized()])
    try:
        chunks, _ = await collect(provider)
        _, error = await failure(provider)
    finally:
        await provider.aclose()

    assert "".join(chunks) == reply_text(20)
    assert (error.kind, error.status) == ("auth", 401)


def test_provider_survives_a_new_event_loop(vendor, flavor):
    # Celery-style workers run each job in a fresh loop; pooled connections must not leak over.
    provider = make_provider(flavor, vendor.base_url)
    first = asyncio.run(collect(provider))
    second = asyncio.run(collect(provider))
    assert "".join(first[0]) == "".join(second[0]) == reply_text(20)
    assert len(vendor.requests) == 2


# --------------------------------------------------------------------------- HTTP errors


async def test_rate_limited_parses_retry_after_seconds(provider, vendor):
    vendor.script([Fault.status(429, retry_after=2), Fault.ok()])

    text, error = await failure(provider)

    assert text == ""
    assert (error.kind, error.status, error.retry_after) == ("rate_limited", 429, 2.0)
    assert error.retryable
    # No SDK retry happened: the second scripted answer is still waiting.
    assert len(vendor.requests) == 1
    chunks, _ = await collect(provider)
    assert "".join(chunks) == reply_text(20)


async def test_rate_limited_parses_retry_after_http_date(provider, vendor):
    when = datetime.now(UTC) + timedelta(seconds=30)
    vendor.script([Fault.rate_limited(retry_after=email.utils.format_datetime(when, usegmt=True))])

    _, error = await failure(provider)

    assert error.kind == "rate_limited"
    assert error.retry_after is not None and 25 < error.retry_after <= 31


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "bad_request"),
        (401, "auth"),
        (403, "auth"),
        (404, "not_found"),
        (408, "timeout"),
        (409, "server"),
        (413, "context_length"),
        (422, "bad_request"),
        (500, "server"),
        (503, "server"),
        (529, "server"),
    ],
)
async def test_status_maps_to_kind(provider, vendor, status, kind):
    vendor.script([Fault.status(status)])

    text, error = await failure(provider)

    assert text == ""
    assert (error.kind, error.status) == (kind, status)
    assert error.retryable is (kind in {"timeout", "server"})
    assert len(vendor.requests) == 1  # no hidden SDK retries


async def test_server_error_carries_retry_after_when_sent(provider, vendor):
    vendor.script([Fault.server_error(503, retry_after="7")])

    _, error = await failure(provider)

    assert (error.kind, error.retry_after) == ("server", 7.0)


async def test_context_length(provider, vendor):
    vendor.script([Fault.context_length()])

    _, error = await failure(provider)

    assert (error.kind, error.status) == ("context_length", 400)
    assert not error.retryable


async def test_content_policy(provider, vendor):
    vendor.script([Fault.content_policy()])

    _, error = await failure(provider)

    assert (error.kind, error.status) == ("content_policy", 400)
    assert not error.retryable


async def test_content_filter_finish_mid_stream(provider, vendor):
    vendor.script([Fault.filtered(after=3)])

    text, error = await failure(provider)

    assert text == reply_text(3)
    assert error.kind == "content_policy"


async def test_connection_refused(flavor):
    provider = make_provider(flavor, f"http://127.0.0.1:{free_port()}")
    try:
        _, error = await failure(provider)
    finally:
        await provider.aclose()

    assert error.kind == "connect"
    assert error.retryable


# --------------------------------------------------------------------------- broken streams


async def test_mid_stream_disconnect(provider, vendor):
    vendor.script([Fault.disconnect(after=3)])

    text, error = await failure(provider)

    assert text == reply_text(3)
    assert error.kind == "connect"
    record = vendor.wait_for_completion(index=0)
    assert record.server_closed_at is not None


async def test_clean_end_without_closing_events_is_a_cut_stream(provider, vendor):
    # No [DONE] / message_stop: the reply is incomplete even though HTTP ended cleanly.
    vendor.script([Fault.truncated(after=4)])

    text, error = await failure(provider)

    assert text == reply_text(4)
    assert error.kind == "connect"
    assert vendor.wait_for_completion(index=0).completed_at is not None


async def test_in_stream_error_event(provider, vendor):
    vendor.script([Fault.stream_error(after=2)])

    text, error = await failure(provider)

    assert text == reply_text(2)
    assert error.kind == "server"
    assert error.status is None


@pytest.mark.parametrize(
    "fault",
    [
        Fault.malformed_sse(after=2),
        Fault.wrong_schema(after=2),
        Fault.empty_stream(),
        Fault.not_json_body(),
    ],
    ids=["malformed-sse", "wrong-schema", "empty-stream", "not-json-body"],
)
async def test_unparseable_streams_are_malformed(provider, vendor, fault):
    vendor.script([fault])

    text, error = await failure(provider)

    expected = 2 if fault.malformed_after or fault.wrong_schema_after else 0
    assert text == reply_text(expected)
    assert error.kind == "malformed"
    assert not error.retryable


@pytest.mark.parametrize("headers_first", [True, False], ids=["gap-after-headers", "no-headers"])
async def test_slow_first_token_hits_the_read_timeout(vendor, flavor, headers_first):
    vendor.script([Fault.slow_first_token(3.0, headers_first=headers_first)])
    provider = make_provider(flavor, vendor.base_url, read_timeout=0.2)
    started = time.monotonic()
    try:
        text, error = await failure(provider)
    finally:
        await provider.aclose()

    assert text == ""
    assert error.kind == "timeout"
    assert time.monotonic() - started < 2
    # Giving up closed the connection while the vendor was still "thinking".
    record = await vendor.wait_for_disconnect_async(timeout=5)
    assert record.tokens_sent == 0


# --------------------------------------------------------------------------- cancellation


async def test_cancelling_the_consumer_closes_the_upstream_connection(provider, vendor):
    vendor.script([Fault.stall(after=3)])  # three tokens, then silence until the client leaves
    chunks: list[str] = []
    got_three = asyncio.Event()

    async def consume() -> None:
        async for event in provider.stream(MESSAGES, OPTIONS):
            chunks.append(event)
            if len(chunks) == 3:
                got_three.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_three.wait(), timeout=5)
    assert vendor.requests[0].disconnected_at is None
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    record = await vendor.wait_for_disconnect_async(timeout=5)
    assert record.index == 0
    assert record.tokens_sent == 3
    assert record.completed_at is None
    assert record.disconnected_at - cancelled_at < 1.0
    assert "".join(chunks) == reply_text(3)


async def test_closing_the_generator_closes_the_upstream_connection(provider, vendor):
    vendor.script([Fault.stall(after=5)])
    events = provider.stream(MESSAGES, OPTIONS)
    received = [await events.__anext__() for _ in range(2)]

    await events.aclose()

    record = await vendor.wait_for_disconnect_async(timeout=5)
    assert record.completed_at is None
    assert "".join(received) == reply_text(2)


async def test_pipeline_deadline_cancels_a_stalled_stream(provider, vendor):
    vendor.script([Fault.stall(after=1)])
    chunks: list[str] = []

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            async with aclosing(provider.stream(MESSAGES, OPTIONS)) as events:
                async for event in events:
                    chunks.append(event)

    assert chunks == [reply_text(1)]
    record = await vendor.wait_for_disconnect_async(timeout=5)
    assert record.tokens_sent == 1


# --------------------------------------------------------------------------- the fake itself


def test_fake_scripts_in_order_then_falls_back_to_default(vendor):
    vendor.default = Fault.status(503)
    vendor.script([Fault.status(429), Fault.ok(tokens=2)])
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=vendor.openai_base_url) as client:
        statuses = [client.post("/chat/completions", json=body).status_code for _ in range(4)]
    assert statuses == [429, 200, 503, 503]
    assert [r.index for r in vendor.requests] == [0, 1, 2, 3]
    assert vendor.requests[1].tokens_sent == 2


def test_fake_paces_tokens(vendor):
    vendor.script([Fault.paced(100, tokens=11)])
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    started = time.monotonic()
    with httpx.Client(base_url=vendor.openai_base_url) as client:
        text = client.post("/chat/completions", json=body).text
    assert text.count('"content":') == 12  # the role chunk plus 11 tokens
    assert time.monotonic() - started >= 0.1  # ten gaps of 10 ms


def test_fake_can_be_scripted_over_http(vendor):
    with httpx.Client(base_url=vendor.base_url) as client:
        client.post("/_fake/script", json={"faults": [Fault.status(401).to_json()]})
        response = client.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": []})
        stats = client.get("/_fake/stats").json()
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert stats["requests"] == 1


def test_fake_reports_a_disconnect_only_when_the_client_closes(vendor):
    vendor.script([Fault.stall(after=2)])
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=vendor.openai_base_url) as client:
        with client.stream("POST", "/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data:")  # the stream is flowing
            with pytest.raises(TimeoutError):
                vendor.wait_for_disconnect(timeout=0.3)  # still open: no false positive
        record = vendor.wait_for_disconnect(timeout=5)
    assert record.tokens_sent == 2
    assert vendor.stats["disconnects"] == 1


def test_a_models_provider_and_deadlines_follow_a_settings_change(settings, monkeypatch):
    # Read once per model (a burst of replies asks for them a thousand times),
    # read again after any settings change.
    from django.conf import LazySettings

    from chat.providers import provider_for, timeouts_for

    settings.CHAT_DEMO_TPS = 7.0
    settings.CHAT_TIMEOUT_FIRST_TOKEN_S = 11
    settings.CHAT_TIMEOUTS = {"demo:slow": {"total": 99}}
    assert provider_for("demo:demo").tps == 7.0
    assert timeouts_for("demo:demo")["first_token"] == 11.0
    assert timeouts_for("demo:slow")["total"] == 99.0

    reads: list[str] = []
    read = LazySettings.__getattribute__

    def counting(self: LazySettings, name: str) -> object:
        reads.append(name)
        return read(self, name)

    monkeypatch.setattr(LazySettings, "__getattribute__", counting)
    provider_for("demo:demo")
    timeouts_for("demo:demo")["first_token"] = 0.0  # a copy: the next caller's stays
    assert timeouts_for("demo:demo")["first_token"] == 11.0
    monkeypatch.undo()
    assert reads == []

    settings.CHAT_DEMO_TPS = 3.0
    settings.CHAT_TIMEOUT_FIRST_TOKEN_S = 12
    assert provider_for("demo:demo").tps == 3.0
    assert timeouts_for("demo:demo")["first_token"] == 12.0
