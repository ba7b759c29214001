"""Suite-wide fixtures: who is talking, and the services the scaled pass needs.

Outside CI a missing service skips the tests that need it, with the reason;
under CI=true it fails the run instead.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from tests.asgi_ws import WebsocketCommunicator

IN_CI = os.environ.get("CI") == "true"
SCALED = os.environ.get("CHAT_TEST_SCALED") == "1"
CHROMIUM = "/usr/bin/chromium"


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def _missing_services() -> list[str]:
    missing = []
    if SCALED:
        if not _reachable(os.environ.get("DATABASE_URL", ""), 5432):
            missing.append("PostgreSQL at DATABASE_URL")
        if not _reachable(os.environ.get("REDIS_URL", ""), 6379):
            missing.append("Redis at REDIS_URL")
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = _missing_services()
    if missing:
        reason = "the scaled pass needs " + " and ".join(missing)
        if IN_CI:
            raise pytest.UsageError(f"CI: {reason}; .ci/run should have started them")
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))
    if not os.path.exists(CHROMIUM) or shutil.which("chromium") is None:
        reason = f"browser tests need Debian's Chromium at {CHROMIUM} (apt-get install -y chromium)"
        if IN_CI and any("browser" in item.keywords for item in items):
            raise pytest.UsageError(f"CI: {reason}")
        for item in items:
            if "browser" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module", autouse=True)
def _real_servers_rows_forgotten(django_db_blocker: Any) -> Iterator[None]:
    """Empty pytest's database after a module whose real servers wrote to it.

    In the scaled pass the servers of tests/e2e/conftest.py share pytest's
    PostgreSQL database. What they write (users, messages, an activated model
    version, blocks) is committed by other processes, so no test's rollback
    or flush undoes it, and the next module's servers would read it: a
    version activated by one module answered another module's messages.
    """
    from tests.e2e.conftest import started_servers

    before = len(started_servers)
    yield
    mine = started_servers[before:]
    if not (SCALED and mine):
        return  # embedded servers write to their own SQLite files
    if any(process.poll() is None for process in started_servers):
        return  # a server still runs and may still need its rows
    from django.core.management import call_command

    with django_db_blocker.unblock():
        call_command("flush", interactive=False, verbosity=0)


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    """Each test starts with empty rate-limit counters and caches."""
    from django.core.cache import cache

    from chat import breaker, snapshots

    cache.clear()
    # The breaker remembers, per process, which models it has seen, trusts a
    # "closed" answer briefly and batches successes; a test starts with none.
    breaker.forget_local_state()
    # So do the snapshots, for up to 50 ms, which a test's database would outlive.
    snapshots.forget_local_state()


@pytest.fixture(autouse=True)
def _fresh_channel_layer() -> Iterator[None]:
    """Each test gets a channel layer of its own, as each test gets an event loop of its own.

    channels-redis binds a layer's receive lock to the loop that first
    receives on it; a consumer a test leaves receiving when its loop ends
    would leave the next test's sockets a lock of a dead loop. A server has
    one loop for its life, so this is the tests' concern only.
    """
    yield
    from channels.layers import channel_layers

    channel_layers.backends.clear()


@pytest.fixture
def make_user(db: None) -> Callable[..., object]:
    def make(username: str = "alice", *, staff: bool = False) -> object:
        users = get_user_model()
        if staff:
            return users.objects.create_superuser(username=username, password="pw-123456!")
        return users.objects.create_user(username=username, password="pw-123456!")

    return make


def session_cookie_for(user: object | None) -> str:
    """Return a Cookie header for a signed-in user, or for a new anonymous visitor."""
    client = Client()
    if user is None:
        client.get("/")
    else:
        client.force_login(user)  # type: ignore[arg-type]
    return f"sessionid={client.cookies['sessionid'].value}"


@pytest.fixture
async def ws() -> AsyncIterator[Callable[..., Awaitable[WebsocketCommunicator]]]:
    """Open WebSocket connections to the real ASGI app; all are closed after the test."""
    from config.asgi import application

    opened: list[WebsocketCommunicator] = []

    async def connect(
        cookie: str | None = None, *, origin: str = "http://testserver"
    ) -> WebsocketCommunicator:
        headers = [(b"origin", origin.encode())] if origin else []
        if cookie:
            headers.append((b"cookie", cookie.encode()))
        comm = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
        connected, _ = await comm.connect()
        assert connected, "the WebSocket handshake was refused"
        opened.append(comm)
        return comm

    yield connect
    for comm in opened:
        await comm.disconnect()
