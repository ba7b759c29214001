"""The small async interface every model vendor sits behind.

A provider turns a list of chat messages into a stream of text chunks followed
by exactly one `Usage`. Everything else (timeouts, retries, fallbacks, cost,
moderation, persistence) lives in the pipeline, so a new vendor is one module.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal, NamedTuple, Protocol

Role = Literal["system", "user", "assistant"]


class ChatMessage(NamedTuple):
    # A named tuple: a message's history builds up to 200 of these from its
    # rows (ChatMessage._make), ~0.4 us each on a 2-core machine against
    # ~1.4 us for a frozen dataclass: 0.2 ms of a message's first token.
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class StreamOptions:
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    # Extra vendor-specific knobs, passed through untouched.
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # True when the vendor did not report usage and we counted ourselves.
    estimated: bool = False
    finish_reason: Literal["stop", "length"] = "stop"


StreamEvent = str | Usage


class ProviderError(Exception):
    """A vendor failure, classified so the call path can decide what to do.

    `kind` is one of: "connect", "timeout", "rate_limited", "server",
    "bad_request", "auth", "not_found", "context_length", "content_policy",
    "malformed". `status` is the HTTP status when there was one.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in {"connect", "timeout", "rate_limited", "server"}


class Provider(Protocol):
    """`stream()` yields text chunks, then exactly one `Usage`, then stops.

    Cancelling the consuming task must close the upstream connection at once.
    """

    name: str

    def stream(
        self, messages: list[ChatMessage], options: StreamOptions
    ) -> AsyncIterator[StreamEvent]: ...


def kind_for_status(status: int) -> str:
    """Classify an HTTP error status the same way for every vendor."""
    if status == 408:
        return "timeout"
    if status == 429:
        return "rate_limited"
    if status in (409, 424) or status >= 500:
        # 409 is a lock/conflict timeout upstream, 424 text-generation-
        # inference's failed generation (out of memory among others), 529
        # Anthropic's "overloaded": all worth a retry.
        return "server"
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    if status == 413:
        return "context_length"
    return "bad_request"


# How model servers say they ran out of memory (CUDA, Metal, system RAM). That
# is the server's trouble, not the request's, whatever status comes with it:
# text-generation-inference reports it as a 424, vLLM sends every in-stream
# error as a 400 "BadRequestError", and llama.cpp-based servers may call it an
# invalid request. It is retried and counted against the model like a 5xx.
_OUT_OF_MEMORY_HINTS = (
    "out of memory",
    "outofmemory",  # torch.OutOfMemoryError
    "more system memory",  # Ollama: "model requires more system memory"
    "insufficient memory",
    "not enough memory",
    "failed to allocate",
)


def says_out_of_memory(text: str) -> bool:
    """Return whether a vendor's error text says the model ran out of memory."""
    lowered = text.lower()
    return any(hint in lowered for hint in _OUT_OF_MEMORY_HINTS)


def estimate_tokens(chars: int) -> int:
    """Estimate tokens from a character count as ceil(chars / 4), a rule of thumb for English."""
    return math.ceil(chars / 4)


# The longest wait a vendor's answer is taken to ask for: users are told when
# to try again, and a date decades ahead (a vendor's or a proxy's mistake)
# must not become "try again in 2,299,592,856 seconds".
RETRY_AFTER_MAX_S = 3600.0


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Return the delay a response asks for, in seconds (at most an hour), or None.

    Reads OpenAI's `retry-after-ms`, then `retry-after` as seconds (floats
    accepted) or as an HTTP date.
    """
    seconds = _retry_after(headers)
    return None if seconds is None else min(seconds, RETRY_AFTER_MAX_S)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            seconds = float(millis) / 1000
        except ValueError:
            pass
        else:
            if math.isfinite(seconds):
                return max(0.0, seconds)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None
