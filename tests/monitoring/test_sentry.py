"""Sentry events reach a real HTTP endpoint scrubbed: no PII, no user text, no locals."""

from __future__ import annotations

import gzip
import json
import logging
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import pytest
import sentry_sdk
from asgiref.sync import async_to_sync

from monitoring.sentry import capture_exception, capture_message, init_sentry
from tests.conftest import session_cookie_for
from tests.monitoring.helpers import asgi_get

SECRET_TEXT = "my grandmother's secret lasagne recipe"
EMAIL = "alice.jones@example.com"
CARD = "4111 1111 1111 1111"


class Envelopes(ThreadingHTTPServer):
    bodies: list[bytes]
    arrived: threading.Event


class _Handler(BaseHTTPRequestHandler):
    server: Envelopes

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        elif encoding == "br":
            import brotli  # type: ignore[import-not-found]

            body = brotli.decompress(body)
        self.server.bodies.append(body)
        self.server.arrived.set()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        return None


@contextmanager
def _serving(*, traces_sample_rate: float) -> Iterator[Envelopes]:
    server = Envelopes(("127.0.0.1", 0), _Handler)
    server.bodies = []
    server.arrived = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    init_sentry(
        dsn=f"http://publickey@127.0.0.1:{server.server_port}/1",
        environment="test",
        release="chat@1.2.3",
        traces_sample_rate=traces_sample_rate,
    )
    try:
        yield server
    finally:
        sentry_sdk.get_client().close(timeout=2)
        sentry_sdk.init(dsn=None)
        server.shutdown()
        server.server_close()


@pytest.fixture
def sentry_server() -> Iterator[Envelopes]:
    with _serving(traces_sample_rate=0.0) as server:
        yield server


@pytest.fixture
def sentry_tracing_server() -> Iterator[Envelopes]:
    """A server for an SDK that also sends every request's transaction (traces on)."""
    with _serving(traces_sample_rate=1.0) as server:
        yield server


def _events(server: Envelopes, kind: str = "event") -> list[dict]:
    """Return the items of one kind ("event", "transaction") the SDK has sent."""
    sentry_sdk.flush(timeout=5)
    assert server.arrived.wait(5), "no envelope arrived"
    events = []
    for body in server.bodies:
        # An envelope header, then each item as a header line and a payload line.
        lines = body.rstrip(b"\n").split(b"\n")
        for header, payload in zip(lines[1::2], lines[2::2], strict=True):
            if json.loads(header).get("type") == kind:
                events.append(json.loads(payload))
    return events


def _fail_with_user_text(prompt: str) -> None:
    reply = f"{SECRET_TEXT} for {EMAIL}"  # noqa: F841 - a local the SDK must not send
    raise ValueError(f"could not answer {EMAIL} paying with {CARD}")


def test_exception_arrives_scrubbed(sentry_server):
    logging.getLogger("chat.test").warning("user %s asked about %s", EMAIL, CARD)
    try:
        _fail_with_user_text(SECRET_TEXT)
    except ValueError as exc:
        capture_exception(exc)
    (event,) = _events(sentry_server)
    raw = json.dumps(event)
    assert event["release"] == "chat@1.2.3" and event["environment"] == "test"
    assert event["exception"]["values"][0]["type"] == "ValueError"
    assert "_fail_with_user_text" in raw  # the stack trace is there
    assert EMAIL not in raw and CARD not in raw
    assert SECRET_TEXT not in raw
    assert '"vars"' not in raw
    assert "[EMAIL]" in raw  # redacted, not silently emptied


def test_alert_message_arrives_and_request_bodies_are_dropped(sentry_server):
    with sentry_sdk.new_scope() as scope:
        scope.set_context("request", {"data": SECRET_TEXT, "url": "/x"})
        scope.set_extra("frame", {"type": "chat.send", "content": SECRET_TEXT})
        capture_message(f"alert: drift for {EMAIL}", level="warning")
    (event,) = _events(sentry_server)
    raw = json.dumps(event)
    assert "alert: drift for [EMAIL]" in raw
    assert SECRET_TEXT not in raw


SEARCH = "my hiv test results"


def _asgi_get(path: str, *, query: str, headers: list[tuple[bytes, bytes]]) -> int:
    """GET `path` through the ASGI application, as the server would; return the status.

    Not through Django's test client: that skips the SDK's ASGI middleware,
    which is what puts the query string into the event.
    """
    sent = async_to_sync(asgi_get)(path, query=query, headers=headers)
    (start,) = [m for m in sent if m["type"] == "http.response.start"]
    return int(start["status"])


@pytest.fixture
def failing_search(make_user: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Make the conversation search fail; return a signed-in user's request headers."""
    from chat import selectors

    def broken(**kwargs: object) -> list[dict[str, Any]]:
        raise RuntimeError("the search index went away")

    monkeypatch.setattr(selectors, "conversation_search", broken)
    cookie = session_cookie_for(make_user("alice"))
    referer = f"http://testserver/admin/chat/message/?{urlencode({'q': SEARCH})}#results"
    return [(b"cookie", cookie.encode()), (b"referer", referer.encode())]


def _search_leaks(raw: str) -> list[str]:
    return [form for form in (SEARCH, quote_plus(SEARCH), quote(SEARCH), "hiv") if form in raw]


@pytest.mark.django_db(transaction=True)
def test_a_failed_request_arrives_without_its_query_string(sentry_server, failing_search):
    query = urlencode({"q": SEARCH})
    assert _asgi_get("/api/conversations/", query=query, headers=failing_search) == 500
    events = _events(sentry_server)
    assert events
    for event in events:
        request = event["request"]
        assert request["url"] == "http://testserver/api/conversations/"
        assert "query_string" not in request
        assert request["headers"]["referer"] == "http://testserver/admin/chat/message/"
        assert _search_leaks(json.dumps(event)) == []
    assert any(e["exception"]["values"][0]["type"] == "RuntimeError" for e in events)


@pytest.mark.django_db(transaction=True)
def test_a_traced_request_arrives_without_its_query_string(sentry_tracing_server, failing_search):
    """SENTRY_TRACES_SAMPLE_RATE on: transactions carry the request too."""
    query = urlencode({"q": SEARCH})
    assert _asgi_get("/api/conversations/", query=query, headers=failing_search) == 500
    (transaction,) = _events(sentry_tracing_server, kind="transaction")
    assert transaction["transaction"] == "/api/conversations/"
    assert "query_string" not in transaction["request"]
    assert _search_leaks(json.dumps(transaction)) == []
