from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class ModelVersion(models.Model):
    """One immutable version of the chat's model profile.

    Staff change the profile by creating a new version; exactly one version is
    active unless an A/B split is running. Every reply records its version.
    """

    number = models.PositiveIntegerField(unique=True)
    model = models.CharField(max_length=120, help_text="provider:model, e.g. openai:gpt-4o-mini")
    fallbacks = models.JSONField(default=list, blank=True, help_text="ordered provider:model list")
    system_prompt = models.TextField(blank=True, default="")
    temperature = models.FloatField(null=True, blank=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    is_active = models.BooleanField(default=False)
    note = models.CharField(max_length=200, blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-number"]
        constraints = [
            models.UniqueConstraint(
                fields=["is_active"], condition=Q(is_active=True), name="one_active_version"
            )
        ]

    def __str__(self) -> str:
        return f"v{self.number} · {self.model}"


class Feedback(models.Model):
    """One person's rating of one assistant reply, updated in place.

    `owner_key` is "u:<user id>" for a signed-in user and "s:<sha256 of the
    session key>" for an anonymous visitor: the session key itself would let
    anyone who reads the admin or an export take over the visitor's session.
    """

    class Status(models.TextChoices):
        NEW = "new", "New"
        TRIAGED = "triaged", "Triaged"
        RESOLVED = "resolved", "Resolved"
        WONT_FIX = "wont_fix", "Won't fix"

    message = models.ForeignKey("chat.Message", on_delete=models.CASCADE, related_name="feedback")
    owner_key = models.CharField(max_length=80)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    # 1 or -1; null once the person withdrew their rating.
    rating = models.SmallIntegerField(null=True, blank=True)
    reasons = models.JSONField(default=list, blank=True)
    comment = models.TextField(blank=True, default="")
    # Copied from the finished reply, which never changes again, so the desk
    # filters and the rollups need no join with the (much larger) messages.
    model = models.CharField(max_length=120, blank=True, default="")
    version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="feedback"
    )
    review_status = models.CharField(max_length=16, choices=Status.choices, default=Status.NEW)
    assignee = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="assigned_feedback",
    )
    staff_note = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "feedback"
        constraints = [
            models.UniqueConstraint(
                fields=["owner_key", "message"], name="feedback_once_per_owner"
            ),
            models.CheckConstraint(
                condition=Q(rating__in=[1, -1]) | Q(rating__isnull=True),
                name="feedback_rating_up_or_down",
            ),
        ]
        indexes = [
            models.Index(fields=["review_status", "-id"], name="feedback_desk"),
            models.Index(fields=["rating", "-id"], name="feedback_by_rating"),
            models.Index(fields=["version", "-id"], name="feedback_by_version"),
            models.Index(fields=["model"], name="feedback_by_model"),
            models.Index(fields=["created_at"], name="feedback_by_date"),
            models.Index(fields=["updated_at"], name="feedback_changed"),
        ]

    def __str__(self) -> str:
        return f"feedback #{self.pk} on reply #{self.message_id}"


class ReviewEvent(models.Model):
    """Who did what to a piece of feedback (staff review steps, user changes)."""

    class Kind(models.TextChoices):
        STATUS = "status", "Status changed"
        ASSIGNEE = "assignee", "Assignee changed"
        NOTE = "note", "Staff note changed"
        RATING = "rating", "User changed the rating"

    feedback = models.ForeignKey(Feedback, on_delete=models.CASCADE, related_name="events")
    # Null for changes the end user made.
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    before = models.TextField(blank=True, default="")
    after = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["feedback", "id"], name="review_history")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} on feedback #{self.feedback_id}"


class VersionSplit(models.Model):
    """An A/B split: this share of conversations gets the challenger, the rest the control."""

    control = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    challenger = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    challenger_percent = models.PositiveSmallIntegerField()
    is_running = models.BooleanField(default=True)
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    started_at = models.DateTimeField(auto_now_add=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["is_running"], condition=Q(is_running=True), name="one_running_split"
            ),
            models.CheckConstraint(
                condition=Q(challenger_percent__gte=1, challenger_percent__lte=99),
                name="split_percent_1_99",
            ),
        ]

    def __str__(self) -> str:
        return (
            f"v{self.control.number} / v{self.challenger.number} "
            f"({100 - self.challenger_percent}% / {self.challenger_percent}%)"
        )


class VersionEvent(models.Model):
    """The audit trail of the model profile: who changed what, when."""

    class Kind(models.TextChoices):
        CREATED = "created", "Created"
        ACTIVATED = "activated", "Activated"
        ROLLED_BACK = "rolled_back", "Rolled back"
        SPLIT_STARTED = "split_started", "A/B split started"
        SPLIT_ENDED = "split_ended", "A/B split ended"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    # The version this event is about (the one created, activated, rolled back
    # to, or the challenger of a split).
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="events")
    # The version that was active before (activation, rollback) or that the
    # new version was based on (creation).
    from_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # {"field": [before, after]} for the fields that differ from `from_version`.
    changes = models.JSONField(default=dict, blank=True)
    note = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} v{self.version.number}"


class VersionRollup(models.Model):
    """Per-version, per-day totals of replies in one block of message ids.

    Maintained by `feedback.rollup_refresh` (Celery beat): a block is always
    recomputed whole from its rows, so running the task twice changes nothing.
    `version_key` is the version id, or 0 for replies made without a version.
    """

    block = models.PositiveIntegerField()
    version_key = models.PositiveBigIntegerField()
    day = models.DateField()
    replies = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    moderated = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=16, decimal_places=8, default=0)
    # Sparse log-bucket histograms, {"bucket index": count} (feedback/stats.py).
    ttft_hist = models.JSONField(default=dict)
    latency_hist = models.JSONField(default=dict)
    rated = models.PositiveIntegerField(default=0)
    up = models.PositiveIntegerField(default=0)
    down = models.PositiveIntegerField(default=0)
    down_reasons = models.JSONField(default=dict)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["block", "version_key", "day"], name="rollup_once")
        ]
        indexes = [models.Index(fields=["version_key", "day"], name="rollup_by_version")]

    def __str__(self) -> str:
        return f"rollup block {self.block} version {self.version_key} {self.day}"


class RollupState(models.Model):
    """Where the incremental rollup pass starts next time (one row)."""

    name = models.CharField(max_length=40, unique=True)
    message_id_from = models.PositiveBigIntegerField(default=0)
    feedback_changed_from = models.DateTimeField(null=True, blank=True)
    ran_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.name


class ExportJob(models.Model):
    """A large feedback export, written by a Celery worker to a file staff download."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    class Format(models.TextChoices):
        JSONL = "jsonl", "JSONL"
        CSV = "csv", "CSV"

    format = models.CharField(max_length=8, choices=Format.choices)
    # The desk's filter parameters, as in its query string.
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    total = models.PositiveIntegerField(default=0)
    written = models.PositiveIntegerField(default=0)
    file_name = models.CharField(max_length=200, blank=True, default="")
    error = models.CharField(max_length=200, blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"export #{self.pk} ({self.format}, {self.get_status_display()})"

    @property
    def progress_percent(self) -> int:
        if self.status == self.Status.DONE:
            return 100
        return min(99, round(100 * self.written / self.total)) if self.total else 0
