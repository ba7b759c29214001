"""A person's own data: a copy of it (access, portability) and erasing it (the account).

Exports are produced page by page, a few hundred rows per query and no
cursor held open between pages, so an account of any size streams in
bounded memory. They hold what the person wrote and was shown, and their
ratings; nothing staff-only (staff notes, review state, injection scores,
moderation verdicts, call paths, model versions) ever goes in.
Deleting an account follows the retention job's rule for its conversations
(`monitoring.services.conversations_retire`), so the dashboards stay as
consistent as they do when conversations expire.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from chat.errors import InvalidInput
from chat.models import Conversation, Message
from chat.owners import Owner
from chat.selectors import access_conversation
from feedback.models import Feedback
from feedback.services import feedback_owner_key

logger = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
# Rows per query. A page of messages is held in memory while it is written;
# a reply is at most a model's max tokens, so a page stays a few MB at worst.
PAGE_ROWS = 500

_MESSAGE_FIELDS = (
    "id",
    "conversation_id",
    "role",
    "content",
    "status",
    "finish_reason",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "created_at",
)


@dataclass(frozen=True, slots=True)
class Export:
    """A download: its file name, its content type and its text, in chunks."""

    file_name: str
    content_type: str
    chunks: Iterator[str]


class WrongPassword(InvalidInput):
    def __init__(self) -> None:
        super().__init__("That password is not right. Your account has not been deleted.")


# --- exports ------------------------------------------------------------------------


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _message_record(row: dict[str, Any], feedback: dict[str, Any] | None) -> dict[str, Any]:
    """Return one visible message as the person may see it.

    Tokens and cost are theirs to see: every reply's `chat.done` frame has
    already sent them to their browser.
    """
    record: dict[str, Any] = {
        "id": row["id"],
        "role": row["role"],
        "text": row["content"],
        "created_at": _iso(row["created_at"]),
    }
    if row["role"] == Message.Role.ASSISTANT:
        record["model"] = row["model"]
        # A reply still being written has no finish reason yet.
        record["finish_reason"] = row["finish_reason"] or None
        record["usage"] = {
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
        }
        record["cost_usd"] = str(row["cost_usd"] or Decimal("0"))
        record["feedback"] = feedback
    return record


def _feedback_record(rating: int | None, reasons: list[str], comment: str) -> dict[str, Any]:
    return {"rating": rating, "reasons": list(reasons or []), "comment": comment}


def _visible_messages(
    *, owner: Owner, conversation_ids: list[int]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (conversation id, message record) for these conversations' visible messages.

    In conversation then message order, one page of rows per query (keyset
    on the `msg_history` index), each reply with the owner's rating of it.
    """
    key = feedback_owner_key(owner)
    after_conversation, after_id = 0, 0
    while True:
        rows = list(
            Message.objects.filter(conversation_id__in=conversation_ids, superseded_at__isnull=True)
            .filter(
                Q(conversation_id__gt=after_conversation)
                | Q(conversation_id=after_conversation, id__gt=after_id)
            )
            .order_by("conversation_id", "id")
            .values(*_MESSAGE_FIELDS)[:PAGE_ROWS]
        )
        if not rows:
            return
        ratings = {
            message_id: _feedback_record(rating, reasons, comment)
            for message_id, rating, reasons, comment in Feedback.objects.filter(
                owner_key=key, message_id__in=[r["id"] for r in rows]
            ).values_list("message_id", "rating", "reasons", "comment")
        }
        for row in rows:
            yield row["conversation_id"], _message_record(row, ratings.get(row["id"]))
        after_conversation, after_id = rows[-1]["conversation_id"], rows[-1]["id"]


def _conversation_head(conversation: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": conversation["id"],
        "title": conversation["title"] or "New chat",
        "created_at": _iso(conversation["created_at"]),
        "updated_at": _iso(conversation["updated_at"]),
    }


def _conversations_json(owner: Owner, conversations: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Yield JSON objects of conversations, comma-separated, each with its visible messages.

    `conversations` come oldest first (by id); they are read a page at a
    time, with one query a page for their messages.
    """
    first = True
    for page in _pages(conversations):
        page.sort(key=lambda c: c["id"])
        messages = _visible_messages(owner=owner, conversation_ids=[c["id"] for c in page])
        waiting = next(messages, None)
        parts: list[str] = []
        for conversation in page:
            head = _dumps({**_conversation_head(conversation), "messages": []})
            parts.append(("" if first else ", ") + head[:-2])  # open: without "]}"
            first = False
            first_message = True
            while waiting is not None and waiting[0] == conversation["id"]:
                parts.append(("" if first_message else ", ") + _dumps(waiting[1]))
                first_message = False
                waiting = next(messages, None)
                if len(parts) >= PAGE_ROWS:
                    yield "".join(parts)
                    parts = []
            parts.append("]}")
        yield "".join(parts)


def _pages(rows: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    page: list[dict[str, Any]] = []
    for row in rows:
        page.append(row)
        if len(page) == PAGE_ROWS:
            yield page
            page = []
    if page:
        yield page


def _owner_conversations(owner: Owner) -> Iterator[dict[str, Any]]:
    """Yield the owner's conversations, oldest first, one page per query."""
    after = 0
    while True:
        rows: list[dict[str, Any]] = [
            dict(row)
            for row in Conversation.objects.filter(owner.conversation_filter(), pk__gt=after)
            .order_by("pk")
            .values("id", "title", "created_at", "updated_at")[:PAGE_ROWS]
        ]
        yield from rows
        if len(rows) < PAGE_ROWS:
            return
        after = rows[-1]["id"]


def _owner_feedback(owner: Owner) -> Iterator[str]:
    """Yield the owner's ratings as JSON array items, one page per query."""
    key = feedback_owner_key(owner)
    after = 0
    first = True
    while True:
        rows = list(
            Feedback.objects.filter(owner_key=key, pk__gt=after)
            .order_by("pk")
            .values_list(
                "pk",
                "message_id",
                "message__conversation_id",
                "rating",
                "reasons",
                "comment",
                "created_at",
                "updated_at",
            )[:PAGE_ROWS]
        )
        parts = []
        for _pk, message_id, conversation_id, rating, reasons, comment, created, updated in rows:
            record = {
                "message": message_id,
                "conversation": conversation_id,
                **_feedback_record(rating, reasons, comment),
                "created_at": _iso(created),
                "updated_at": _iso(updated),
            }
            parts.append(("" if first else ", ") + _dumps(record))
            first = False
        if parts:
            yield "".join(parts)
        if len(rows) < PAGE_ROWS:
            return
        after = rows[-1][0]


def conversation_export(*, owner: Owner, conversation_id: object, format: str) -> Export:
    """Return one of the owner's conversations as Markdown ("md") or JSON ("json").

    Raise NotFound for anyone else's conversation, as for a missing one;
    InvalidInput for another format. The conversation is looked up now, so
    a refusal comes before any byte of the download.
    """
    if format not in ("md", "json"):
        raise InvalidInput('The format must be "md" (Markdown) or "json".')
    conversation = access_conversation(owner=owner, conversation_id=conversation_id)
    head = {
        "id": conversation.pk,
        "title": conversation.title,
        "created_at": conversation.created_at,
        "updated_at": conversation.updated_at,
    }
    name = f"conversation-{conversation.pk}.{format}"
    if format == "md":
        return Export(name, "text/markdown; charset=utf-8", _markdown(owner, head))
    return Export(name, "application/json", _conversation_json(owner, head))


def _conversation_json(owner: Owner, head: dict[str, Any]) -> Iterator[str]:
    exported_at = _dumps(_iso(timezone.now()))
    yield (
        f'{{"format": "chat-conversation", "version": {EXPORT_FORMAT_VERSION}, '
        f'"exported_at": {exported_at}, "conversation": '
    )
    yield from _conversations_json(owner, [head])
    yield "}\n"


_MARKDOWN_FINISH = {
    Message.FinishReason.LENGTH: "cut off at the length limit",
    Message.FinishReason.CANCELLED: "stopped",
    Message.FinishReason.MODERATED: "withheld by moderation",
    Message.FinishReason.ERROR: "failed",
}


def _markdown(owner: Owner, head: dict[str, Any]) -> Iterator[str]:
    title = head["title"] or "New chat"
    yield (
        f"# {title}\n\n"
        f"Exported {timezone.now():%Y-%m-%d %H:%M} UTC. "
        f"Started {head['created_at']:%Y-%m-%d %H:%M} UTC.\n"
    )
    parts: list[str] = []
    for _, record in _visible_messages(owner=owner, conversation_ids=[head["id"]]):
        when = dt.datetime.fromisoformat(record["created_at"])
        if record["role"] == Message.Role.USER:
            heading = "You"
        else:
            heading = f"Assistant ({record['model']})" if record["model"] else "Assistant"
            note = _MARKDOWN_FINISH.get(record["finish_reason"])
            if record["finish_reason"] is None:
                note = "still being written"
            if note:
                heading += f", {note}"
        parts.append(f"\n## {heading} · {when:%Y-%m-%d %H:%M} UTC\n\n{record['text']}\n")
        if len(parts) >= PAGE_ROWS:
            yield "".join(parts)
            parts = []
    yield "".join(parts)


def account_export(*, owner: Owner) -> Export:
    """Return everything the owner has here as one JSON file, in chunks.

    A signed-in user: their account, conversations and ratings. An
    anonymous visitor: the conversations and ratings of this browser session.
    """
    stamp = timezone.now()
    return Export(
        f"chat-data-{stamp:%Y%m%d-%H%M%S}.json", "application/json", _account_json(owner, stamp)
    )


def _account_json(owner: Owner, stamp: dt.datetime) -> Iterator[str]:
    account = None
    if owner.user_id is not None:
        user = get_user_model().objects.get(pk=owner.user_id)
        account = {
            "username": user.get_username(),
            "email": getattr(user, "email", ""),
            "date_joined": _iso(getattr(user, "date_joined", None)),
        }
    yield (
        f'{{"format": "chat-account", "version": {EXPORT_FORMAT_VERSION}, '
        f'"exported_at": {_dumps(_iso(stamp))}, "account": {_dumps(account)}, "conversations": '
    )
    yield "["
    yield from _conversations_json(owner, _owner_conversations(owner))
    yield '], "feedback": ['
    yield from _owner_feedback(owner)
    yield "]}\n"


# --- deletion -----------------------------------------------------------------------


def check_account_password(*, user: AbstractBaseUser, password: object) -> None:
    """Raise WrongPassword unless `password` is the user's password."""
    if not isinstance(password, str) or not password or not user.check_password(password):
        raise WrongPassword()


@dataclass(frozen=True, slots=True)
class Deleted:
    conversations: int
    mode: str


def account_delete(*, user_id: int) -> Deleted:
    """Erase a user's account with their conversations, messages and ratings.

    All of it in one transaction: a failure leaves the account as it was.
    Conversations go by the retention job's rule (MONITORING_RETENTION_MODE):
    `delete` deletes them; `anonymise` keeps their numbers (tokens, cost,
    latency, ratings and reasons) for the dashboards, with no text and no
    owner. Either way the user's per-day spend rows (the dashboard's top
    users) are left as a rebuild would make them: folded into "anonymous"
    (user 0) or gone. Hourly rollups name no one and stay.

    A reply still streaming cannot write its text back afterwards: its row
    is gone, or (anonymise) finished here as stopped, and a reply's final
    store only updates a pending row.
    """
    from chat.replay import hub
    from monitoring.models import DailyUserSpend
    from monitoring.services import conversations_retire

    users = get_user_model()
    mode = settings.MONITORING_RETENTION_MODE
    # The account and everything it owns go together, or none of it.
    with transaction.atomic():
        # Locks the row: a second request (a double click) waits, then finds nothing.
        user = users.objects.select_for_update().filter(pk=user_id).first()
        if user is None:
            return Deleted(conversations=0, mode=mode)
        ids = list(Conversation.objects.filter(user_id=user_id).values_list("pk", flat=True))
        pending = Message.objects.filter(conversation_id__in=ids, status=Message.Status.PENDING)
        # Replies still being written are stopped once the deletion is saved,
        # as when one conversation is deleted: the model must not go on
        # writing (and billing) text for an account that is gone.
        running = list(pending.filter(role=Message.Role.ASSISTANT).values_list("pk", flat=True))
        if running:
            transaction.on_commit(lambda: hub.stop_from_thread(running), robust=True)
        pending.update(
            status=Message.Status.FINISHED,
            finish_reason=Message.FinishReason.CANCELLED,
            finished_at=timezone.now(),
        )
        for start in range(0, len(ids), PAGE_ROWS):
            conversations_retire(conversation_ids=ids[start : start + PAGE_ROWS])
        # Ratings are only ever given in one's own conversations; any left
        # (none, unless rows were moved by hand) go the same way.
        Feedback.objects.filter(Q(user_id=user_id) | Q(owner_key=f"u:{user_id}")).delete()
        spend = DailyUserSpend.objects.filter(user_id=user_id)
        if mode == "anonymise":
            for row in spend:
                anonymous, _ = DailyUserSpend.objects.select_for_update().get_or_create(
                    day=row.day, user_id=0
                )
                DailyUserSpend.objects.filter(pk=anonymous.pk).update(
                    replies=F("replies") + row.replies,
                    tokens=F("tokens") + row.tokens,
                    cost_usd=F("cost_usd") + row.cost_usd,
                )
        spend.delete()
        user.delete()
    logger.info("account %s deleted with %d conversation(s), %s", user_id, len(ids), mode)
    return Deleted(conversations=len(ids), mode=mode)
