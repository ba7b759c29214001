"""The staff review desk: feedback with its whole story, review steps, exports."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import (
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponseRedirect,
    StreamingHttpResponse,
)
from django.http.response import HttpResponseBase
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from config.streaming import streamed
from feedback import exports, selectors, services
from feedback.admin import filters
from feedback.models import ExportJob, Feedback


@admin.register(Feedback)
class FeedbackAdmin(admin.ModelAdmin):
    change_list_template = "admin/feedback/feedback/change_list.html"
    list_display = (
        "id",
        "rating_shown",
        "reasons_shown",
        "comment_shown",
        "model",
        "version",
        "review_status",
        "assignee",
        "created_at",
    )
    list_display_links = ("id", "rating_shown")
    list_filter = (
        filters.RatingFilter,
        filters.ReasonFilter,
        filters.ModelFilter,
        filters.VersionFilter,
        filters.CreatedRangeFilter,
        filters.StatusFilter,
        filters.HasCommentFilter,
        filters.AssigneeFilter,
    )
    search_fields = ("comment",)
    search_help_text = "Search the comments."
    list_select_related = ("version", "assignee")
    list_per_page = 50
    show_full_result_count = False
    ordering = ("-id",)
    actions = [
        "mark_triaged",
        "mark_resolved",
        "mark_wont_fix",
        "mark_new",
        "assign_to_me",
        "unassign",
    ]
    fieldsets = (
        ("Review", {"fields": ("review_status", "assignee", "staff_note")}),
        ("Rating", {"fields": ("rating_shown", "reasons_shown", "comment", "who", "rated_at")}),
        ("The rated reply", {"fields": ("reply_facts",)}),
        ("Conversation up to the rated reply", {"fields": ("conversation_shown",)}),
        ("History: who did what", {"fields": ("history_shown",)}),
    )
    readonly_fields = (
        "rating_shown",
        "reasons_shown",
        "comment",
        "who",
        "rated_at",
        "reply_facts",
        "conversation_shown",
        "history_shown",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Feedback]:
        return super().get_queryset(request).select_related("version", "assignee", "user")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # What users said is evidence; staff close it, they don't erase it.
        return False

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "assignee":
            from django.contrib.auth import get_user_model

            kwargs["queryset"] = get_user_model().objects.filter(is_staff=True)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def save_model(self, request: HttpRequest, obj: Feedback, form: Any, change: bool) -> None:
        # Review fields only, through the service, so each change is in the history.
        services.feedback_review_update(
            actor_id=request.user.pk,
            feedback_ids=[obj.pk],
            status=form.cleaned_data["review_status"],
            assignee_id=form.cleaned_data["assignee"].pk if form.cleaned_data["assignee"] else None,
            set_assignee=True,
            note=form.cleaned_data["staff_note"],
        )

    # --- columns ---------------------------------------------------------

    @admin.display(description="rating", ordering="rating")
    def rating_shown(self, obj: Feedback) -> str:
        return {1: "👍 up", -1: "👎 down"}.get(obj.rating or 0, "withdrawn")

    @admin.display(description="reasons")
    def reasons_shown(self, obj: Feedback) -> str:
        return ", ".join(r.replace("_", " ") for r in obj.reasons) or "—"

    @admin.display(description="comment")
    def comment_shown(self, obj: Feedback) -> str:
        return obj.comment[:80] + ("…" if len(obj.comment) > 80 else "")

    @admin.display(description="rated by")
    def who(self, obj: Feedback) -> str:
        return obj.user.get_username() if obj.user else "anonymous visitor"

    @admin.display(description="rated at / changed at")
    def rated_at(self, obj: Feedback) -> str:
        return f"{obj.created_at:%Y-%m-%d %H:%M:%S} / {obj.updated_at:%Y-%m-%d %H:%M:%S} UTC"

    @admin.display(description="")
    def reply_facts(self, obj: Feedback) -> SafeString:
        reply = obj.message
        version = obj.version
        version_cell: Any = "settings (no version)"
        if version is not None:
            version_cell = format_html(
                '<a href="{}">v{}</a>',
                reverse("admin:feedback_modelversion_change", args=[version.pk]),
                version.number,
            )
        tokens = f"{reply.prompt_tokens or 0} in / {reply.completion_tokens or 0} out" + (
            " (estimated)" if reply.usage_estimated else ""
        )
        rows = [
            (
                "Reply",
                format_html(
                    '<a href="{}">#{}</a>',
                    reverse("admin:chat_message_change", args=[reply.pk]),
                    reply.pk,
                ),
            ),
            ("Model", reply.model or "—"),
            ("Version", version_cell),
            ("Time to first token", _ms(reply.ttft_ms)),
            ("Latency", _ms(reply.latency_ms)),
            ("Tokens", tokens),
            ("Cost", f"${reply.cost_usd:.6f}"),
            ("Finish reason", reply.get_finish_reason_display() if reply.finish_reason else "—"),
            ("Error code", reply.error_code or "—"),
            ("Moderation verdict", _verdict(reply.moderation)),
            (
                "Call path",
                " → ".join(f"{a.get('model')} ({a.get('outcome')})" for a in reply.call_path)
                or "—",
            ),
            ("Cached", "yes" if reply.cached else "no"),
        ]
        body = format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows)
        return format_html('<table class="reply-facts">{}</table>', body)

    @admin.display(description="")
    def conversation_shown(self, obj: Feedback) -> SafeString:
        lines, omitted = selectors.conversation_context(reply=obj.message)
        head = format_html("<p>{} earlier messages not shown.</p>", omitted) if omitted else ""
        items = format_html_join(
            "",
            # Styled by static/feedback/admin.css: the CSP blocks inline styles.
            '<div class="turn turn-{}{}"><strong>{}{}</strong>'
            '<div class="turn-text">{}</div></div>',
            (
                (
                    line.role,
                    " turn-rated" if line.is_rated else "",
                    line.role,
                    " — the rated reply" if line.is_rated else "",
                    line.content or "(empty)",
                )
                for line in lines
            ),
        )
        return format_html("{}{}", head, items)

    @admin.display(description="")
    def history_shown(self, obj: Feedback) -> SafeString | str:
        events = obj.events.select_related("actor").order_by("id")
        rows = [
            (
                f"{e.created_at:%Y-%m-%d %H:%M:%S}",
                e.actor.get_username() if e.actor else "the user",
                e.get_kind_display(),
                e.before or "—",
                e.after or "—",
            )
            for e in events
        ]
        if not rows:
            return "Nothing yet."
        body = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", rows
        )
        return format_html(
            "<table><tr><th>when</th><th>who</th><th>what</th><th>before</th><th>after</th></tr>"
            "{}</table>",
            body,
        )

    # --- bulk review steps -------------------------------------------------

    def _review(self, request: HttpRequest, queryset: QuerySet[Feedback], **step: Any) -> None:
        changed = services.feedback_review_update(
            actor_id=request.user.pk,
            feedback_ids=list(queryset.values_list("pk", flat=True)),
            **step,
        )
        self.message_user(request, f"{changed} feedback item(s) updated.", messages.SUCCESS)

    @admin.action(description="Mark selected as triaged")
    def mark_triaged(self, request: HttpRequest, queryset: QuerySet[Feedback]) -> None:
        self._review(request, queryset, status=Feedback.Status.TRIAGED)

    @admin.action(description="Mark selected as resolved")
    def mark_resolved(self, request: HttpRequest, queryset: QuerySet[Feedback]) -> None:
        self._review(request, queryset, status=Feedback.Status.RESOLVED)

    @admin.action(description="Mark selected as won't fix")
    def mark_wont_fix(self, request: HttpRequest, queryset: QuerySet[Feedback]) -> None:
        self._review(request, queryset, status=Feedback.Status.WONT_FIX)

    @admin.action(description="Reopen selected (back to new)")
    def mark_new(self, request: HttpRequest, queryset: QuerySet[Feedback]) -> None:
        self._review(request, queryset, status=Feedback.Status.NEW)

    @admin.action(description="Assign selected to me")
    def assign_to_me(self, request: HttpRequest, queryset: QuerySet[Feedback]) -> None:
        self._review(request, queryset, assignee_id=request.user.pk, set_assignee=True)

    @admin.action(description="Unassign selected")
    def unassign(self, request: HttpRequest, queryset: QuerySet[Feedback]) -> None:
        self._review(request, queryset, assignee_id=None, set_assignee=True)

    # --- export ---------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "export/",
                self.admin_site.admin_view(self.export_view),
                name="feedback_feedback_export",
            ),
            *super().get_urls(),
        ]

    def export_view(self, request: HttpRequest) -> HttpResponseBase:
        """Export the filtered set: streamed when small, a Celery job when large."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        format = request.GET.get("format", "jsonl")
        if format not in ExportJob.Format.values:
            raise Http404("unknown export format")
        params = selectors.feedback_filter_params(request.GET)
        total = selectors.feedback_filtered(params=params).count()
        if total > settings.FEEDBACK_EXPORT_STREAM_MAX:
            job = services.export_job_create(actor_id=request.user.pk, format=format, params=params)
            self.message_user(
                request,
                f"{total:,} rows is a large export: it is being written in the background.",
                messages.INFO,
            )
            return HttpResponseRedirect(reverse("admin:feedback_exportjob_change", args=[job.pk]))
        chunks = exports.export_stream(params=params, format=format)
        response = StreamingHttpResponse(
            streamed(request, chunks),
            content_type=exports.content_type(format),
        )
        response["Content-Disposition"] = f'attachment; filename="{exports.file_name(format)}"'
        return response


def _ms(value: int | None) -> str:
    return "—" if value is None else f"{value:,} ms"


def _verdict(moderation: dict[str, Any] | None) -> str:
    if not moderation:
        return "passed"
    score = moderation.get("score")
    shown = f", score {score:.2f}" if isinstance(score, int | float) else ""
    return f"flagged at {moderation.get('stage', '?')}: {moderation.get('category', '?')}{shown}"


@admin.register(ExportJob)
class ExportJobAdmin(admin.ModelAdmin):
    change_form_template = "admin/feedback/exportjob/change_form.html"
    list_display = (
        "id",
        "format",
        "status",
        "progress",
        "total",
        "created_by",
        "created_at",
        "download",
    )
    list_filter = ("status", "format")
    readonly_fields = (
        "format",
        "params",
        "status",
        "progress",
        "total",
        "written",
        "error",
        "created_by",
        "created_at",
        "finished_at",
        "download",
    )
    fields = readonly_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="progress")
    def progress(self, obj: ExportJob) -> str:
        return f"{obj.progress_percent}% ({obj.written:,} of {obj.total:,})"

    @admin.display(description="file")
    def download(self, obj: ExportJob) -> str | SafeString:
        if obj.status != ExportJob.Status.DONE:
            return "—"
        return format_html(
            '<a href="{}">Download {}</a>',
            reverse("admin:feedback_exportjob_download", args=[obj.pk]),
            obj.format.upper(),
        )

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<int:job_id>/download/",
                self.admin_site.admin_view(self.download_view),
                name="feedback_exportjob_download",
            ),
            *super().get_urls(),
        ]

    def download_view(self, request: HttpRequest, job_id: int) -> FileResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        job = ExportJob.objects.filter(pk=job_id, status=ExportJob.Status.DONE).first()
        if job is None or not job.file_name:
            raise Http404("That export is not ready.")
        storage = exports.export_storage()
        if not storage.exists(job.file_name):
            raise Http404("That export's file is gone.")
        return FileResponse(
            storage.open(job.file_name, "rb"),
            as_attachment=True,
            filename=exports.file_name(job.format, stamp=job.created_at),
            content_type=exports.content_type(job.format),
        )
