"""Writes. Each function is one short transaction, safe to call from async code
through `database_sync_to_async`, and never wraps a network call."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from chat import sql
from chat.callpath import ModelPlan
from chat.errors import InvalidInput, NotFound
from chat.models import Conversation, Message
from chat.owners import Owner
from chat.selectors import access_conversation, access_reply, access_user_message

if TYPE_CHECKING:
    from chat.safety.limits import Reservation
    from feedback.versions import ActiveVersion

logger = logging.getLogger(__name__)

TITLE_WORDS = 8


@dataclass(frozen=True, slots=True)
class Accepted:
    conversation_id: int
    user_message_id: int
    reply_id: int
    model: str
    client_msg_id: str
    conversation_created: bool
    owner_key: str
    plan: ModelPlan
    plan_system_prompt: str = ""
    version_id: int | None = None
    # True when this client_msg_id was seen before: nothing new was written.
    duplicate: bool = False
    # True for a regenerated reply: the user wants a new answer, not the cache's.
    bypass_cache: bool = False
    reservation: Reservation | None = None


def message_accept(
    *,
    owner: Owner,
    content: str,
    client_msg_id: uuid.UUID,
    conversation_id: int | None,
    version_for: Callable[..., ActiveVersion],
    injection_score: float | None = None,
    injection_signals: list[str] | None = None,
    edit_id: int | None = None,
) -> Accepted:
    """Store the user message and a pending reply, or find them if already stored.

    A client that retries a send with the same `client_msg_id` gets the first
    send's ids back and no second reply. With `edit_id`, that earlier user
    message and everything after it leave the visible history first (the rows
    and their feedback stay): editing replaces, it does not branch.
    """
    # A retried send trips the unique (owner_key, client_msg_id) constraint
    # and gets the first send's ids below; a first send pays no lookup.
    try:
        # The user message and its pending reply exist together or not at all.
        with transaction.atomic():
            if edit_id is not None:
                edited = access_user_message(owner=owner, message_id=edit_id)
                conversation = edited.conversation
                _check_nothing_pending(conversation)
                conversation.messages.filter(id__gte=edited.pk, superseded_at__isnull=True).update(
                    superseded_at=timezone.now()
                )
                conversation.save(update_fields=["updated_at"])
                conversation_pk, created = conversation.pk, False
            elif conversation_id is None:
                conversation_pk = _insert_conversation.run(
                    user_id=owner.user_id,
                    session_key="" if owner.user_id is not None else owner.session_key,
                )
                created = True
            else:
                # Checks the owner and bumps updated_at (the list shows the
                # active chat first) in one statement.
                _conversation_touch(owner=owner, conversation_id=conversation_id)
                conversation_pk, created = conversation_id, False
            user_message_id = _insert_message.run(
                conversation_id=conversation_pk,
                role=Message.Role.USER,
                content=content,
                owner_key=owner.key,
                client_msg_id=client_msg_id,
                injection_score=injection_score,
                injection_signals=injection_signals or [],
            )
            version = version_for(conversation_id=conversation_pk)
            reply_id = _insert_message.run(
                conversation_id=conversation_pk,
                role=Message.Role.ASSISTANT,
                status=Message.Status.PENDING,
                reply_to_id=user_message_id,
                model=version.model,
                version_id=version.version_id,
            )
            if created:
                transaction.on_commit(lambda: _title_later(conversation_pk), robust=True)
    except IntegrityError:
        # A retry of an earlier send (or two sends with the same id racing).
        existing = _accepted_for(owner=owner, client_msg_id=client_msg_id)
        if existing is None:
            raise
        return existing
    return _accepted(
        owner=owner,
        client_msg_id=client_msg_id,
        ids=(conversation_pk, user_message_id, reply_id),
        version=version,
        created=created,
    )


@dataclass(frozen=True, slots=True)
class NewMessage:
    """One send for messages_accept: a new message, in a new or an existing conversation."""

    owner: Owner
    content: str
    client_msg_id: uuid.UUID
    conversation_id: int | None
    injection_score: float | None = None
    injection_signals: list[str] = dataclasses.field(default_factory=list)


def messages_accept(
    *, sends: list[NewMessage], version_for: Callable[..., ActiveVersion]
) -> list[Accepted | NotFound]:
    """Store many sends with one statement for each kind of row; run it in a transaction.

    Each send gets the rows message_accept would write: a conversation when
    it has none, the user message, a pending reply. A send to a conversation
    that is not its owner's gets NotFound in its place and writes nothing.
    A client_msg_id stored before raises IntegrityError: the caller undoes
    the lot (a savepoint) and stores each with message_accept, which answers
    a retry with the first send's ids. Three statements for 32 sends instead
    of three each: a burst of new chats is stored several times faster.
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("messages_accept writes several statements: run it in a transaction")
    refused: dict[int, NotFound] = {}
    conversation_of: dict[int, int] = {}
    for i, send in enumerate(sends):
        if send.conversation_id is None:
            continue
        try:
            _conversation_touch(owner=send.owner, conversation_id=send.conversation_id)
        except NotFound as exc:
            refused[i] = exc
        else:
            conversation_of[i] = send.conversation_id
    fresh = [i for i, send in enumerate(sends) if send.conversation_id is None]
    rows = []
    for i in fresh:
        user_id = sends[i].owner.user_id
        rows.append(
            {
                "user_id": user_id,
                "session_key": sends[i].owner.session_key if user_id is None else "",
            }
        )
    created = _insert_conversation.run_many(rows)
    conversation_of.update(zip(fresh, created, strict=True))
    stored = sorted(conversation_of)
    user_ids = _insert_message.run_many(
        [
            {
                "conversation_id": conversation_of[i],
                "role": Message.Role.USER,
                "content": sends[i].content,
                "owner_key": sends[i].owner.key,
                "client_msg_id": sends[i].client_msg_id,
                "injection_score": sends[i].injection_score,
                "injection_signals": sends[i].injection_signals,
            }
            for i in stored
        ]
    )
    versions = {i: version_for(conversation_id=conversation_of[i]) for i in stored}
    reply_ids = _insert_message.run_many(
        [
            {
                "conversation_id": conversation_of[i],
                "role": Message.Role.ASSISTANT,
                "status": Message.Status.PENDING,
                "reply_to_id": user_id,
                "model": versions[i].model,
                "version_id": versions[i].version_id,
            }
            for i, user_id in zip(stored, user_ids, strict=True)
        ]
    )
    if created:
        transaction.on_commit(lambda: _titles_later(created), robust=True)
    accepted = {
        i: _accepted(
            owner=sends[i].owner,
            client_msg_id=sends[i].client_msg_id,
            ids=(conversation_of[i], user_id, reply_id),
            version=versions[i],
            created=sends[i].conversation_id is None,
        )
        for i, user_id, reply_id in zip(stored, user_ids, reply_ids, strict=True)
    }
    return [accepted[i] if i in accepted else refused[i] for i in range(len(sends))]


_insert_conversation = sql.Insert(Conversation)
_insert_message = sql.Insert(Message)
_touch_user_conversation = sql.Update(
    Conversation, set_fields=["updated_at"], where=["id", "user_id"]
)
_touch_session_conversation = sql.Update(
    Conversation, set_fields=["updated_at"], where=["id", "session_key"], where_null=["user_id"]
)
_MAX_ID = 2**63 - 1


def _conversation_touch(*, owner: Owner, conversation_id: object) -> None:
    """Bump the owner's conversation's updated_at, or raise NotFound for any other id."""
    if (
        isinstance(conversation_id, bool)
        or not isinstance(conversation_id, int)
        or not 0 < conversation_id <= _MAX_ID
    ):
        raise NotFound()
    now = timezone.now()
    if owner.user_id is not None:
        touched = _touch_user_conversation.run(
            where=[conversation_id, owner.user_id], updated_at=now
        )
    else:
        touched = _touch_session_conversation.run(
            where=[conversation_id, owner.session_key], updated_at=now
        )
    if touched != 1:
        raise NotFound()


def reply_regenerate(
    *,
    owner: Owner,
    reply_id: object,
    client_msg_id: uuid.UUID,
    version_for: Callable[..., ActiveVersion],
) -> Accepted:
    """Answer the last user message again; the old reply leaves the visible history.

    Only the conversation's last reply, once finished, can be regenerated. The
    old row and its feedback stay for staff.
    """
    existing = _accepted_for(owner=owner, client_msg_id=client_msg_id)
    if existing is not None:
        return existing
    # Superseding the old reply and creating the new one happen together.
    with transaction.atomic():
        old = access_reply(owner=owner, message_id=reply_id)
        conversation = old.conversation
        last = conversation.messages.filter(superseded_at__isnull=True).order_by("-id").first()
        if old.superseded_at is not None or last is None or last.pk != old.pk:
            raise InvalidInput("Only the last reply in a conversation can be regenerated.")
        if old.status == Message.Status.PENDING:
            raise InvalidInput("Wait for the reply to finish, or stop it, before regenerating.")
        old.superseded_at = timezone.now()
        old.save(update_fields=["superseded_at"])
        conversation.save(update_fields=["updated_at"])
        user_message = old.reply_to
        if user_message is None:
            raise InvalidInput("Only the last reply in a conversation can be regenerated.")
        version = version_for(conversation_id=conversation.pk)
        reply_id = _insert_message.run(
            conversation_id=conversation.pk,
            role=Message.Role.ASSISTANT,
            status=Message.Status.PENDING,
            reply_to_id=user_message.pk,
            model=version.model,
            version_id=version.version_id,
            # The regenerated reply carries the idempotency key itself.
            owner_key=owner.key,
            client_msg_id=client_msg_id,
        )
    accepted = _accepted(
        owner=owner,
        client_msg_id=client_msg_id,
        ids=(conversation.pk, user_message.pk, reply_id),
        version=version,
        created=False,
    )
    return dataclasses.replace(accepted, bypass_cache=True)


def _check_nothing_pending(conversation: Conversation) -> None:
    if conversation.messages.filter(status=Message.Status.PENDING).exists():
        raise InvalidInput("Wait for the reply to finish, or stop it, before editing.")


def _accepted(
    *,
    owner: Owner,
    client_msg_id: uuid.UUID,
    ids: tuple[int, int, int],
    version: ActiveVersion,
    created: bool,
) -> Accepted:
    """`ids`: the conversation, the user message and the pending reply."""
    conversation_id, user_message_id, reply_id = ids
    return Accepted(
        conversation_id=conversation_id,
        user_message_id=user_message_id,
        reply_id=reply_id,
        model=version.model,
        client_msg_id=str(client_msg_id),
        conversation_created=created,
        owner_key=owner.key,
        plan=ModelPlan(
            model=version.model,
            fallbacks=version.fallbacks,
            temperature=version.temperature,
            max_tokens=version.max_tokens,
        ),
        plan_system_prompt=version.system_prompt,
        version_id=version.version_id,
    )


def send_stored(*, owner: Owner, client_msg_id: uuid.UUID) -> bool:
    """Return whether a send with this id is stored for the owner (so a new one is a retry)."""
    return Message.objects.filter(owner_key=owner.key, client_msg_id=client_msg_id).exists()


def _accepted_for(*, owner: Owner, client_msg_id: uuid.UUID) -> Accepted | None:
    """Return what an earlier send with this id produced, if there was one."""
    found = (
        Message.objects.filter(owner_key=owner.key, client_msg_id=client_msg_id)
        .only("id", "role", "conversation_id", "reply_to_id", "model")
        .first()
    )
    if found is None:
        return None
    if found.role == Message.Role.ASSISTANT:
        reply: Message | None = found
        user_message_id = found.reply_to_id or 0
    else:
        reply = found.replies.only("id", "model").order_by("id").first()
        user_message_id = found.pk
    model = reply.model if reply else ""
    return Accepted(
        conversation_id=found.conversation_id,
        user_message_id=user_message_id,
        reply_id=reply.pk if reply else 0,
        model=model,
        client_msg_id=str(client_msg_id),
        conversation_created=False,
        owner_key=owner.key,
        plan=ModelPlan(model=model),
        duplicate=True,
    )


# Enqueueing writes to the broker (a file in the embedded mode); it happens on
# its own thread so the database thread, which every message's accept waits
# on, does not wait for it. Conversations started within TITLE_GATHER_S of
# each other go in one task message: a burst of new chats costs a few broker
# writes, not one each, and a title appears a fifth of a second later.
_enqueuer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-enqueue")
_untitled: list[int] = []
TITLE_GATHER_S = 0.2
_untitled_lock = threading.Lock()


def _title_later(conversation_id: int) -> None:
    _titles_later([conversation_id])


def _titles_later(conversation_ids: list[int]) -> None:
    with _untitled_lock:
        first = not _untitled
        _untitled.extend(conversation_ids)
    if first:
        _enqueuer.submit(_titles_enqueue)


def _titles_enqueue() -> None:
    from chat.tasks import conversation_titles

    # A broker write costs about a millisecond of CPU: let a burst gather.
    time.sleep(TITLE_GATHER_S)
    with _untitled_lock:
        ids = list(_untitled)
        _untitled.clear()
    if not ids:
        return
    try:
        conversation_titles.delay(ids)
    except Exception:
        logger.warning("could not enqueue the titles of %d conversations", len(ids))


_finish_pending = sql.Update(
    Message,
    set_fields=[
        "status",
        "content",
        "finish_reason",
        "model",
        "ttft_ms",
        "latency_ms",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "error_code",
        "usage_estimated",
        "call_path",
        "moderation",
        "cached",
        "finished_at",
    ],
    where=["id", "status"],
)


def _finish_values(
    *,
    content: str,
    finish_reason: str,
    model: str,
    ttft_ms: int | None,
    latency_ms: int,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    cost_usd: Decimal,
    error_code: str = "",
    usage_estimated: bool = False,
    call_path: list[dict[str, Any]] | None = None,
    moderation: dict[str, Any] | None = None,
    cached: bool = False,
) -> dict[str, Any]:
    """Return the columns a finished reply's row gets."""
    return {
        "status": Message.Status.FINISHED,
        "content": content,
        "finish_reason": finish_reason,
        "model": model,
        "ttft_ms": ttft_ms,
        "latency_ms": latency_ms,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_usd": cost_usd,
        "error_code": error_code,
        "usage_estimated": usage_estimated,
        "call_path": call_path or [],
        "moderation": moderation,
        "cached": cached,
        "finished_at": timezone.now(),
    }


def reply_finish(*, reply_id: int, **finished: Any) -> bool:
    """Finish a pending reply exactly once; return False if it was already finished.

    `finished` is what the reply ends with: content, finish_reason, model,
    ttft_ms, latency_ms, prompt_tokens, completion_tokens, cost_usd and,
    optionally, error_code, usage_estimated, call_path, moderation, cached.
    The status guard makes a second finisher (a late cancel, the reaper) a
    no-op instead of overwriting what the first one stored.
    """
    updated = _finish_pending.run(
        where=[reply_id, Message.Status.PENDING], **_finish_values(**finished)
    )
    return updated == 1


def replies_finish(replies: list[dict[str, Any]]) -> None:
    """Finish many pending replies, each as `reply_finish` would, in one statement call.

    Each dict holds `reply_id` and what `reply_finish` takes. A reply that
    is no longer pending is left as it is, as by `reply_finish`; which ones
    those were is not reported (the drivers' batch calls do not say).
    """
    rows = []
    for finished in replies:
        values = dict(finished)
        rows.append(([values.pop("reply_id"), Message.Status.PENDING], _finish_values(**values)))
    _finish_pending.run_many(rows)


def conversation_title_generate(*, conversation_id: int) -> str | None:
    """Title a conversation from its first user message, once.

    Safe to run twice: a conversation that already has a title keeps it.
    """
    first = (
        Message.objects.filter(conversation_id=conversation_id, role=Message.Role.USER)
        .order_by("id")
        .values_list("content", flat=True)
        .first()
    )
    if first is None:
        return None
    words = first.split()
    title = " ".join(words[:TITLE_WORDS])
    if len(words) > TITLE_WORDS:
        title += "…"
    title = title[:200]
    updated = Conversation.objects.filter(pk=conversation_id, title="").update(title=title)
    return title if updated else None


CONVERSATION_TITLE_MAX_CHARS = 200


def conversation_rename(*, owner: Owner, conversation_id: object, title: object) -> Conversation:
    """Give the owner's conversation a title the user chose; raise NotFound for others'."""
    from chat.safety.errors import InvalidInput as TextRefused
    from chat.safety.input import check_user_text

    try:
        checked = check_user_text(title, max_chars=CONVERSATION_TITLE_MAX_CHARS, field="title")
    except TextRefused as exc:
        raise InvalidInput(exc.user_message) from None
    conversation = access_conversation(owner=owner, conversation_id=conversation_id)
    # A title is one line: newlines and runs of spaces become single spaces.
    conversation.title = " ".join(checked.split())
    conversation.save(update_fields=["title"])
    return conversation


def conversation_delete(*, owner: Owner, conversation_id: object) -> None:
    """Delete the owner's conversation and its messages; raise NotFound for others'.

    A reply still streaming in it is stopped, so its model does not go on
    writing (and costing) text nobody will see; it finds its row gone and
    stores nothing (`reply_finish` matches no pending row).
    """
    from chat.replay import hub

    conversation = access_conversation(owner=owner, conversation_id=conversation_id)
    running = list(
        conversation.messages.filter(
            role=Message.Role.ASSISTANT, status=Message.Status.PENDING
        ).values_list("id", flat=True)
    )
    conversation.delete()
    if running:
        transaction.on_commit(lambda: hub.stop_from_thread(running), robust=True)
