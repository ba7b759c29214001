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
