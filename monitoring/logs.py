"""Structured logs: ids from context variables, PII redacted, never message text.

`log_context(request_id=…, conversation_id=…, message_id=…)` binds ids for
the code that runs inside it (a request, a reply task); every record then
carries them. `RedactFilter` runs each record's message and arguments
through the PII redactor; `JsonFormatter` writes one JSON object a line.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

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


class RedactFilter(logging.Filter):
    """Redact personal data from every record; drop attributes that hold user text."""

    def filter(self, record: logging.LogRecord) -> bool:
        from chat.safety.pii import redact

        try:
            message = record.getMessage()
            record.msg = redact(message)
            record.args = None
            for name in _TEXT_ATTRS & vars(record).keys():
                setattr(record, name, "[Filtered]")
            for key, value in _context.get().items():
                if not hasattr(record, key):
                    setattr(record, key, value)
        except Exception:
            record.msg, record.args = "[unloggable record]", None
        return True


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


__all__ = ["JsonFormatter", "RedactFilter", "bind", "log_context", "request_id_middleware"]
