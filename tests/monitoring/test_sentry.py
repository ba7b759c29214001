"""Sentry events reach a real HTTP endpoint scrubbed: no PII, no user text, no locals."""

from __future__ import annotations

import gzip
import json
import logging
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sentry_sdk

from monitoring.sentry import capture_exception, capture_message, init_sentry

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


@pytest.fixture
def sentry_server() -> Iterator[Envelopes]:
    server = Envelopes(("127.0.0.1", 0), _Handler)
    server.bodies = []
    server.arrived = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    init_sentry(
        dsn=f"http://publickey@127.0.0.1:{server.server_port}/1",
        environment="test",
        release="chat@1.2.3",
        traces_sample_rate=0.0,
    )
    try:
        yield server
    finally:
        sentry_sdk.get_client().close(timeout=2)
        sentry_sdk.init(dsn=None)
        server.shutdown()
        server.server_close()


def _events(server: Envelopes) -> list[dict]:
    sentry_sdk.flush(timeout=5)
    assert server.arrived.wait(5), "no envelope arrived"
    events = []
    for body in server.bodies:
        lines = body.split(b"\n")
        for i, line in enumerate(lines[1:-1], start=1):
            try:
                header = json.loads(line)
            except ValueError:
                continue
            if isinstance(header, dict) and header.get("type") == "event":
                events.append(json.loads(lines[i + 1]))
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
