"""Writes. Each function is one short transaction, safe to call from async code
through `database_sync_to_async`, and never wraps a network call."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from chat.callpath import ModelPlan
from chat.errors import InvalidInput
from chat.models import Conversation, Message
from chat.owners import Owner
from chat.selectors import access_conversation, access_reply, access_user_message

if TYPE_CHECKING:
    from chat.safety.limits import Reservation
    from feedback.versions import ActiveVersion

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

    def with_reservation(self, reservation: Reservation) -> Accepted:
        return dataclasses.replace(self, reservation=reservation)


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
    existing = _accepted_for(owner=owner, client_msg_id=client_msg_id)
    if existing is not None:
        return existing
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
                created = False
            elif conversation_id is None:
                conversation = Conversation.objects.create(
                    user_id=owner.user_id,
                    session_key="" if owner.user_id is not None else owner.session_key,
                )
                created = True
            else:
                conversation = access_conversation(owner=owner, conversation_id=conversation_id)
                # Bumps updated_at so the list shows the active chat first.
                conversation.save(update_fields=["updated_at"])
                created = False
            user_message = Message.objects.create(
                conversation=conversation,
                role=Message.Role.USER,
                content=content,
                owner_key=owner.key,
                client_msg_id=client_msg_id,
                injection_score=injection_score,
                injection_signals=injection_signals or [],
            )
            version = version_for(conversation_id=conversation.pk)
            reply = _pending_reply(
                conversation=conversation, user_message=user_message, version=version
            )
            if created:
                transaction.on_commit(lambda: _title_later(conversation.pk), robust=True)
    except IntegrityError:
        # Two sends with the same id raced; the other one won.
        existing = _accepted_for(owner=owner, client_msg_id=client_msg_id)
        if existing is None:
            raise
        return existing
    return _accepted(
        owner=owner, client_msg_id=client_msg_id, reply=reply, version=version, created=created
    )


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
        reply = _pending_reply(
            conversation=conversation,
            user_message=user_message,
            version=version,
            # The regenerated reply carries the idempotency key itself.
            owner_key=owner.key,
            client_msg_id=client_msg_id,
        )
    accepted = _accepted(
        owner=owner, client_msg_id=client_msg_id, reply=reply, version=version, created=False
    )
    return dataclasses.replace(accepted, bypass_cache=True)


def _check_nothing_pending(conversation: Conversation) -> None:
    if conversation.messages.filter(status=Message.Status.PENDING).exists():
        raise InvalidInput("Wait for the reply to finish, or stop it, before editing.")


def _pending_reply(
    *,
    conversation: Conversation,
    user_message: Message,
    version: ActiveVersion,
    owner_key: str = "",
    client_msg_id: uuid.UUID | None = None,
) -> Message:
    return Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Message.Status.PENDING,
        reply_to=user_message,
        model=version.model,
        version_id=version.version_id,
        owner_key=owner_key,
        client_msg_id=client_msg_id,
    )


def _accepted(
    *,
    owner: Owner,
    client_msg_id: uuid.UUID,
    reply: Message,
    version: ActiveVersion,
    created: bool,
) -> Accepted:
    assert reply.reply_to_id is not None
    return Accepted(
        conversation_id=reply.conversation_id,
        user_message_id=reply.reply_to_id,
        reply_id=reply.pk,
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


def _title_later(conversation_id: int) -> None:
    from chat.tasks import conversation_title

    conversation_title.delay(conversation_id)


def reply_finish(
    *,
    reply_id: int,
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
) -> bool:
    """Finish a pending reply exactly once; return False if it was already finished.

    The status guard makes a second finisher (a late cancel, the reaper) a
    no-op instead of overwriting what the first one stored.
    """
    updated = Message.objects.filter(pk=reply_id, status=Message.Status.PENDING).update(
        status=Message.Status.FINISHED,
        content=content,
        finish_reason=finish_reason,
        model=model,
        ttft_ms=ttft_ms,
        latency_ms=latency_ms,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost_usd=cost_usd,
        error_code=error_code,
        usage_estimated=usage_estimated,
        call_path=call_path or [],
        moderation=moderation,
        cached=cached,
        finished_at=timezone.now(),
    )
    return updated == 1


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

    A reply still streaming in it finds its row gone and stores nothing
    (`reply_finish` matches no pending row).
    """
    conversation = access_conversation(owner=owner, conversation_id=conversation_id)
    conversation.delete()
