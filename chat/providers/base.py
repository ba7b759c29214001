"""The small async interface every model vendor sits behind.

A provider turns a list of chat messages into a stream of text chunks followed
by exactly one `Usage`. Everything else (timeouts, retries, fallbacks, cost,
moderation, persistence) lives in the pipeline, so a new vendor is one module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
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
