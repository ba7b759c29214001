"""Structured logs: JSON lines with ids from context, personal data redacted."""

from __future__ import annotations

import io
import json
import logging

import pytest
from django.test import Client

from monitoring.logs import JsonFormatter, RedactFilter, log_context


@pytest.fixture
def json_log() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactFilter())
    logger = logging.getLogger("tests.monitoring.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_json_lines_carry_ids_and_never_pii(json_log):
    logger, stream = json_log
    with log_context(request_id="req-1", conversation_id=7, message_id=42):
        logger.warning("reply failed for %s", "bob@example.com", extra={"content": "secret words"})
    logger.info("outside")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "WARNING" and first["logger"] == "tests.monitoring.json"
    assert (first["request_id"], first["conversation_id"], first["message_id"]) == ("req-1", 7, 42)
    assert "bob@example.com" not in json.dumps(first) and "[EMAIL]" in first["message"]
    assert "secret words" not in json.dumps(first)
    assert "request_id" not in second


def test_settings_select_json_and_filter_every_record(settings):
    assert settings.LOGGING["handlers"]["console"]["filters"] == ["redact"]
    assert settings.LOGGING["formatters"]["json"]["()"] == "monitoring.logs.JsonFormatter"


@pytest.mark.django_db
def test_requests_get_an_id_back():
    response = Client().get("/health/live")
    assert len(response["X-Request-ID"]) == 32
    given = Client().get("/health/live", HTTP_X_REQUEST_ID="lb-abc-123")
    assert given["X-Request-ID"] == "lb-abc-123"
