"""Staff replay: ask a model version a rated reply's question again, from the admin.

It is an entry point for text like any other, so the prompt (which staff may
edit) goes through the same input checker as a user's message, and the
answer through the same call path and output moderation. Nothing is stored
or counted as a user's reply; the answer is shown to staff only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from asgiref.sync import async_to_sync
from django.conf import settings

from chat import selectors
from chat.callpath import CallOutcome, ModelPlan, call_model
from chat.errors import ChatError, Unavailable
from chat.models import Message
from chat.pipeline import check_message_text
from chat.providers import ChatMessage
from chat.safety import moderation
from feedback.versions import ActiveVersion


@dataclass(frozen=True, slots=True)
class ReplayResult:
    text: str
    model: str
    finish_reason: str  # "stop", "length", "moderated" or "error"
    latency_ms: int
    error: str = ""


def reply_replay(*, reply: Message, prompt: object, version: ActiveVersion) -> ReplayResult:
    """Answer `prompt` in the reply's context with `version`; raise InvalidInput for bad text."""
    text = check_message_text(prompt)
    assert reply.reply_to_id is not None
    history = selectors.history_for_model(
        conversation_id=reply.conversation_id,
        upto_message_id=reply.reply_to_id,
        budget_tokens=settings.CHAT_CONTEXT_TOKENS,
        system_prompt=version.system_prompt,
    )
    history[-1] = ChatMessage(role="user", content=text)
    plan = ModelPlan(
        model=version.model,
        fallbacks=version.fallbacks,
        temperature=version.temperature,
        max_tokens=version.max_tokens,
    )
    return async_to_sync(_run)(plan, history)


async def _run(plan: ModelPlan, history: list[ChatMessage]) -> ReplayResult:
    started = time.monotonic()
    parts: list[str] = []
    model = plan.model
    finish = "stop"
    error = ""

    async def not_queued(position: int) -> None:
        return None

    gate = moderation.OutputGate()
    stream = call_model(plan, history, owner_key="staff:replay", on_queued=not_queued)
    try:
        async with asyncio.timeout(settings.CHAT_REPLY_MAX_SECONDS):
            async for event in stream:
                if isinstance(event, CallOutcome):
                    model = event.model
                    if event.usage is not None:
                        finish = event.usage.finish_reason
                    continue
                parts.extend(await gate.feed(event))
            parts.extend(await gate.finish())
    except moderation.Moderated as flagged:
        finish, error = "moderated", f"{flagged.verdict.category} ({flagged.verdict.score:.2f})"
    except ChatError as exc:
        finish, error = "error", exc.user_message
    except TimeoutError:
        finish, error = "error", Unavailable().user_message
    finally:
        await stream.aclose()
    return ReplayResult(
        text="".join(parts),
        model=model,
        finish_reason=finish,
        latency_ms=round((time.monotonic() - started) * 1000),
        error=error,
    )
