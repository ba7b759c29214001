"""The call to the model: one place for timeouts, retries, fallbacks and queueing.

`call_model` yields text chunks and then exactly one `CallOutcome`. When the
reply fails, that outcome (with `error` set) still comes, so the pipeline
stores the model and the attempts, and then `Timeout` or `Unavailable` is
raised.

For each model in the plan (the primary, then `CHAT_FALLBACK_MODELS` in
order):

1. the circuit breaker is asked; an open breaker skips the model at once;
2. a slot in the model's fair queue is taken (`on_queued(position)` while
   waiting; a full queue skips the model and, if nothing else answers, the
   user gets `unavailable` with a retry-after);
3. the vendor is called with per-model deadlines for the first token, the
   gap between tokens and the whole reply (`chat.providers.timeouts_for`);
4. a retryable failure (connect, timeout before the first token, 408, 409,
   429, 5xx) is retried with full-jitter exponential backoff, honouring
   Retry-After up to a cap, within a bounded number of attempts and a bounded
   total wait; a context-length refusal is retried once with a trimmed
   history; anything else moves on to the next model.

Once a chunk has been yielded there is no silent restart: a failure ends the
reply (`Timeout` for a deadline, `Unavailable` otherwise). When no model
answers, the optional `cached_answer` hook is asked before giving up.
Closing the generator (Stop, a disconnect) closes the vendor's HTTP stream at
once and gives the queue slot back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from django.conf import settings

from chat import breaker, clock, queueing
from chat.errors import ChatError, Timeout, Unavailable
from chat.providers import (
    ChatMessage,
    ProviderError,
    StreamOptions,
    Usage,
    provider_for,
    split_model,
    timeouts_for,
)
from chat.tokens import estimate_tokens

logger = logging.getLogger(__name__)

OnQueued = Callable[[int], Awaitable[None]]
CachedAnswer = Callable[[], Awaitable[str | None]]

# Full jitter draws from here; tests may replace it to make waits exact.
jitter: Callable[[], float] = random.random

# Failures that say something about the request, not about the vendor's health.
_REQUEST_FAULTS = frozenset({"bad_request", "context_length", "content_policy"})


@dataclass(frozen=True, slots=True)
class ModelPlan:
    model: str
    fallbacks: tuple[str, ...] = ()
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass(slots=True)
class CallOutcome:
    # The model that answered (on a failure: the one that failed mid-stream,
    # or the plan's primary when none answered).
    model: str
    usage: Usage | None
    # One entry per attempt: {"model", "outcome": "ok" | "<error kind>" |
    # "circuit_open" | "queue_full", "status"?, "deadline"?, "waited_s"?,
    # "queued"?, "delivered"?}.
    path: list[dict[str, Any]] = field(default_factory=list)
    # True when a model other than the primary answered.
    fallback: bool = False
    # True when the answer came from the cached-answer hook.
    cached: bool = False
    # The error code raised right after this outcome, or None on success.
    error: str | None = None


class _NextModel(Exception):
    """This model cannot answer this request; try the next one."""

    def __init__(self, error: ChatError) -> None:
        super().__init__(error.code)
        self.error = error


# What answered when every model failed and an earlier answer was given:
# the call path's entry and the reply's metrics label (never a model name,
# which always holds a colon).
LAST_RESORT = "cache"


class _Ended(Exception):
    """The reply failed after text reached the user: no retry, no fallback."""

    def __init__(self, error: ChatError, usage: Usage) -> None:
        super().__init__(error.code)
        self.error = error
        self.usage = usage


async def call_model(
    plan: ModelPlan,
    history: list[ChatMessage],
    *,
    owner_key: str,
    on_queued: OnQueued,
    cached_answer: CachedAnswer | None = None,
    on_streaming: Callable[[CallOutcome], None] | None = None,
) -> AsyncGenerator[str | CallOutcome, None]:
    """Yield the reply's text chunks, then one CallOutcome; raise Timeout or Unavailable.

    `on_streaming` hears which model is answering as soon as its first chunk
    arrives, so a reply stopped halfway still records the model that wrote it.
    """
    clk = clock.current()
    path: list[dict[str, Any]] = []
    error: ChatError | None = None
    for model in dict.fromkeys((plan.model, *plan.fallbacks)):
        allowed, _state = await breaker.acheck_allowed(model=model, now=clk.wall())
        if not allowed:
            path.append({"model": model, "outcome": "circuit_open"})
            error = error or Unavailable(retry_after=settings.CHAT_BREAKER_COOLDOWN_S)
            continue
        try:
            async with queueing.queue_for(model).slot(
                user=owner_key, on_queued=on_queued
            ) as queued:
                attempts = _try_model(model, plan, history, path=path, queued=queued)
                async with contextlib.aclosing(attempts):
                    usage: Usage | None = None
                    announced = False
                    async for event in attempts:
                        if isinstance(event, Usage):
                            # The last event: the outcome goes out before the
                            # attempt's bookkeeping (see _try_model) ends.
                            usage = event
                            yield CallOutcome(
                                model=model, usage=usage, path=path, fallback=model != plan.model
                            )
                            continue
                        if not announced and on_streaming is not None:
                            announced = True
                            on_streaming(
                                CallOutcome(
                                    model=model,
                                    usage=None,
                                    path=path,
                                    fallback=model != plan.model,
                                )
                            )
                        yield event
        except queueing.QueueFull as full:
            path.append({"model": model, "outcome": "queue_full"})
            error = Unavailable(retry_after=full.retry_after)
            continue
        except _NextModel as failed:
            error = failed.error
            continue
        except _Ended as ended:
            yield CallOutcome(
                model=model,
                usage=ended.usage,
                path=path,
                fallback=model != plan.model,
                error=ended.error.code,
            )
            raise ended.error from None
        if usage is None:  # a stream that ended without its usage (never, by _try_model)
            yield CallOutcome(model=model, usage=None, path=path, fallback=model != plan.model)
        return

    if cached_answer is not None:
        text = await cached_answer()
        if text:
            path.append({"model": LAST_RESORT, "outcome": "ok"})
            yield text
            yield CallOutcome(model=plan.model, usage=None, path=path, fallback=True, cached=True)
            return
    error = error or Unavailable()
    yield CallOutcome(model=plan.model, usage=None, path=path, error=error.code)
    raise error


async def _try_model(
    model: str,
    plan: ModelPlan,
    history: list[ChatMessage],
    *,
    path: list[dict[str, Any]],
    queued: bool,
) -> AsyncGenerator[str | Usage, None]:
    """Call one model with retries; yield chunks then one Usage, or raise _NextModel/_Ended."""
    clk = clock.current()
    try:
        provider = provider_for(model)
        _, name = split_model(model)
    except ValueError as exc:
        logger.error("model %s is not usable: %s", model, exc)
        path.append({"model": model, "outcome": "misconfigured"})
        raise _NextModel(Unavailable()) from None
    timeouts = timeouts_for(model)
    options = StreamOptions(model=name, temperature=plan.temperature, max_tokens=plan.max_tokens)
    messages = history
    trimmed = False
    attempt = 0
    waited = 0.0
    while True:
        attempt += 1
        entry: dict[str, Any] = {"model": model}
        if queued:
            entry["queued"] = True
            queued = False
        chars = 0
        usage: Usage | None = None
        total_at = clk.now() + timeouts["total"]
        first_token, idle = timeouts["first_token"], timeouts["idle"]
        stream = cast(AsyncGenerator[Any, None], provider.stream(messages, options))
        dog = clk.watchdog()
        try:
            try:
                async with contextlib.aclosing(stream):
                    iterator = cast(AsyncIterator[Any], stream)
                    while True:
                        at = min(total_at, clk.now() + (idle if chars else first_token))
                        # Armed only while waiting on the vendor, never across a
                        # yield: the deadline must cut the read, not the consumer.
                        dog.arm(at)
                        try:
                            event = await anext(iterator)
                        except StopAsyncIteration:
                            break
                        except asyncio.CancelledError:
                            if dog.expired():
                                which = "idle" if chars else "first_token"
                                raise _DeadlinePassed(
                                    "total" if at == total_at else which
                                ) from None
                            raise
                        finally:
                            dog.disarm()
                        if isinstance(event, Usage):
                            usage = event
                        elif event:
                            chars += len(event)
                            yield event
            finally:
                dog.close()
        except (ProviderError, _DeadlinePassed) as exc:
            failure = _classify(exc)
            entry["outcome"] = failure.kind
            if failure.status is not None:
                entry["status"] = failure.status
            if isinstance(exc, _DeadlinePassed):
                entry["deadline"] = exc.deadline
            if chars:
                entry["delivered"] = True
            path.append(entry)
            state = await breaker.arecord_result(
                model=model, ok=failure.kind in _REQUEST_FAULTS, now=clk.wall()
            )
            if chars:
                # Text already reached the user: end the reply, never restart it.
                error: ChatError = Timeout() if failure.kind == "timeout" else Unavailable()
                raise _Ended(error, estimated_usage(messages, chars)) from None
            if failure.kind == "context_length" and not trimmed:
                shorter = _trim(messages)
                if shorter is not None:
                    messages, trimmed = shorter, True
                    continue
            if (
                failure.retryable
                and state == breaker.CLOSED
                and attempt < settings.CHAT_RETRY_MAX_ATTEMPTS
                and not (isinstance(exc, _DeadlinePassed) and exc.deadline == "total")
            ):
                delay = _backoff(attempt, failure.retry_after)
                if delay is not None and waited + delay <= settings.CHAT_RETRY_TOTAL_WAIT_S:
                    entry["waited_s"] = round(delay, 3)
                    waited += delay
                    await clk.sleep(delay)
                    continue
            raise _NextModel(
                Timeout()
                if failure.kind == "timeout"
                else Unavailable(retry_after=failure.retry_after)
            ) from None
        entry["outcome"] = "ok"
        path.append(entry)
        ended_at = clk.wall()
        try:
            # The text is complete: the caller may show its last words now,
            # while the breaker counts the success (a trip to the shared
            # cache when this process's trust in it has lapsed).
            yield usage if usage is not None else estimated_usage(messages, chars)
        finally:
            try:
                await breaker.arecord_result(model=model, ok=True, now=ended_at)
            except Exception as exc:  # the reply was delivered: bookkeeping must not fail it
                logger.warning(
                    "could not count a success of %s in the breaker: %s", model, type(exc).__name__
                )
        return


class _DeadlinePassed(Exception):
    def __init__(self, deadline: str) -> None:
        super().__init__(f"no token within the {deadline} deadline")
        self.deadline = deadline


def _classify(exc: ProviderError | _DeadlinePassed) -> ProviderError:
    if isinstance(exc, ProviderError):
        logger.info("vendor call failed: %s (%s)", exc.kind, exc)
        return exc
    return ProviderError("timeout", str(exc))


def _backoff(attempt: int, retry_after: float | None) -> float | None:
    """Return how long to wait before the next attempt, or None to stop retrying."""
    if retry_after is not None:
        return retry_after if retry_after <= settings.CHAT_RETRY_AFTER_MAX_S else None
    exponential = settings.CHAT_RETRY_BASE_S * 2 ** (attempt - 1)
    ceiling = min(settings.CHAT_RETRY_MAX_BACKOFF_S, exponential)
    return jitter() * ceiling


def _trim(messages: list[ChatMessage]) -> list[ChatMessage] | None:
    """Return the system prompt and the last message only, or None if that changes nothing."""
    if not messages:
        return None
    shorter = [m for m in messages[:-1] if m.role == "system"] + [messages[-1]]
    return shorter if len(shorter) < len(messages) else None


def estimated_usage(messages: list[ChatMessage], completion_chars: int) -> Usage:
    """Return usage counted here, at ~4 characters a token, for a vendor that gave none."""
    return Usage(
        prompt_tokens=sum(estimate_tokens(m.content) for m in messages),
        completion_tokens=-(-completion_chars // 4),
        estimated=True,
    )
