"""Model/prompt versions in the admin: create (never edit), activate, roll back,
A/B split, audit trail with diffs, and scorecards side by side."""

from __future__ import annotations

import difflib
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from feedback import selectors, versions
from feedback.models import ModelVersion, VersionEvent, VersionSplit

_FORM_FIELD_OF = {"fallbacks": "fallbacks_text"}


class VersionForm(forms.ModelForm):
    fallbacks_text = forms.CharField(
        label="Fallbacks",
        required=False,
        help_text="Comma-separated provider:model names, tried in this order.",
    )
    activate = forms.BooleanField(
        required=False, help_text="Make this the active version as soon as it is saved."
    )
    based_on = forms.IntegerField(required=False, widget=forms.HiddenInput)

    class Meta:
        model = ModelVersion
        fields = ("model", "system_prompt", "temperature", "max_tokens", "note")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        data["fallbacks"] = [
            spec.strip() for spec in (data.get("fallbacks_text") or "").split(",") if spec.strip()
        ]
        if "model" in data:
            try:
                versions.check_profile(
                    model=data["model"],
                    fallbacks=data["fallbacks"],
                    temperature=data.get("temperature"),
                    max_tokens=data.get("max_tokens"),
                )
            except ValidationError as exc:
                for name, errors in exc.message_dict.items():
                    self.add_error(_FORM_FIELD_OF.get(name, name), errors)
        return data


class SplitForm(forms.Form):
    challenger = forms.ModelChoiceField(queryset=ModelVersion.objects.none())
    challenger_percent = forms.IntegerField(
        label="Share of conversations for the challenger (%)", min_value=1, max_value=99, initial=10
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["challenger"]
        assert isinstance(field, forms.ModelChoiceField)
        field.queryset = ModelVersion.objects.filter(is_active=False)


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    form = VersionForm
    change_list_template = "admin/feedback/modelversion/change_list.html"
    change_form_template = "admin/feedback/modelversion/change_form.html"
    list_display = ("label", "model", "state", "note", "created_by", "created_at")
    list_display_links = ("label",)
    ordering = ("-number",)
    list_select_related = ("created_by",)
    add_fields = (
        "model",
        "fallbacks_text",
        "system_prompt",
        "temperature",
        "max_tokens",
        "note",
        "activate",
        "based_on",
    )
    view_fields = (
        "number",
        "model",
        "fallbacks",
        "system_prompt",
        "temperature",
        "max_tokens",
        "state",
        "note",
        "created_by",
        "created_at",
        "history",
    )

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.view_fields if obj is not None else self.add_fields

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return self.view_fields if obj is not None else ()

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A version is never edited in place: staff make a new one from it.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def _may_operate(self, request: HttpRequest) -> bool:
        return request.user.has_perm("feedback.add_modelversion")

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        source_id = selectors.version_id_param(request.GET.get("from", ""))
        source = ModelVersion.objects.filter(pk=source_id).first() if source_id else None
        profile = (
            {name: getattr(source, name) for name in versions.PROFILE_FIELDS}
            if source
            else versions.current_profile()
        )
        initial = {
            name: profile[name] for name in ("model", "system_prompt", "temperature", "max_tokens")
        }
        initial["fallbacks_text"] = ", ".join(profile["fallbacks"] or [])
        initial["based_on"] = source.pk if source else None
        return initial

    def save_model(self, request: HttpRequest, obj: ModelVersion, form: Any, change: bool) -> None:
        if change:
            raise PermissionDenied("versions are never edited in place")
        data = form.cleaned_data
        created = versions.version_create(
            actor_id=request.user.pk,
            model=data["model"],
            fallbacks=data["fallbacks"],
            system_prompt=data.get("system_prompt") or "",
            temperature=data.get("temperature"),
            max_tokens=data.get("max_tokens"),
            note=data.get("note") or "",
            based_on_id=data.get("based_on"),
            activate=bool(data.get("activate")),
        )
        # The admin goes on to log and redirect using this object.
        obj.pk, obj.number, obj.is_active = created.pk, created.number, created.is_active
        obj.created_at = created.created_at

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        return None

    # --- columns ---------------------------------------------------------

    @admin.display(description="version", ordering="number")
    def label(self, obj: ModelVersion) -> str:
        return f"v{obj.number}"

    @admin.display(description="state")
    def state(self, obj: ModelVersion) -> str:
        split = _running_split()
        if split is not None and obj.pk == split.control_id:
            return f"active · A/B control ({100 - split.challenger_percent}%)"
        if split is not None and obj.pk == split.challenger_id:
            return f"A/B challenger ({split.challenger_percent}%)"
        return "active" if obj.is_active else "—"

    @admin.display(description="changes to this version")
    def history(self, obj: ModelVersion) -> SafeString:
        events = VersionEvent.objects.filter(version=obj).select_related("actor", "from_version")
        return format_html_join(
            "",
            "<div class='version-event'><strong>{}</strong> · {} · {}{}</div>",
            (
                (e.get_kind_display(), _who(e), f"{e.created_at:%Y-%m-%d %H:%M:%S}", diff_html(e))
                for e in events
            ),
        )

    # --- operations ---------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        def view(fn: Any) -> Any:
            return self.admin_site.admin_view(fn)

        return [
            path("rollback/", view(self.rollback_view), name="feedback_modelversion_rollback"),
            path("split/", view(self.split_view), name="feedback_modelversion_split"),
            path("split/end/", view(self.split_end_view), name="feedback_modelversion_split_end"),
            path(
                "scorecards/", view(self.scorecards_view), name="feedback_modelversion_scorecards"
            ),
            path(
                "<int:version_id>/activate/",
                view(self.activate_view),
                name="feedback_modelversion_activate",
            ),
            *super().get_urls(),
        ]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        extra = {
            "active_version": ModelVersion.objects.filter(is_active=True).first(),
            "rollback_target": versions.rollback_target(),
            "running_split": _running_split(),
            "settings_profile": versions.settings_profile(),
            "may_operate": self._may_operate(request),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        extra = {"may_operate": self._may_operate(request), **(extra_context or {})}
        return super().change_view(request, object_id, form_url, extra)

    def _back(self) -> HttpResponseRedirect:
        return HttpResponseRedirect(reverse("admin:feedback_modelversion_changelist"))

    def rollback_view(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST" or not self._may_operate(request):
            raise PermissionDenied
        seen = request.POST.get("from_version", "")
        if not seen.isdigit():
            # A page from before the button said what it rolls back from.
            self.message_user(
                request, "Nothing was changed: reload the page and try again.", messages.WARNING
            )
            return self._back()
        try:
            target = versions.version_rollback(actor_id=request.user.pk, from_version_id=int(seen))
        except versions.RolledBackAlready as exc:
            now = (
                f"v{exc.active.number} ({exc.active.model}) is active"
                if exc.active
                else "no version is active"
            )
            self.message_user(
                request,
                f"Someone changed the active version first: {now}. Nothing was changed.",
                messages.WARNING,
            )
            return self._back()
        if target is None:
            self.message_user(
                request, "There is no earlier version to roll back to.", messages.WARNING
            )
        else:
            self.message_user(
                request,
                f"Rolled back: v{target.number} ({target.model}) answers the next reply.",
                messages.SUCCESS,
            )
        return self._back()

    def activate_view(self, request: HttpRequest, version_id: int) -> HttpResponse:
        if request.method != "POST" or not self._may_operate(request):
            raise PermissionDenied
        version = get_object_or_404(ModelVersion, pk=version_id)
        versions.version_activate(actor_id=request.user.pk, version_id=version.pk)
        self.message_user(request, f"v{version.number} is now active.", messages.SUCCESS)
        return self._back()

    def split_view(self, request: HttpRequest) -> HttpResponse:
        if not self._may_operate(request):
            raise PermissionDenied
        initial = {}
        challenger_id = selectors.version_id_param(request.GET.get("challenger", ""))
        if challenger_id:
            initial["challenger"] = challenger_id
        form = SplitForm(request.POST or None, initial=initial)
        if request.method == "POST" and form.is_valid():
            try:
                split = versions.split_start(
                    actor_id=request.user.pk,
                    challenger_id=form.cleaned_data["challenger"].pk,
                    challenger_percent=form.cleaned_data["challenger_percent"],
                )
            except ValidationError as exc:
                form.add_error(None, exc)
            else:
                self.message_user(request, f"A/B split started: {split}.", messages.SUCCESS)
                return self._back()
        context = {
            **self.admin_site.each_context(request),
            "title": "Start an A/B split",
            "form": form,
            "opts": self.model._meta,
            "active_version": ModelVersion.objects.filter(is_active=True).first(),
        }
        return TemplateResponse(request, "admin/feedback/modelversion/split.html", context)

    def split_end_view(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST" or not self._may_operate(request):
            raise PermissionDenied
        ended = versions.split_end(actor_id=request.user.pk)
        self.message_user(
            request, "A/B split ended." if ended else "No split was running.", messages.SUCCESS
        )
        return self._back()

    def scorecards_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        choice = selectors.scorecard_choice(
            versions=request.GET.getlist("v"), days=request.GET.get("days", "")
        )
        cards, baseline = selectors.scorecards(version_keys=choice.version_keys, since=choice.since)
        context = {
            **self.admin_site.each_context(request),
            "title": "Scorecards by version",
            "opts": self.model._meta,
            "rows": _scorecard_rows(cards),
            "cards": cards,
            "baseline": next((c for c in cards if c.version_key == baseline), None),
            "days": str(choice.days or ""),
            "all_versions": ModelVersion.objects.order_by("-number").values_list("pk", "number"),
            "chosen": choice.version_keys or [],
        }
        return TemplateResponse(request, "admin/feedback/scorecards.html", context)


def _running_split() -> VersionSplit | None:
    return VersionSplit.objects.filter(is_running=True).first()


def _who(event: VersionEvent) -> str:
    return event.actor.get_username() if event.actor else "system"


def diff_html(event: VersionEvent) -> SafeString:
    """Render an event's changes: a unified diff for the prompt, before → after for the rest."""
    parts: list[SafeString] = []
    if event.note:
        parts.append(format_html("<div><em>{}</em></div>", event.note))
    for name, (before, after) in (event.changes or {}).items():
        if name == "system_prompt":
            lines = difflib.unified_diff(
                str(before or "").splitlines(),
                str(after or "").splitlines(),
                "before",
                "after",
                lineterm="",
                n=2,
            )
            body = format_html_join(
                "",
                "<div class='{}'>{}</div>",
                ((_diff_class(line), line) for line in lines),
            )
            parts.append(
                format_html(
                    "<div>system prompt:<pre class='prompt-diff'>{}</pre></div>",
                    body,
                )
            )
        else:
            parts.append(
                format_html(
                    "<div>{}: <del>{}</del> → <ins>{}</ins></div>",
                    name.replace("_", " "),
                    _shown(before),
                    _shown(after),
                )
            )
    return format_html_join("", "{}", ((p,) for p in parts))


def _diff_class(line: str) -> str:
    # Colours are in static/feedback/admin.css: the CSP blocks inline styles.
    if line.startswith("+") and not line.startswith("+++"):
        return "diff-added"
    if line.startswith("-") and not line.startswith("---"):
        return "diff-removed"
    return "diff-context"


def _shown(value: Any) -> str:
    if value is None or value == "":
        return "(none)"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "(none)"
    return str(value)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _scorecard_rows(cards: list[selectors.Scorecard]) -> list[dict[str, Any]]:
    """Lay the cards out as table rows: one metric per row, one version per column."""

    def rate_cell(
        card: selectors.Scorecard, metric: str, value: float | None, extra: str = ""
    ) -> dict[str, Any]:
        comparison = card.comparisons.get(metric)
        note = ""
        meaningful = None
        if comparison is not None:
            meaningful = comparison.significant
            sign = "+" if comparison.diff_points >= 0 else ""
            p = "p<0.001" if comparison.p_value < 0.001 else f"p={comparison.p_value:.3f}"
            note = f"{sign}{comparison.diff_points:.1f} pts vs baseline, {p} — " + (
                "statistically meaningful"
                if comparison.significant
                else "not statistically meaningful"
            )
        return {"value": _pct(value) + extra, "note": note, "meaningful": meaningful}

    def plain(value: str) -> dict[str, Any]:
        return {"value": value, "note": "", "meaningful": None}

    def interval(card: selectors.Scorecard) -> str:
        ci = card.up_interval
        return "" if ci is None else f" (95% CI {100 * ci[0]:.1f} to {100 * ci[1]:.1f}%)"

    def ms(value: int | None) -> str:
        return "—" if value is None else f"≤{value:,} ms"

    metrics: list[tuple[str, Any]] = [
        ("Replies", lambda c: plain(f"{c.replies:,}")),
        ("Thumbs-up rate", lambda c: rate_cell(c, "up_rate", c.up_rate, interval(c))),
        ("Ratings (up / down)", lambda c: plain(f"{c.up:,} / {c.down:,}")),
        ("Feedback rate", lambda c: rate_cell(c, "feedback_rate", c.feedback_rate)),
        (
            "Top down-reasons",
            lambda c: plain(
                ", ".join(f"{r.replace('_', ' ')} ({n})" for r, n in c.top_down_reasons) or "—"
            ),
        ),
        ("Error rate", lambda c: rate_cell(c, "error_rate", c.error_rate)),
        ("Moderation rate", lambda c: rate_cell(c, "moderation_rate", c.moderation_rate)),
        (
            "TTFT p50 / p95",
            lambda c: plain(f"{ms(c.percentile('ttft', 0.5))} / {ms(c.percentile('ttft', 0.95))}"),
        ),
        (
            "Latency p50 / p95",
            lambda c: plain(
                f"{ms(c.percentile('latency', 0.5))} / {ms(c.percentile('latency', 0.95))}"
            ),
        ),
        (
            "Cost per reply",
            lambda c: plain("—" if c.cost_per_reply is None else f"${c.cost_per_reply:.6f}"),
        ),
    ]
    return [{"name": name, "cells": [fn(card) for card in cards]} for name, fn in metrics]


@admin.register(VersionEvent)
class VersionEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "kind", "version", "from_version", "actor", "changes_shown")
    list_filter = ("kind",)
    list_select_related = ("version", "from_version", "actor")
    fields = ("created_at", "kind", "version", "from_version", "actor", "note", "changes_shown")
    readonly_fields = fields

    @admin.display(description="what changed")
    def changes_shown(self, obj: VersionEvent) -> SafeString:
        return diff_html(obj)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
