"""Reads, each with its permission check built in (`access_…` raises NotFound)."""

from __future__ import annotations

from typing import Any

from chat import sql
from chat.errors import InvalidInput, NotFound
from chat.models import Conversation, Message
from chat.owners import Owner
from chat.providers import ChatMessage
from chat.safety.errors import InvalidInput as TextRefused
from chat.safety.input import check_user_text
from chat.tokens import estimate_tokens


def access_conversation(*, owner: Owner, conversation_id: object) -> Conversation:
    """Return the owner's conversation, or raise NotFound for any other id.

    Someone else's conversation and one that does not exist look the same, so
    ids cannot be probed.
    """
    if isinstance(conversation_id, bool) or not isinstance(conversation_id, int):
        raise NotFound()
    conversation = Conversation.objects.filter(
        owner.conversation_filter(), pk=conversation_id
    ).first()
    if conversation is None:
        raise NotFound()
    return conversation


def access_reply(*, owner: Owner, message_id: object) -> Message:
    """Return the owner's assistant reply, or raise NotFound."""
    if isinstance(message_id, bool) or not isinstance(message_id, int):
        raise NotFound("That reply does not exist.")
    reply = (
        Message.objects.filter(
            owner.conversation_filter("conversation__"),
            pk=message_id,
            role=Message.Role.ASSISTANT,
        )
        .select_related("conversation")
        .first()
    )
    if reply is None:
        raise NotFound("That reply does not exist.")
    return reply


def access_user_message(*, owner: Owner, message_id: object) -> Message:
    """Return the owner's visible user message, or raise NotFound."""
    if isinstance(message_id, bool) or not isinstance(message_id, int):
        raise NotFound("That message does not exist.")
    message = (
        Message.objects.filter(
            owner.conversation_filter("conversation__"),
            pk=message_id,
            role=Message.Role.USER,
            superseded_at__isnull=True,
        )
        .select_related("conversation")
        .first()
    )
    if message is None:
        raise NotFound("That message does not exist.")
    return message


def conversation_list(*, owner: Owner, limit: int = 100) -> list[dict[str, Any]]:
    rows = (
        Conversation.objects.filter(owner.conversation_filter())
        .order_by("-updated_at")
        .values("id", "title", "updated_at")[:limit]
    )
    return [
        {
            "id": r["id"],
            "title": r["title"] or "New chat",
            "updated_at": r["updated_at"].isoformat(),
        }
        for r in rows
    ]


def conversation_messages(*, owner: Owner, conversation_id: object) -> list[dict[str, Any]]:
    conversation = access_conversation(owner=owner, conversation_id=conversation_id)
    rows = (
        conversation.messages.filter(superseded_at__isnull=True)
        .order_by("id")
        .values(
            "id",
            "role",
            "content",
            "status",
            "finish_reason",
            "model",
            "error_code",
            "reply_to_id",
            "created_at",
        )
    )
    return [
        {
            "id": r["id"],
            "role": r["role"],
            "content": r["content"],
            "status": r["status"],
            "finish_reason": r["finish_reason"],
            "model": r["model"],
            "error_code": r["error_code"],
            "reply_to": r["reply_to_id"],
            "created_at": r["created_at"].isoformat(),
        }
        for r in rows
    ]


# Runs for every message: built once (chat/sql.py).
_history_rows = sql.Select(
    Message,
    "SELECT {role}, {content} FROM {table} WHERE {conversation} = %s AND {id} <= %s"
    " AND {superseded_at} IS NULL AND NOT ({role} = %s AND {content} = '')"
    " ORDER BY {id} DESC LIMIT 200",
)


def history_for_model(
    *, conversation_id: int, upto_message_id: int, budget_tokens: int, system_prompt: str = ""
) -> list[ChatMessage]:
    """Return the conversation up to a user message, newest kept, within a budget.

    Failed or empty replies are left out: the model should not see its own
    error placeholders. The newest user message is always kept.
    """
    rows = _history_rows.rows([conversation_id, upto_message_id, Message.Role.ASSISTANT])
    used = estimate_tokens(system_prompt)
    taken = 0
    for _role, content in rows:
        cost = (len(content) + 3) // 4  # estimate_tokens, inlined: up to 200 rows a message
        if taken and used + cost > budget_tokens:
            break
        taken += 1
        used += cost
    # The rows are (role, content), and a role is "user" or "assistant".
    kept = list(map(ChatMessage._make, reversed(rows[:taken])))
    if system_prompt:
        kept.insert(0, ChatMessage(role="system", content=system_prompt))
    return kept


def done_frame_for(reply: Message) -> dict[str, Any]:
    """Return the `chat.done` frame for a finished reply, from what is stored."""
    return {
        "type": "chat.done",
        "message": reply.pk,
        "finish_reason": reply.finish_reason,
        "model": reply.model,
        "cached": reply.cached,
        "usage": {
            "prompt_tokens": reply.prompt_tokens or 0,
            "completion_tokens": reply.completion_tokens or 0,
        },
        "cost_usd": float(reply.cost_usd),
        "ttft_ms": reply.ttft_ms,
        "latency_ms": reply.latency_ms,
    }


# The page's search box holds this many characters; a longer query is cut.
SEARCH_MAX_CHARS = 200


def conversation_search(*, owner: Owner, query: str = "", limit: int = 100) -> list[dict[str, Any]]:
    """Return the owner's conversations, newest first, matching `query` if given.

    A conversation matches when its title or one of its visible messages
    contains the query (case-insensitive). `titled` tells the page whether the
    background titler has run yet, so it knows to look again shortly. Raise
    InvalidInput for a query the input checker refuses (`_check_search_text`).
    """
    from django.db.models import Q

    conversations = Conversation.objects.filter(owner.conversation_filter())
    query = _check_search_text(query)
    if query:
        conversations = conversations.filter(
            Q(title__icontains=query)
            | Q(messages__content__icontains=query, messages__superseded_at__isnull=True)
        ).distinct()
    rows = conversations.order_by("-updated_at", "-id").values("id", "title", "updated_at")[:limit]
    return [
        {
            "id": r["id"],
            "title": r["title"] or "New chat",
            "titled": bool(r["title"]),
            "updated_at": r["updated_at"].isoformat(),
        }
        for r in rows
    ]


def _check_search_text(query: str) -> str:
    """Return the query cleaned the way stored text was, or "" for no query.

    What people type is stored as `check_user_text` cleaned it, so the query
    is cleaned the same way: "é" typed decomposed still finds "é" stored
    composed. What the checker refuses (a NUL, other control characters,
    text-direction controls) is refused here too, with the same sentence:
    a NUL would otherwise break the query itself (PostgreSQL refuses it in
    a text parameter; SQLite cuts the pattern there and matches everything).
    A query of only spaces or invisible characters is no query.
    """
    if not query.strip():
        return ""
    try:
        # No length refusal: a long query is cut below, as it always was.
        checked = check_user_text(query, max_chars=len(query), field="search")
    except TextRefused as exc:
        if exc.reason in ("empty", "blank"):
            return ""
        raise InvalidInput(exc.user_message) from None
    return " ".join(checked.split())[:SEARCH_MAX_CHARS]


def reply_fallbacks(*, owner: Owner, message_ids: list[int]) -> set[int]:
    """Return which of the owner's replies were answered by a fallback model.

    A reply is a fallback answer when an earlier attempt in its call path
    used another model than the one that answered.
    """
    rows = Message.objects.filter(
        owner.conversation_filter("conversation__"),
        id__in=message_ids,
        role=Message.Role.ASSISTANT,
    ).values_list("id", "model", "call_path")
    fallbacks = set()
    for message_id, model, call_path in rows:
        tried = [step.get("model") for step in call_path or [] if isinstance(step, dict)]
        if any(other and other != model for other in tried):
            fallbacks.add(message_id)
    return fallbacks
