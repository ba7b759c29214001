"""Structured logs: ids from context variables, PII redacted, never message text.

`log_context(request_id=…, conversation_id=…, message_id=…)` binds ids for
the code that runs inside it (a request, a reply task); every record then
carries them. `RedactFilter` runs each record's message and arguments
through the PII redactor; both formatters (`PlainFormatter`, `JsonFormatter`)
redact again what they render, tracebacks included, and cut the details of
database errors, which quote rows of user text ("Failing row contains …").
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import re
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.utils.decorators import sync_and_async_middleware

_IDS = ("request_id", "conversation_id", "message_id")
_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "monitoring_log_context",
    default={},  # noqa: B039 - never mutated, only replaced
)
# Attributes that carry text a user or a model wrote; dropped from records.
_TEXT_ATTRS = frozenset({"content", "text", "prompt", "reply", "comment"})
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


@contextlib.contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Bind ids (request_id, conversation_id, message_id) for the records logged inside."""
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**ids: Any) -> None:
    """Bind ids for the rest of the current task or thread's context."""
    _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})


# PostgreSQL puts the offending values in the lines after an error's first:
# "DETAIL:  Failing row contains (…)", "DETAIL:  Key (email)=(…) already exists".
_DETAIL_LINE = re.compile(r"^(\s*DETAIL:).*$", re.MULTILINE)
_FAILING_ROW = re.compile(r"(Failing row contains|Key \([^)]*\)=)\s*\(.*", re.DOTALL)


def _is_database_error(exc: BaseException) -> bool:
    # psycopg's own errors are known by name: importing psycopg here would load
    # it in processes that never use PostgreSQL.
    package = type(exc).__module__.partition(".")[0]
    return isinstance(exc, DatabaseError | sqlite3.Error) or package in ("psycopg", "psycopg2")


def _database_details(record: logging.LogRecord) -> list[str]:
    """Return the full text of each database error the record carries, in its traceback or args."""
    roots: list[object] = list(record.args) if isinstance(record.args, tuple) else []
    if record.exc_info and record.exc_info[1] is not None:
        roots.append(record.exc_info[1])
    found: list[str] = []
    seen: set[int] = set()
    pending = [r for r in roots if isinstance(r, BaseException)]
    while pending:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if _is_database_error(exc) and "\n" in str(exc).strip():
            found.append(str(exc).strip())
        pending.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)
    return found


def redact_log_text(text: str, record: logging.LogRecord) -> str:
    """Return a rendered log text with personal data and database errors' details removed.

    A database error keeps its first line (which constraint, which table);
    the lines after it quote the row or key that broke it, often user text.
    """
    from chat.safety.pii import redact

    for detail in _database_details(record):
        first = detail.splitlines()[0]
        text = text.replace(detail, f"{first} [details removed]")
    # What the exact match missed: a detail rendered some other way.
    text = _DETAIL_LINE.sub(r"\1 [removed]", text)
    text = _FAILING_ROW.sub(r"\1 [removed]", text)
    return redact(text)


class RedactFilter(logging.Filter):
    """Redact personal data from every record; drop attributes that hold user text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            record.msg = redact_log_text(message, record)
            record.args = None
            for name in _TEXT_ATTRS & vars(record).keys():
                setattr(record, name, "[Filtered]")
            for key, value in _context.get().items():
                if not hasattr(record, key):
                    setattr(record, key, value)
        except Exception:
            record.msg, record.args = "[unloggable record]", None
        return True


class AsWarning(logging.Filter):
    """Log a logger's errors as warnings: for what any visitor can cause at will.

    Django logs a request with a Host header not in ALLOWED_HOSTS at ERROR
    (`django.security.DisallowedHost`), so a scanner could fill the error log
    and Sentry (which takes ERROR records) on demand. The request is already
    refused with a 400; a warning keeps it visible without an alert.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class PlainFormatter(logging.Formatter):
    """A line of text per record; the whole of it redacted, traceback and stack included."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            return redact_log_text(super().format(record), record)
        except Exception:
            return f"{record.levelname} {record.name} [unloggable record]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids and extras."""

    def format(self, record: logging.LogRecord) -> str:
        from chat.safety.pii import redact_obj

        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _IDS:
            value = getattr(record, key, None) or _context.get().get(key)
            if value is not None:
                entry[key] = value
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry and key not in _TEXT_ATTRS:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        for key in ("message", "exc_info", "stack_info"):
            if key in entry:
                entry[key] = redact_log_text(entry[key], record)
        return json.dumps(redact_obj(entry), default=str)


@sync_and_async_middleware
def request_id_middleware(
    get_response: Callable[[HttpRequest], Any],
) -> Callable[[HttpRequest], Any]:
    """Give each request an id (X-Request-ID when a proxy set a sane one) for its logs."""

    def request_id(request: HttpRequest) -> str:
        given = request.headers.get("X-Request-ID", "")
        return (
            given
            if 0 < len(given) <= 64 and given.isascii() and given.isprintable()
            else uuid.uuid4().hex
        )

    if _is_async(get_response):

        async def async_middleware(request: HttpRequest) -> HttpResponse:
            rid = request_id(request)
            with log_context(request_id=rid):
                response: HttpResponse = await get_response(request)
            response["X-Request-ID"] = rid
            return response

        return async_middleware

    def middleware(request: HttpRequest) -> HttpResponse:
        rid = request_id(request)
        with log_context(request_id=rid):
            response: HttpResponse = get_response(request)
        response["X-Request-ID"] = rid
        return response

    return middleware


def _is_async(func: Callable[..., Any]) -> bool:
    from asgiref.sync import iscoroutinefunction

    return iscoroutinefunction(func)


__all__ = [
    "JsonFormatter",
    "PlainFormatter",
    "RedactFilter",
    "bind",
    "log_context",
    "redact_log_text",
    "request_id_middleware",
]
