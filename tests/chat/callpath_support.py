"""Fixtures for the call-path tests: a fake vendor, a manual clock, real sockets.

Import the fixtures into a test module with
`from tests.chat.callpath_support import *  # noqa: F403`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from channels.db import database_sync_to_async

from chat import callpath
from chat import clock as clock_module
from chat.clock import ManualClock
from chat.models import Message
from chat.providers import providers_aclose
from tests.asgi_ws import WebsocketCommunicator
from tests.chat.helpers import recv, send, send_frame
from tests.conftest import session_cookie_for
from tests.fakevendor import FakeVendor

PRIMARY = "openai:gpt-fake"
FALLBACK = "anthropic:claude-fake"

__all__ = [
    "FALLBACK",
    "PRIMARY",
    "_providers_closed",
    "ask",
    "clock",
    "cookie_for",
    "fake_vendor",
    "reload",
    "vendor",
    "wired",
]


@pytest.fixture(scope="session")
def fake_vendor() -> Iterator[FakeVendor]:
    with FakeVendor() as fake:
        yield fake


@pytest.fixture
def vendor(fake_vendor: FakeVendor) -> Iterator[FakeVendor]:
    fake_vendor.reset()
    yield fake_vendor
    fake_vendor.reset()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManualClock]:
    """Time moves only by hand; backoff waits jump ahead; jitter draws its maximum."""
    manual = ManualClock()
    previous = clock_module.use(manual)
    monkeypatch.setattr(callpath, "jitter", lambda: 1.0)
    yield manual
    clock_module.use(previous)


@pytest.fixture
async def _providers_closed() -> AsyncIterator[None]:
    # Each test has its own event loop; pooled connections must close on it.
    yield
    await providers_aclose()


@pytest.fixture
def wired(
    settings: Any, vendor: FakeVendor, clock: ManualClock, _providers_closed: None
) -> FakeVendor:
    """Point `openai:` and `anthropic:` at the fake vendor, with small, known limits."""
    settings.CHAT_MODEL = PRIMARY
    settings.CHAT_FALLBACK_MODELS = []
    settings.OPENAI_BASE_URL = vendor.openai_base_url
    settings.OPENAI_API_KEY = "sk-test"
    settings.ANTHROPIC_BASE_URL = vendor.anthropic_base_url
    settings.ANTHROPIC_API_KEY = "sk-ant-test"
    settings.CHAT_TIMEOUT_FIRST_TOKEN_S = 5.0
    settings.CHAT_TIMEOUT_IDLE_S = 5.0
    settings.CHAT_TIMEOUT_TOTAL_S = 120.0
    settings.CHAT_TIMEOUTS = {}
    settings.CHAT_RETRY_MAX_ATTEMPTS = 3
    settings.CHAT_RETRY_BASE_S = 0.5
    settings.CHAT_RETRY_MAX_BACKOFF_S = 8.0
    settings.CHAT_RETRY_AFTER_MAX_S = 10.0
    settings.CHAT_RETRY_TOTAL_WAIT_S = 15.0
    settings.CHAT_BREAKER_FAILURES = 50
    settings.CHAT_BREAKER_MIN_VOLUME = 1000
    settings.CHAT_QUEUE_LIMITS = {}
    # Coalescing waits in real time, and output moderation holds text back in
    # windows: here every token goes out as it arrives, so what the user saw
    # before a failure is exactly what the call path delivered.
    settings.CHAT_COALESCE_MS = 0
    settings.CHAT_MODERATION_WINDOW_TOKENS = 1
    return vendor


@database_sync_to_async
def cookie_for(make_user: Any, username: str = "alice") -> str:
    return session_cookie_for(make_user(username))


@database_sync_to_async
def reload(message_id: int) -> Message:
    return Message.objects.get(pk=message_id)


async def ask(
    comm: WebsocketCommunicator, content: str = "Hello there", **extra: Any
) -> dict[str, Any]:
    """Send a message; return its chat.accepted frame."""
    await send(comm, send_frame(content, **extra))
    accepted = await recv(comm)
    assert accepted["type"] == "chat.accepted", accepted
    return accepted
