"""The call to the model: one place for timeouts, retries, fallbacks and queueing.

`call_model` yields text chunks and ends with one `CallOutcome`. Before the
first chunk it may retry or fall back; after it, a failure ends the reply.
Failures surface as the user-facing errors `Timeout` and `Unavailable`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from chat.errors import Timeout, Unavailable
from chat.providers import ChatMessage, ProviderError, StreamOptions, Usage, provider_for

OnQueued = Callable[[int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ModelPlan:
    model: str
    fallbacks: tuple[str, ...] = ()
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass(slots=True)
class CallOutcome:
    model: str
    usage: Usage | None
    # One entry per attempt: {"model": ..., "outcome": "ok" | "<error kind>"}.
    path: list[dict[str, Any]] = field(default_factory=list)


async def call_model(
    plan: ModelPlan,
    history: list[ChatMessage],
    *,
    owner_key: str,
    on_queued: OnQueued,
) -> AsyncGenerator[str | CallOutcome, None]:
    provider = provider_for(plan.model)
    usage: Usage | None = None
    stream = provider.stream(
        history,
        StreamOptions(model=plan.model, temperature=plan.temperature, max_tokens=plan.max_tokens),
    )
    try:
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for event in stream:
                if isinstance(event, Usage):
                    usage = event
                else:
                    yield event
    except ProviderError as exc:
        raise (Timeout() if exc.kind == "timeout" else Unavailable()) from exc
    yield CallOutcome(model=plan.model, usage=usage, path=[{"model": plan.model, "outcome": "ok"}])
