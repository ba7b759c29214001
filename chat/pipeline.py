"""The path a chat message takes, top to bottom, in one place.

    chat_accept:  check the input → check the limits → store the user message
                  and a pending reply (before any model is called)
    reply_run:    build the history → call the model → stream deltas to the
                  socket → store the reply exactly once → count it

The consumer calls these two and owns nothing but the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from chat import selectors, services
from chat.errors import ChatError, Forbidden, Internal, InvalidInput, Timeout, Unavailable
from chat.owners import Owner
from chat.providers import ProviderError, StreamOptions, Usage, provider_for
from chat.services import Accepted
from chat.streaming import DeltaSender, Emit

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SendRequest:
    content: object
    client_msg_id: uuid.UUID
    conversation_id: int | None


def check_message_text(text: object) -> str:
    """Return the user's text ready to store, or raise InvalidInput."""
    if not isinstance(text, str):
        raise InvalidInput("The message must be text.")
    if not text.strip():
        raise InvalidInput("Your message is empty. Type something and send it again.")
    limit = settings.CHAT_MAX_INPUT_CHARS
    if len(text) > limit:
        raise InvalidInput(
            f"Your message is {len(text):,} characters long; the limit is {limit:,}. "
            "Shorten it and send it again."
        )
    return text


async def chat_accept(*, owner: Owner | None, request: SendRequest) -> Accepted:
    if owner is None:
        raise Forbidden("Your session has expired. Reload the page to keep chatting.")
    if owner.is_anonymous and not settings.CHAT_ALLOW_ANONYMOUS:
        raise Forbidden("Please sign in to chat.")
    content = check_message_text(request.content)
    return await database_sync_to_async(services.message_accept)(
        owner=owner,
        content=content,
        client_msg_id=request.client_msg_id,
        conversation_id=request.conversation_id,
        model=settings.CHAT_MODEL,
    )


def accepted_frame(accepted: Accepted) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "chat.accepted",
        "client_msg_id": accepted.client_msg_id,
        "conversation": accepted.conversation_id,
        "user_message": accepted.user_message_id,
        "message": accepted.reply_id,
        "model": accepted.model,
    }
    if accepted.duplicate:
        frame["duplicate"] = True
    return frame


class ClientGone(Exception):
    """The socket went away while a frame was being sent."""


async def reply_run(*, accepted: Accepted, emit: Emit, started_at: float) -> None:
    """Generate, stream and store one reply; never raises except CancelledError.

    Cancelling the task (Stop, a disconnect) ends the upstream call at once
    and stores exactly the text that was sent, with finish reason `cancelled`.
    """
    loop = asyncio.get_running_loop()
    model = accepted.model

    async def guarded_emit(frame: dict[str, Any]) -> None:
        try:
            await emit(frame)
        except Exception as exc:
            raise ClientGone() from exc

    sender = DeltaSender(
        emit=guarded_emit,
        message_id=accepted.reply_id,
        window=settings.CHAT_COALESCE_MS / 1000,
        max_chars=settings.CHAT_COALESCE_MAX_CHARS,
    )
    usage: Usage | None = None
    finish_reason = "error"
    error: ChatError | None = None
    cancelled = False
    try:
        history = await database_sync_to_async(selectors.history_for_model)(
            conversation_id=accepted.conversation_id,
            upto_message_id=accepted.user_message_id,
            budget_tokens=settings.CHAT_CONTEXT_TOKENS,
            system_prompt=settings.CHAT_SYSTEM_PROMPT,
        )
        provider = provider_for(model)
        stream = provider.stream(history, StreamOptions(model=model))
        try:
            async for event in stream:
                if isinstance(event, Usage):
                    usage = event
                else:
                    await sender.push(event)
        finally:
            # Closing the generator closes the vendor's HTTP stream now, not at GC.
            await stream.aclose()  # type: ignore[attr-defined]
        await sender.close(deliver=True)
        finish_reason = usage.finish_reason if usage else "stop"
    except asyncio.CancelledError:
        cancelled = True
        finish_reason = "cancelled"
    except ClientGone:
        finish_reason = "cancelled"
    except ProviderError as exc:
        error = Timeout() if exc.kind == "timeout" else Unavailable()
        logger.warning("reply %s: vendor failed (%s)", accepted.reply_id, exc.kind)
    except Exception:
        error = Internal()
        logger.exception("reply %s: unexpected failure", accepted.reply_id)
    finally:
        # Text the model already produced still reaches the user on a failure;
        # on a cancel the user asked for no more.
        with contextlib.suppress(ClientGone):
            await sender.close(deliver=not cancelled and finish_reason != "cancelled")

    now = loop.time()
    ttft_ms = (
        None if sender.first_sent_at is None else round((sender.first_sent_at - started_at) * 1000)
    )
    latency_ms = round((now - started_at) * 1000)
    cost = Decimal("0")
    text = sender.text
    finish = services.reply_finish
    # The store must happen even while this task is being cancelled.
    await asyncio.shield(
        database_sync_to_async(finish)(
            reply_id=accepted.reply_id,
            content=text,
            finish_reason=finish_reason,
            model=model,
            ttft_ms=ttft_ms,
            latency_ms=latency_ms,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            cost_usd=cost,
            error_code=error.code if error else "",
        )
    )
    if cancelled:
        # Tell the client what was kept, then let the cancellation proceed.
        with contextlib.suppress(Exception):
            await emit(done_frame(accepted, finish_reason, usage, ttft_ms, latency_ms, cost))
        raise asyncio.CancelledError()
    with contextlib.suppress(Exception):
        if error is not None:
            await emit(error.frame(client_msg_id=accepted.client_msg_id))
        await emit(done_frame(accepted, finish_reason, usage, ttft_ms, latency_ms, cost))


def done_frame(
    accepted: Accepted,
    finish_reason: str,
    usage: Usage | None,
    ttft_ms: int | None,
    latency_ms: int,
    cost: Decimal,
) -> dict[str, Any]:
    return {
        "type": "chat.done",
        "message": accepted.reply_id,
        "finish_reason": finish_reason,
        "model": accepted.model,
        "cached": False,
        "usage": {
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
        },
        "cost_usd": float(cost),
        "ttft_ms": ttft_ms,
        "latency_ms": latency_ms,
    }
