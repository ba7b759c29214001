"""Anthropic's Messages API behind the Provider interface.

The official SDK sends the request and decodes the event stream (about 24 µs per event,
cheap enough to keep, unlike the OpenAI SDK's chunk models); SDK retries are off because
the call path retries in one place. The SDK constructs events without validating them, so
every field read here is checked, and a stream must end with `message_stop` to count as
complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Literal, TypeVar

import anthropic
import httpx2
from anthropic import AsyncAnthropic, omit
from anthropic.types import MessageParam

from chat.providers.base import (
    ChatMessage,
    ProviderError,
    StreamEvent,
    StreamOptions,
    Usage,
    estimate_tokens,
    kind_for_status,
    parse_retry_after,
    says_out_of_memory,
)

__all__ = ["AnthropicProvider"]

_T = TypeVar("_T")

_PLACEHOLDER_KEY = "not-set"

_CONTEXT_HINTS = ("prompt is too long", "exceed context limit", "context window", "context length")
_POLICY_HINTS = ("content filtering policy", "content policy", "usage policy")
# Anthropic's error `type` → our kind, for errors that arrive as events inside a 200 stream.
_ERROR_TYPES = {
    "overloaded_error": "server",
    "api_error": "server",
    "timeout_error": "timeout",
    "rate_limit_error": "rate_limited",
    "authentication_error": "auth",
    "permission_error": "auth",
    "billing_error": "auth",
    "not_found_error": "not_found",
    "request_too_large": "context_length",
    "invalid_request_error": "bad_request",
}
_LENGTH_STOPS = frozenset({"max_tokens", "model_context_window_exceeded"})


class AnthropicProvider:
    """Stream replies from Anthropic's Messages API.

    System messages go to the `system` parameter. Consume `stream()` with
    `contextlib.aclosing` (or cancel the task awaiting it): closing the generator closes the
    upstream HTTP response at once.
    """

    name = "anthropic"

    def __init__(
        self,
        *,
        model: str,
        api_key: str | None = None,
        base_url: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        default_max_tokens: int = 4096,
    ) -> None:
        self.model = model
        # Always pass a key: without one the SDK hunts for credentials in the environment
        # and in profile files on disk, and an empty one makes an illegal header. A missing
        # key then surfaces as the vendor's 401 ("auth").
        self._api_key = api_key or _PLACEHOLDER_KEY
        self._base_url = base_url
        # The API requires max_tokens on every request.
        self.default_max_tokens = default_max_tokens
        # The SDK speaks httpx2 and rejects httpx.Timeout objects, so use its own export.
        self._timeout = anthropic.Timeout(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
        )
        self._client: AsyncAnthropic | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def _get_client(self) -> AsyncAnthropic:
        # Pooled connections belong to the loop that opened them; a worker that runs each
        # job in a fresh loop (asyncio.run) must not reuse them.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = AsyncAnthropic(
                api_key=self._api_key,
                base_url=self._base_url,
                max_retries=0,
                timeout=self._timeout,
            )
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        """Close pooled connections."""
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            await client.close()

    async def stream(
        self, messages: list[ChatMessage], options: StreamOptions
    ) -> AsyncIterator[StreamEvent]:
        """Yield text chunks, then one `Usage`; raise `ProviderError` on any failure."""
        client = self._get_client()
        system, turns = _to_anthropic(messages)
        completion_chars = 0
        input_tokens: int | None = None
        output_tokens: int | None = None
        stop_reason: str | None = None
        saw_event = stopped = False
        extra: dict[str, object] = {}
        if options.temperature is not None:
            # This SDK's `messages.create` has no `temperature` argument; the API field is
            # sent as a body extra instead.
            extra["temperature"] = options.temperature
        extra.update(options.extra)
        try:
            events = await client.messages.create(
                model=options.model or self.model,
                max_tokens=options.max_tokens or self.default_max_tokens,
                messages=turns,
                system=system if system else omit,
                stream=True,
                extra_body=extra or None,
            )
            try:
                iterator = events.__aiter__()
                while True:
                    try:
                        event = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                    except (ValueError, AttributeError, TypeError, KeyError) as exc:
                        # The SDK's own parsing failed: not JSON, or not the expected shape.
                        raise _malformed(type(exc).__name__) from exc
                    saw_event = True
                    kind = getattr(event, "type", None)
                    if not isinstance(kind, str):
                        raise _malformed("an event has no type")
                    if kind == "content_block_delta":
                        text = _delta_text(event)
                        if text:
                            completion_chars += len(text)
                            yield text
                    elif kind == "message_start":
                        usage = getattr(getattr(event, "message", None), "usage", None)
                        input_tokens = _input_tokens(usage)
                    elif kind == "message_delta":
                        # message_delta's counts are cumulative and win when present.
                        usage = getattr(event, "usage", None)
                        output_tokens = _first(_count(usage, "output_tokens"), output_tokens)
                        input_tokens = _first(_input_tokens(usage), input_tokens)
                        stop_reason = _first(_stop_reason(event), stop_reason)
                        if stop_reason == "refusal":
                            raise ProviderError(
                                "content_policy", "Anthropic stopped the reply: refusal"
                            )
                    elif kind == "message_stop":
                        stopped = True
                    # content_block_start/stop, ping and future event types carry no text.
            finally:
                await events.close()
        except ProviderError:
            raise
        except (anthropic.AnthropicError, httpx2.HTTPError) as exc:
            raise _classify(exc) from exc

        if not stopped:
            if not saw_event:
                raise ProviderError("malformed", "Anthropic sent an empty stream (no events)")
            # Events arrived but no message_stop: treat like a cut socket.
            raise ProviderError("connect", "Anthropic stream ended before it finished")
        reason: Literal["stop", "length"] = "length" if stop_reason in _LENGTH_STOPS else "stop"
        yield Usage(
            prompt_tokens=(
                input_tokens
                if input_tokens is not None
                else estimate_tokens(sum(len(m.content) for m in messages))
            ),
            completion_tokens=(
                output_tokens if output_tokens is not None else estimate_tokens(completion_chars)
            ),
            estimated=input_tokens is None or output_tokens is None,
            finish_reason=reason,
        )


def _to_anthropic(messages: list[ChatMessage]) -> tuple[str, list[MessageParam]]:
    """Split out the system prompt; merge same-role neighbours and drop empty turns.

    The API rejects empty text blocks, and a stored reply that failed before its first
    token has empty content.
    """
    system: list[str] = []
    turns: list[tuple[Literal["user", "assistant"], str]] = []
    for message in messages:
        if not message.content:
            continue
        if message.role == "system":
            system.append(message.content)
        elif turns and turns[-1][0] == message.role:
            turns[-1] = (message.role, f"{turns[-1][1]}\n\n{message.content}")
        else:
            turns.append((message.role, message.content))
    return "\n\n".join(system), [_turn(role, text) for role, text in turns]


def _turn(role: Literal["user", "assistant"], text: str) -> MessageParam:
    if role == "user":
        return {"role": "user", "content": text}
    return {"role": "assistant", "content": text}


def _malformed(detail: str) -> ProviderError:
    return ProviderError("malformed", f"Anthropic sent a malformed stream: {detail}")


def _delta_text(event: object) -> str:
    delta = getattr(event, "delta", None)
    delta_type = getattr(delta, "type", None)
    if not isinstance(delta_type, str):
        raise _malformed("a content delta has no type")
    if delta_type != "text_delta":
        return ""  # thinking, tool input, citations and signatures are not reply text
    text = getattr(delta, "text", None)
    if not isinstance(text, str):
        raise _malformed("text_delta.text is not a string")
    return text


def _stop_reason(event: object) -> str | None:
    reason = getattr(getattr(event, "delta", None), "stop_reason", None)
    if reason is not None and not isinstance(reason, str):
        raise _malformed("stop_reason is not a string")
    return reason


def _first(value: _T | None, previous: _T | None) -> _T | None:
    return value if value is not None else previous


def _count(usage: object, field: str) -> int | None:
    value = getattr(usage, field, None)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _malformed(f"usage.{field} is not a count")
    return value


def _input_tokens(usage: object) -> int | None:
    """Return all input tokens: uncached plus cache writes plus cache reads."""
    base = _count(usage, "input_tokens")
    if base is None:
        return None
    cached = (_count(usage, "cache_creation_input_tokens") or 0) + (
        _count(usage, "cache_read_input_tokens") or 0
    )
    return base + cached


# --------------------------------------------------------------------------- errors


def _classify(exc: Exception) -> ProviderError:
    """Map an SDK or transport exception to a `ProviderError`."""
    if isinstance(exc, anthropic.APIStatusError):
        return _from_status_error(exc)
    # The SDK wraps transport errors while sending, but not while reading the stream.
    if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
        return ProviderError("timeout", "Anthropic timed out")
    if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
        return ProviderError("connect", f"Anthropic connection failed: {type(exc).__name__}")
    if isinstance(exc, anthropic.APIResponseValidationError | httpx2.DecodingError):
        return _malformed(type(exc).__name__)
    if isinstance(exc, anthropic.CredentialsError):
        return ProviderError("auth", f"Anthropic credentials: {exc}")
    if isinstance(exc, httpx2.HTTPError):
        return ProviderError("connect", f"Anthropic request failed: {type(exc).__name__}")
    # Remaining SDK errors are configuration problems (arguments, client setup).
    return ProviderError("bad_request", f"Anthropic client error: {exc}")


def _from_status_error(exc: anthropic.APIStatusError) -> ProviderError:
    error = exc.body.get("error") if isinstance(exc.body, dict) else None
    fields = error if isinstance(error, dict) else {}
    err_type = str(fields.get("type") or "")
    message = str(fields.get("message") or exc.message)
    text = message.lower()
    # An `error` event inside a 200 stream: the status says nothing, the type says it all.
    status = exc.status_code if exc.status_code >= 400 else None
    client_error = status is None or 400 <= status < 500

    kind: str
    if client_error and any(h in text for h in _CONTEXT_HINTS):
        kind = "context_length"
    elif client_error and any(h in text for h in _POLICY_HINTS):
        kind = "content_policy"
    elif client_error and says_out_of_memory(text):
        kind = "server"
    elif status is None:
        kind = _ERROR_TYPES.get(err_type, "server")
    else:
        kind = kind_for_status(status)
    prefix = f"Anthropic {status}" if status is not None else "Anthropic stream error"
    return ProviderError(
        kind,
        f"{prefix}: {message}"[:500],
        status=status,
        retry_after=parse_retry_after(exc.response.headers),
    )
