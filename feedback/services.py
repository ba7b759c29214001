"""Writes: ratings from end users, review steps from staff, export jobs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, transaction

from chat.errors import InvalidInput
from chat.models import Message
from chat.owners import Owner
from chat.safety.errors import InvalidInput as TextRefused
from chat.safety.input import check_user_text
from chat.safety.limits import check_feedback_rate
from chat.selectors import access_reply
from feedback.models import ExportJob, Feedback, ReviewEvent
from monitoring import metrics


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    message_id: int
    # None once the rating was withdrawn.
    rating: int | None


def feedback_owner_key(owner: Owner) -> str:
    """Return the key feedback rows are stored under for this owner.

    Anonymous visitors are keyed by a hash of their session key, never the
    key itself, so neither the desk nor an export can leak a live session.
    """
    if owner.user_id is not None:
        return f"u:{owner.user_id}"
    digest = hashlib.sha256(owner.session_key.encode()).hexdigest()[:40]
    return f"s:{digest}"


def check_rating(rating: object) -> int | None:
    """Return 1 or -1, or None for a withdrawal (0 or null); raise InvalidInput otherwise."""
    if rating is None or (rating == 0 and not isinstance(rating, bool)):
        return None
    if isinstance(rating, int) and not isinstance(rating, bool) and rating in (1, -1):
        return rating
    raise InvalidInput("A rating must be 1 (thumbs up), -1 (thumbs down), or 0 to withdraw it.")


def check_reasons(reasons: object, *, rating: int | None) -> list[str]:
    """Return the reasons as a de-duplicated list from the configured chips for `rating`."""
    if reasons is None or rating is None:
        return []
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise InvalidInput("Reasons must be a list of reason names.")
    allowed = settings.FEEDBACK_REASONS_UP if rating == 1 else settings.FEEDBACK_REASONS_DOWN
    unknown = [r for r in reasons if r not in allowed]
    if unknown:
        shown = unknown[0] if len(unknown[0]) <= 40 else "that reason"
        raise InvalidInput(
            f"{shown!r} is not a reason you can give for this rating. "
            f"Choose from: {', '.join(allowed)}."
        )
    return list(dict.fromkeys(reasons))


def check_comment(comment: object) -> str:
    """Return the comment cleaned by the input checker; empty or absent is no comment."""
    if comment is None or (isinstance(comment, str) and not comment.strip()):
        return ""
    try:
        return check_user_text(
            comment, max_chars=settings.FEEDBACK_MAX_COMMENT_CHARS, field="comment"
        )
    except TextRefused as exc:
        raise InvalidInput(exc.user_message) from None


def feedback_submit(
    *,
    owner: Owner,
    client_ip: str,
    message_id: object,
    rating: object,
    reasons: object,
    comment: object,
) -> FeedbackResult:
    """Rate, re-rate or withdraw the rating of one of the owner's finished replies.

    Raise RateLimited past `FEEDBACK_RATELIMIT` (every attempt counts, valid or
    not, and a refused one writes nothing); InvalidInput for a bad rating,
    reason or comment and for a reply that is still being written; NotFound
    for a message that is missing, someone else's, or not an assistant reply
    (the same answer, so ids can't be probed).
    """
    # The limit lives here, not in the view or the consumer, so the WebSocket
    # frame and the HTTP endpoint cannot drift apart (SPEC: "same rules").
    check_feedback_rate(owner=owner, client_ip=client_ip)
    value = check_rating(rating)
    reason_list = check_reasons(reasons, rating=value)
    text = check_comment(comment) if value is not None else ""
    reply = access_reply(owner=owner, message_id=message_id)
    if reply.status != Message.Status.FINISHED:
        raise InvalidInput("You can rate a reply once it has finished.")
    key = feedback_owner_key(owner)
    try:
        rated = _feedback_store(
            reply=reply, owner=owner, key=key, rating=value, reasons=reason_list, comment=text
        )
    except IntegrityError:
        # The same person's two tabs rated at once; the row exists now, update it.
        rated = _feedback_store(
            reply=reply, owner=owner, key=key, rating=value, reasons=reason_list, comment=text
        )
    if rated and value is not None:
        metrics.feedback_saved(value)
    return FeedbackResult(message_id=reply.pk, rating=value)


def _feedback_store(
    *,
    reply: Message,
    owner: Owner,
    key: str,
    rating: int | None,
    reasons: list[str],
    comment: str,
) -> bool:
    """Store the owner's rating of a reply; return whether the thumb itself changed.

    `ai_feedback_total{rating}` counts thumbs given, so it is told only
    when this returns True: a first rating, or a rating that differs from
    the stored one (up to down, withdrawn to up). Sending the same thumb
    again, even with new reasons or a new comment, edits that rating and
    is not another vote; a client's retry or a double click would
    otherwise inflate the count.
    """
    # The rating and the history entry for its change land together.
    with transaction.atomic():
        row = Feedback.objects.select_for_update().filter(owner_key=key, message=reply).first()
        if row is None:
            if rating is None:
                return False  # withdrawing a rating that was never given
            Feedback.objects.create(
                message=reply,
                owner_key=key,
                user_id=owner.user_id,
                rating=rating,
                reasons=reasons,
                comment=comment,
                model=reply.model,
                version_id=reply.version_id,
            )
            return True
        if (row.rating, row.reasons, row.comment) == (rating, reasons, comment):
            return False
        rating_changed = row.rating != rating
        ReviewEvent.objects.create(
            feedback=row,
            actor=None,
            kind=ReviewEvent.Kind.RATING,
            before=_describe(row.rating, row.reasons, row.comment),
            after=_describe(rating, reasons, comment),
        )
        row.rating, row.reasons, row.comment = rating, reasons, comment
        fields = ["rating", "reasons", "comment", "updated_at"]
        if row.review_status in (Feedback.Status.RESOLVED, Feedback.Status.WONT_FIX):
            # The person said something new: it needs a fresh look.
            ReviewEvent.objects.create(
                feedback=row,
                actor=None,
                kind=ReviewEvent.Kind.STATUS,
                before=row.review_status,
                after=Feedback.Status.NEW,
            )
            row.review_status = Feedback.Status.NEW
            fields.append("review_status")
        row.save(update_fields=fields)
    return rating_changed


def _describe(rating: int | None, reasons: list[str], comment: str) -> str:
    label = {1: "thumbs up", -1: "thumbs down", None: "withdrawn"}[rating]
    parts = [label]
    if reasons:
        parts.append("reasons: " + ", ".join(reasons))
    if comment:
        parts.append(f"comment: {comment[:200]}")
    return "; ".join(parts)


def feedback_review_update(
    *,
    actor_id: int | None,
    feedback_ids: Iterable[int],
    status: str | None = None,
    assignee_id: int | None = None,
    set_assignee: bool = False,
    note: str | None = None,
) -> int:
    """Apply one review step to feedback rows, recording who did what; return rows changed.

    Only the fields passed change; rows already in the requested state get no event.
    """
    if status is not None and status not in Feedback.Status.values:
        raise ValueError(f"unknown review status {status!r}")
    requested: dict[str, object] = {}
    if status is not None:
        requested["review_status"] = status
    if set_assignee:
        requested["assignee_id"] = assignee_id
    if note is not None:
        requested["staff_note"] = note
    if not requested:
        return 0
    labels: dict[int | None, str] = {}

    def label(user_id: int | None) -> str:
        if user_id not in labels:
            labels[user_id] = _user_label(user_id)
        return labels[user_id]

    changed = 0
    ids = list(feedback_ids)
    # Each row's new state and its history entries land together.
    with transaction.atomic():
        for start in range(0, len(ids), 500):
            rows = Feedback.objects.select_for_update().filter(pk__in=ids[start : start + 500])
            events: list[ReviewEvent] = []
            touched: list[int] = []
            for row in rows.only("id", "review_status", "assignee_id", "staff_note"):
                before = len(events)
                if status is not None and row.review_status != status:
                    events.append(_event(row, actor_id, "status", row.review_status, status))
                if set_assignee and row.assignee_id != assignee_id:
                    events.append(
                        _event(
                            row, actor_id, "assignee", label(row.assignee_id), label(assignee_id)
                        )
                    )
                if note is not None and row.staff_note != note:
                    events.append(_event(row, actor_id, "note", row.staff_note, note))
                if len(events) > before:
                    touched.append(row.pk)
            if touched:
                # update() skips auto_now: review steps don't count as the user's change.
                Feedback.objects.filter(pk__in=touched).update(**requested)
                changed += len(touched)
            ReviewEvent.objects.bulk_create(events)
    return changed


def _event(row: Feedback, actor_id: int | None, kind: str, before: str, after: str) -> ReviewEvent:
    return ReviewEvent(
        feedback_id=row.pk,
        actor_id=actor_id,
        kind=kind,
        before=before,
        after=after,
    )


def _user_label(user_id: int | None) -> str:
    if user_id is None:
        return "nobody"
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.filter(pk=user_id).only("username").first()
    return user.get_username() if user else f"user #{user_id}"


def export_job_create(*, actor_id: int | None, format: str, params: Mapping[str, str]) -> ExportJob:
    """Queue a large export; the worker starts once this transaction commits."""
    from feedback import selectors
    from feedback.tasks import export_run

    if format not in ExportJob.Format.values:
        raise ValueError(f"unknown export format {format!r}")
    total = selectors.feedback_filtered(params=params).count()
    job = ExportJob.objects.create(
        format=format, params=dict(params), total=total, created_by_id=actor_id
    )
    transaction.on_commit(lambda: export_run.delay(job.pk), robust=True)
    return job
