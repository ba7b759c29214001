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
        # conv_user_recent begins with user: an index of its own would only
        # be one more to update for every new conversation.
        db_index=False,
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
        Conversation,
        on_delete=models.CASCADE,
        related_name="messages",
        # msg_history begins with conversation: no index of its own (two
        # fewer to update a message sent).
        db_index=False,
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
    # True when the vendor did not report usage and the tokens were estimated.
    usage_estimated = models.BooleanField(default=False)
    # True when the reply was served from the response cache.
    cached = models.BooleanField(default=False)
    # The model/prompt version that produced this reply.
    version = models.ForeignKey(
        "feedback.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="replies",
    )
    # How the reply was obtained: one entry per attempt, e.g.
    # [{"model": "openai:gpt-4o", "outcome": "rate_limited"}, {"model": ..., "outcome": "ok"}].
    call_path = models.JSONField(default=list, blank=True)
    # For a user message: the prompt-injection heuristics' score and signals.
    injection_score = models.FloatField(null=True, blank=True)
    injection_signals = models.JSONField(default=list, blank=True)
    # The moderation verdict that flagged this message, if any:
    # {"stage": "input"|"output", "category": "...", "score": 0.93}.
    moderation = models.JSONField(null=True, blank=True)
    # Set when the user regenerated this reply or edited an earlier message:
    # the row stays (with its feedback) but leaves the visible history.
    superseded_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["conversation", "id"], name="msg_history"),
            # Rollups, retention and exports read replies by time.
            models.Index(fields=["created_at"], name="msg_created"),
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


class Price(models.Model):
    """What a model costs, from a date on; old replies keep the price they were charged."""

    model = models.CharField(max_length=120, help_text="provider:model, e.g. openai:gpt-4o-mini")
    input_per_mtok = models.DecimalField(
        "input USD per million tokens", max_digits=12, decimal_places=6
    )
    output_per_mtok = models.DecimalField(
        "output USD per million tokens", max_digits=12, decimal_places=6
    )
    cached_input_per_mtok = models.DecimalField(
        "cached input USD per million tokens",
        max_digits=12,
        decimal_places=6,
        null=True,
        blank=True,
    )
    effective_from = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["model", "-effective_from"], name="price_lookup")]
        constraints = [
            models.UniqueConstraint(fields=["model", "effective_from"], name="price_once_per_date")
        ]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from:%Y-%m-%d}"


class AbuseBlock(models.Model):
    """A temporary block on a user or an IP after repeated violations."""

    # "u:<user id>", "s:<session key>" or "ip:<address>".
    subject = models.CharField(max_length=120, db_index=True)
    reason = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)
    lifted_at = models.DateTimeField(null=True, blank=True)
    lifted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )

    def __str__(self) -> str:
        return f"block on {self.subject} until {self.expires_at:%Y-%m-%d %H:%M}"
