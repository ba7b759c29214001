"""Structured logs: JSON lines with ids from context, personal data redacted."""

from __future__ import annotations

import copy
import io
import json
import logging
import logging.config
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import DatabaseError, IntegrityError, transaction
from django.test import Client

from chat.models import Conversation, Message
from monitoring.logs import JsonFormatter, RedactFilter, log_context

REPO = Path(__file__).resolve().parents[2]


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


@pytest.fixture(params=["plain", "json"])
def configured_log(request, settings) -> Iterator[io.StringIO]:
    """The root logger as settings.LOGGING configures it, in each LOG_FORMAT, into a buffer."""
    stream = io.StringIO()
    config = copy.deepcopy(settings.LOGGING)
    config["handlers"]["console"]["formatter"] = request.param
    config["handlers"]["console"]["stream"] = stream
    logging.config.dictConfig(config)
    yield stream
    logging.config.dictConfig(settings.LOGGING)


def test_tracebacks_and_arguments_are_redacted_in_every_format(configured_log):
    try:
        raise ValueError("duplicate key (username)=(bob@example.com) token sk-abcdefghijklmnop1234")
    except ValueError:
        logging.getLogger("chat.accounts").exception("sign-up failed for %s", "bob@example.com")
    logging.getLogger("chat.accounts").warning("stack", stack_info=True, extra={"who": "a@b.co"})
    out = configured_log.getvalue()
    assert "ValueError" in out and "[EMAIL]" in out  # the traceback is logged, redacted
    assert "bob@example.com" not in out and "a@b.co" not in out
    assert "sk-abcdefghijklmnop1234" not in out


def test_database_errors_quoting_a_row_lose_the_row(configured_log):
    detail = 'new row for relation "chat_message" violates check constraint "positive"'
    try:
        raise DatabaseError(f"{detail}\nDETAIL:  Failing row contains (7, user, my secret diary).")
    except DatabaseError as exc:
        logging.getLogger("chat.store").exception("could not store: %s", exc)
    out = configured_log.getvalue()
    assert "violates check constraint" in out
    assert "my secret diary" not in out


@pytest.mark.django_db
def test_a_real_constraint_error_logs_no_user_text(configured_log, make_user):
    """PostgreSQL quotes the failing row in its DETAIL line; SQLite names the column only."""
    conversation = Conversation.objects.create(user=make_user("anna"))
    try:
        with transaction.atomic():  # the failed insert is rolled back alone
            Message.objects.create(
                conversation=conversation, role="user", content="my secret diary", ttft_ms=-1
            )
    except IntegrityError as exc:
        logging.getLogger("chat.store").exception("could not store: %s", exc)
    out = configured_log.getvalue()
    assert "IntegrityError" in out and "ttft_ms" in out
    assert "my secret diary" not in out


def test_the_celery_worker_logs_through_the_redacting_configuration(tmp_path):
    """A real worker logs a failing task's arguments and traceback, redacted."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST", "DJANGO_"))
        and k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "LOG_FORMAT")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings.embedded",
        CHAT_DATA_DIR=str(tmp_path),
        PYTHONUNBUFFERED="1",
    )
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "solo"),
            *("--loglevel", "info", "--without-heartbeat", "--without-mingle", "--without-gossip"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert worker.stdout is not None
        send = (
            "from config.celery import app;"
            "app.send_task('feedback.export_run', args=['bob@example.com'])"
        )
        subprocess.run([sys.executable, "-c", send], cwd=REPO, env=env, check=True, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = worker.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "raised unexpected" in line or "Traceback" in line:
                # The rest of the record (the traceback) follows at once.
                time.sleep(1)
                break
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        out, _ = worker.communicate(timeout=30)
    log = "".join(lines) + out
    assert "feedback.export_run" in log and "ValueError" in log, log
    assert "bob@example.com" not in log, log
    assert "[EMAIL]" in log


@pytest.mark.django_db
def test_a_host_nobody_allowed_is_a_warning_not_an_error(caplog):
    """Any visitor can send a bad Host header at will: it must not page anyone or fill Sentry."""
    with caplog.at_level(logging.INFO, logger="django.security.DisallowedHost"):
        response = Client().get("/", HTTP_HOST="evil.example")
    assert response.status_code == 400
    refused = [r for r in caplog.records if r.name == "django.security.DisallowedHost"]
    assert refused and {r.levelname for r in refused} == {"WARNING"}
    assert "evil.example" in refused[0].getMessage()
