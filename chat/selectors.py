"""Reads, each with its permission check built in (`access_…` raises NotFound)."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
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

# Conversations a page of the list holds (what the whole list held before
# paging, so a client that never asks for more sees what it always saw).
CONVERSATION_PAGE_SIZE = 100


def conversation_search(
    *,
    owner: Owner,
    query: str = "",
    cursor: str = "",
    limit: int = CONVERSATION_PAGE_SIZE,
) -> dict[str, Any]:
    """Return a page of the owner's conversations, newest first, matching `query` if given.

    A conversation matches when its title or one of its visible messages
    contains the query (case-insensitive). `titled` tells the page whether the
    background titler has run yet, so it knows to look again shortly.

    The list is ordered by (updated_at, id), newest first, and paged by key:
    `next` is an opaque cursor for the page after this one (None on the last
    page), and `cursor` asks for the page after the one that gave it. A
    cursor is a position, not a snapshot, so a walk through the pages never
    repeats or skips a conversation that stays put: one created or updated
    meanwhile moves to the top, ahead of every cursor, where the first page
    shows it. The owner filter applies to every page, so a cursor carries no
    one else's data. Raise InvalidInput for a query the input checker
    refuses (`_check_search_text`) or a cursor this function did not make.
    """
    from django.db.models import Q

    conversations = Conversation.objects.filter(owner.conversation_filter())
    after = _check_list_cursor(cursor)
    query = _check_search_text(query)
    if after is not None:
        updated_at, pk = after
        conversations = conversations.filter(
            Q(updated_at__lt=updated_at) | Q(updated_at=updated_at, id__lt=pk)
        )
    if query:
        conversations = conversations.filter(
            Q(title__icontains=query)
            | Q(messages__content__icontains=query, messages__superseded_at__isnull=True)
        ).distinct()
    # One more than a page tells whether there is a next one.
    rows = list(
        conversations.order_by("-updated_at", "-id").values("id", "title", "updated_at")[
            : limit + 1
        ]
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "conversations": [
            {
                "id": r["id"],
                "title": r["title"] or "New chat",
                "titled": bool(r["title"]),
                "updated_at": r["updated_at"].isoformat(),
            }
            for r in rows
        ],
        "next": _list_cursor(rows[-1]["updated_at"], rows[-1]["id"]) if more else None,
    }


# A cursor is "<microseconds since the epoch>:<id>" in URL-safe base64: opaque
# to clients (they pass it back as it came), exact to the microsecond stored.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_LATEST = datetime(9999, 12, 31, tzinfo=UTC)
_CURSOR_MAX_CHARS = 64
_MAX_ID = 2**63 - 1  # a bigint: a larger id would be a database error, not an empty page


def _list_cursor(updated_at: datetime, pk: int) -> str:
    micros = (updated_at - _EPOCH) // _MICROSECOND
    return base64.urlsafe_b64encode(f"{micros}:{pk}".encode()).decode().rstrip("=")


def _check_list_cursor(cursor: str) -> tuple[datetime, int] | None:
    """Return the (updated_at, id) a cursor from `_list_cursor` holds, None for no cursor.

    The cursor comes from the query string, so anything may arrive: what
    `_list_cursor` cannot have made raises InvalidInput (a 400), never reaches
    the database as a value it would refuse (an id past bigint, a year past
    9999), and never becomes a 500.
    """
    if not cursor:
        return None
    refused = InvalidInput("That list position is not valid. Reload the list and try again.")
    if len(cursor) > _CURSOR_MAX_CHARS or not re.fullmatch(r"[A-Za-z0-9_-]+", cursor):
        raise refused
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise refused from None
    match = re.fullmatch(r"(0|[1-9][0-9]{0,17}):([1-9][0-9]{0,18})", raw)
    if match is None:
        raise refused
    micros, pk = int(match[1]), int(match[2])
    if pk > _MAX_ID or micros > (_LATEST - _EPOCH) // _MICROSECOND:
        raise refused
    return _EPOCH + micros * _MICROSECOND, pk


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
