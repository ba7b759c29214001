"""Sentry, switched on by SENTRY_DSN, with no user text and no personal data.

Local variables are never sent (they hold prompts); request bodies, query
strings, WebSocket frames and anything that looks like message text are
dropped; every string left goes through the PII redactor. Transactions (sent
when SENTRY_TRACES_SAMPLE_RATE is above 0) carry the same request data as
errors and are scrubbed the same way. Channels 4 consumers are not covered by
the SDK's integrations, so the consumer calls `capture_exception` itself.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

logger = logging.getLogger(__name__)

# Keys whose values are user or model text wherever they appear in an event.
_TEXT_KEYS = frozenset(
    {
        "content",
        "text",
        "prompt",
        "reply",
        "comment",
        "message_text",
        "data",
        "body",
        "text_data",
        "bytes_data",
        "frame",
        "messages",
        "history",
        "title",
    }
)
_FILTERED = "[Filtered]"


def _is_text_key(key: object) -> bool:
    return isinstance(key, str) and key.lower() in _TEXT_KEYS


def _strip_text(obj: Any, depth: int = 0) -> Any:
    if depth > 20:
        return _FILTERED
    if isinstance(obj, dict):
        return {
            k: _FILTERED if _is_text_key(k) else _strip_text(v, depth + 1) for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [_strip_text(v, depth + 1) for v in obj]
    return obj


def _without_query(url: str) -> str:
    return url.split("?", 1)[0].split("#", 1)[0]


def scrub_event(event: dict[str, Any]) -> dict[str, Any]:
    """Return the event with request bodies, query strings, frame data, locals and PII removed."""
    from chat.safety.pii import redact_obj

    request = event.get("request")
    if isinstance(request, dict):
        request.pop("data", None)
        request.pop("cookies", None)
        # Query strings are dropped whole rather than cut down to their
        # parameter names. The values are what people typed (a search sends
        # q=my+hiv+test+results), and the names are the client's to choose
        # too: `?my+hiv+test+results` is all name and no value. The path and
        # the transaction name still say which endpoint failed.
        request.pop("query_string", None)
        if isinstance(request.get("url"), str):
            request["url"] = _without_query(request["url"])
        headers = request.get("headers")
        if isinstance(headers, dict):
            for name in list(headers):
                if name.lower() in ("cookie", "authorization", "x-csrftoken"):
                    headers[name] = _FILTERED
                elif name.lower() == "referer" and isinstance(headers[name], str):
                    # The page the request came from, with that page's query.
                    headers[name] = _without_query(headers[name])
    for exc in (event.get("exception") or {}).get("values") or []:
        for frame in (exc.get("stacktrace") or {}).get("frames") or []:
            frame.pop("vars", None)
    for thread in (event.get("threads") or {}).get("values") or []:
        for frame in (thread.get("stacktrace") or {}).get("frames") or []:
            frame.pop("vars", None)
    return redact_obj(_strip_text(event))


def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return scrub_event(event)
    except Exception:
        # An event we could not clean is an event we do not send.
        logger.warning("sentry: dropped an event that could not be scrubbed")
        return None


def before_send_transaction(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
    """Scrub a transaction as an error is scrubbed (`before_send` never sees one).

    A transaction carries the request it measured (URL, headers, query
    string) and its spans carry data such as outgoing URLs with their
    queries: the same personal data an error can hold. Span data goes the
    way of every `data` key, whole; the spans' timings and SQL (with
    placeholders, never values) are what a trace is read for.
    """
    try:
        return scrub_event(event)
    except Exception:
        logger.warning("sentry: dropped a transaction that could not be scrubbed")
        return None


def before_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return scrub_event(crumb)
    except Exception:
        return None


def init_sentry(
    *,
    dsn: str,
    environment: str,
    release: str,
    traces_sample_rate: float,
) -> None:
    """Start the SDK with the Django, Celery and asyncio integrations."""
    import sentry_sdk
    from sentry_sdk.integrations.asyncio import AsyncioIntegration
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.django import DjangoIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=dsn,
        environment=environment,
        release=release or None,
        traces_sample_rate=traces_sample_rate,
        include_local_variables=False,
        send_default_pii=False,
        max_request_body_size="never",
        before_send=before_send,  # type: ignore[arg-type]  # the SDK types events as TypedDicts
        before_send_transaction=before_send_transaction,  # type: ignore[arg-type]  # as above
        before_breadcrumb=before_breadcrumb,
        integrations=[
            DjangoIntegration(),
            CeleryIntegration(),
            AsyncioIntegration(),
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
        ],
    )


def capture_exception(exc: BaseException) -> None:
    """Send an exception to Sentry when it is on; never raise."""
    try:
        import sentry_sdk

        sentry_sdk.capture_exception(exc)
    except Exception:
        logger.debug("sentry: capture failed", exc_info=True)


def capture_message(
    message: str, *, level: Literal["fatal", "error", "warning", "info", "debug"] = "info"
) -> None:
    """Send a message (an alert) to Sentry when it is on; never raise."""
    try:
        import sentry_sdk

        sentry_sdk.capture_message(message, level=level)
    except Exception:
        logger.debug("sentry: capture failed", exc_info=True)
