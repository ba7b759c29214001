from __future__ import annotations

from decimal import Decimal

from django.db import models
from django.db.models import Q


class HourlyRollup(models.Model):
    """One hour of finished replies for one model and version, recomputed whole.

    Latencies, TTFTs and reply lengths are kept as histograms on fixed
    log-spaced buckets (monitoring/rollups.py) so hours add up and any
    percentile is read within one bucket's width (about 12 %).
    """

    hour = models.DateTimeField()
    model = models.CharField(max_length=120)
    # The feedback.ModelVersion id, 0 when the reply had none (kept as a plain
    # number so a unique constraint holds without NULL quirks).
    version_id = models.PositiveIntegerField(default=0)
    replies = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    truncated = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    moderated = models.PositiveIntegerField(default=0)
    empty = models.PositiveIntegerField(default=0)
    cached = models.PositiveIntegerField(default=0)
    errors_by_code = models.JSONField(default=dict)
    moderation_by_category = models.JSONField(default=dict)
    ttft_hist = models.JSONField(default=list)
    latency_hist = models.JSONField(default=list)
    length_hist = models.JSONField(default=list)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, default=Decimal("0"))
    thumbs_up = models.PositiveIntegerField(default=0)
    thumbs_down = models.PositiveIntegerField(default=0)
    computed_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["hour", "model", "version_id"], name="rollup_once_per_hour"
            )
        ]
        indexes = [models.Index(fields=["hour"], name="rollup_hour")]

    def __str__(self) -> str:
        return f"{self.model} v{self.version_id} {self.hour:%Y-%m-%d %H:00}"


class DailyUserSpend(models.Model):
    """A day's spend per user (user_id 0 = every anonymous visitor together)."""

    day = models.DateField()
    user_id = models.PositiveIntegerField()
    replies = models.PositiveIntegerField(default=0)
    tokens = models.BigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, default=Decimal("0"))

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["day", "user_id"], name="spend_once_per_user_day")
        ]
        indexes = [models.Index(fields=["day"], name="spend_day")]

    def __str__(self) -> str:
        return f"user {self.user_id} on {self.day}"


class Alert(models.Model):
    """Something an operator should look at; one open alert per key."""

    class Kind(models.TextChoices):
        DRIFT = "drift", "Drift"
        SPEND = "spend", "Spend"
        REAPER = "reaper", "Interrupted replies"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    # What makes two alerts the same, e.g. "drift:v3:error_rate".
    key = models.CharField(max_length=200)
    title = models.CharField(max_length=200)
    detail = models.JSONField(default=dict, blank=True)
    occurrences = models.PositiveIntegerField(default=1)
    first_seen = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["key"], condition=Q(resolved_at__isnull=True), name="alert_open_once"
            )
        ]
        indexes = [models.Index(fields=["-last_seen"], name="alert_recent")]

    def __str__(self) -> str:
        return self.title


class Dashboard(models.Model):
    """No table: gives the admin a "Dashboard" entry under Monitoring."""

    class Meta:
        managed = False
        verbose_name = "dashboard"
        verbose_name_plural = "dashboard"
        default_permissions = ("view",)

    def __str__(self) -> str:
        return "dashboard"
