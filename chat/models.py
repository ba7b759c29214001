from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q


class Conversation(models.Model):
    """A thread of messages owned by a user or by an anonymous session."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="conversations",
    )
    # Set for anonymous visitors only: the Django session that owns the thread.
    session_key = models.CharField(max_length=64, blank=True, default="", db_index=False)
    title = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            models.Index(fields=["user", "-updated_at"], name="conv_user_recent"),
            models.Index(fields=["session_key", "-updated_at"], name="conv_session_recent"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(user__isnull=False) | ~Q(session_key=""),
                name="conv_has_owner",
            ),
        ]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"

    class Status(models.TextChoices):
        # An assistant reply is pending until it ends, then finished once.
        PENDING = "pending", "Pending"
        FINISHED = "finished", "Finished"

    class FinishReason(models.TextChoices):
        STOP = "stop", "Complete"
        LENGTH = "length", "Cut at max tokens"
        CANCELLED = "cancelled", "Stopped"
        MODERATED = "moderated", "Moderated"
        ERROR = "error", "Failed"

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True, default="")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.FINISHED)
    finish_reason = models.CharField(
        max_length=16, choices=FinishReason.choices, blank=True, default=""
    )
    # For an assistant reply: the user message it answers.
    reply_to = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="replies"
    )
    # The owner's idempotency key for a user message ("u:<id>" or "s:<session>").
    owner_key = models.CharField(max_length=80, blank=True, default="")
    client_msg_id = models.UUIDField(null=True, blank=True)
    model = models.CharField(max_length=120, blank=True, default="")
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    cost_usd = models.DecimalField(
        max_digits=12, decimal_places=8, default=Decimal("0"), blank=True
    )
    error_code = models.CharField(max_length=32, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["conversation", "id"], name="msg_history"),
            # The reaper looks for replies left pending by a dead process.
            models.Index(
                fields=["created_at"], name="msg_pending_age", condition=Q(status="pending")
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["owner_key", "client_msg_id"],
                name="msg_client_id_once_per_owner",
                condition=Q(client_msg_id__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role} #{self.pk}"
