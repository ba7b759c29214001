from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from chat.errors import ChatError
from chat.models import Conversation, Message, Price
from chat.response_cache import cache_enabled, cache_switch
from chat.staff_replay import reply_replay
from feedback.models import ModelVersion
from feedback.versions import as_active as version_as_active
from feedback.versions import settings_profile


class MessageInline(admin.TabularInline):
    model = Message
    fk_name = "conversation"
    extra = 0
    can_delete = False
    show_change_link = True
    fields = ("role", "content", "finish_reason", "model", "ttft_ms", "latency_ms", "created_at")
    readonly_fields = fields
    ordering = ("id",)

    def has_add_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("id", "title", "user", "created_at", "updated_at")
    list_filter = ("created_at",)
    search_fields = ("title", "user__username", "messages__content")
    readonly_fields = ("user", "session_key", "title", "created_at", "updated_at")
    inlines = [MessageInline]
    date_hierarchy = "created_at"
    show_full_result_count = False

    def has_add_permission(self, request):  # type: ignore[no-untyped-def]
        return False


class InjectionFilter(admin.SimpleListFilter):
    title = "prompt-injection score"
    parameter_name = "injection"

    def lookups(self, request, model_admin):  # type: ignore[no-untyped-def]
        return [("suspicious", "suspicious (≥ 0.5)"), ("likely", "likely (≥ 0.8)")]

    def queryset(self, request, queryset):  # type: ignore[no-untyped-def]
        threshold = {"suspicious": 0.5, "likely": 0.8}.get(self.value() or "")
        return queryset if threshold is None else queryset.filter(injection_score__gte=threshold)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "conversation",
        "role",
        "short_content",
        "status",
        "finish_reason",
        "model",
        "ttft_ms",
        "latency_ms",
        "cost_usd",
        "cached",
        "injection_score",
        "created_at",
    )
    list_filter = (
        "role",
        "status",
        "finish_reason",
        "model",
        "error_code",
        "cached",
        "usage_estimated",
        InjectionFilter,
    )
    search_fields = ("content",)
    list_select_related = ("conversation",)
    readonly_fields = [*(f.name for f in Message._meta.fields), "replay_link"]
    show_full_result_count = False
    change_list_template = "admin/chat/message/change_list.html"

    def get_urls(self):  # type: ignore[no-untyped-def]
        extra = [
            path(
                "response-cache/",
                self.admin_site.admin_view(self.response_cache_view),
                name="chat_response_cache",
            ),
            path(
                "<int:message_id>/replay/",
                self.admin_site.admin_view(self.replay_view),
                name="chat_message_replay",
            ),
        ]
        return extra + super().get_urls()

    def replay_view(self, request: HttpRequest, message_id: int) -> HttpResponse:
        """Ask a version the reply's question again (the prompt may be edited)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        reply = get_object_or_404(
            Message.objects.select_related("reply_to"), pk=message_id, role=Message.Role.ASSISTANT
        )
        versions = list(ModelVersion.objects.order_by("-number")[:50])
        prompt = reply.reply_to.content if reply.reply_to else ""
        chosen = ""
        result = None
        refusal = ""
        if request.method == "POST":
            prompt = request.POST.get("prompt", "")
            chosen = request.POST.get("version", "")
            version = next((v for v in versions if str(v.pk) == chosen), None)
            profile = version_as_active(version) if version else settings_profile()
            try:
                result = reply_replay(reply=reply, prompt=prompt, version=profile)
            except ChatError as exc:
                refusal = exc.user_message
        context = {
            **self.admin_site.each_context(request),
            "title": f"Replay reply #{reply.pk}",
            "reply": reply,
            "prompt": prompt,
            "versions": versions,
            "chosen": chosen,
            "result": result,
            "refusal": refusal,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/chat/message/replay.html", context)

    def response_cache_view(self, request: HttpRequest) -> HttpResponse:
        """Show and switch the response cache for every process at once."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            if not request.user.has_perm("chat.change_message"):
                raise PermissionDenied
            enabled = request.POST.get("enabled") == "1"
            cache_switch(enabled=enabled)
            self.message_user(request, f"The response cache is now {'on' if enabled else 'off'}.")
            return redirect("admin:chat_response_cache")
        context = {
            **self.admin_site.each_context(request),
            "title": "Response cache",
            "enabled": cache_enabled(),
            "configured": settings.CHAT_RESPONSE_CACHE,
            "ttl_hours": settings.CHAT_RESPONSE_CACHE_TTL_SECONDS / 3600,
            "semantic": settings.CHAT_SEMANTIC_CACHE,
            "semantic_threshold": settings.CHAT_SEMANTIC_CACHE_THRESHOLD,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/chat/response_cache.html", context)

    @admin.display(description="replay")
    def replay_link(self, obj: Message) -> str:
        if obj.role != Message.Role.ASSISTANT or obj.reply_to_id is None:
            return "—"
        return format_html(
            '<a href="{}">Ask a version again</a>',
            reverse("admin:chat_message_replay", args=[obj.pk]),
        )

    @admin.display(description="content")
    def short_content(self, obj: Message) -> str:
        return obj.content[:80] + ("…" if len(obj.content) > 80 else "")

    def has_add_permission(self, request):  # type: ignore[no-untyped-def]
        return False

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        # Staff can open a message but never rewrite what was said.
        return request.method in ("GET", "HEAD") and super().has_change_permission(request, obj)


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    """Staff keep prices current by adding a row with a later effective date;
    editing an old row would change what past replies are shown to have cost."""

    list_display = (
        "model",
        "input_per_mtok",
        "output_per_mtok",
        "cached_input_per_mtok",
        "effective_from",
    )
    list_filter = ("model",)
    search_fields = ("model",)
    ordering = ("model", "-effective_from")
    date_hierarchy = "effective_from"


# --- Abuse blocks (chat/safety/limits.py) --------------------------------------
from django.db.models import QuerySet  # noqa: E402
from django.http import HttpRequest  # noqa: E402
from django.utils import timezone  # noqa: E402

from chat.models import AbuseBlock  # noqa: E402
from chat.safety import limits  # noqa: E402


class AbuseBlockActiveFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):  # type: ignore[no-untyped-def]
        return [("active", "Active"), ("ended", "Expired or lifted")]

    def queryset(self, request, queryset):  # type: ignore[no-untyped-def]
        active = {"lifted_at__isnull": True, "expires_at__gt": timezone.now()}
        if self.value() == "active":
            return queryset.filter(**active)
        if self.value() == "ended":
            return queryset.exclude(**active)
        return queryset


@admin.register(AbuseBlock)
class AbuseBlockAdmin(admin.ModelAdmin):
    list_display = (
        "subject",
        "reason",
        "is_active",
        "created_at",
        "expires_at",
        "lifted_at",
        "lifted_by",
    )
    list_filter = (AbuseBlockActiveFilter, "created_at")
    search_fields = ("subject", "reason")
    ordering = ("-created_at",)
    readonly_fields = ("created_at", "lifted_at", "lifted_by")
    actions = ["lift_blocks"]

    @admin.display(boolean=True, description="active")
    def is_active(self, obj: AbuseBlock) -> bool:
        return obj.lifted_at is None and obj.expires_at > timezone.now()

    @admin.action(description="Lift the selected blocks now")
    def lift_blocks(self, request: HttpRequest, queryset: QuerySet[AbuseBlock]) -> None:
        lifted = limits.abuse_block_lift(
            block_ids=list(queryset.values_list("pk", flat=True)), by_user_id=request.user.pk
        )
        self.message_user(request, f"Lifted {lifted} block{'s' if lifted != 1 else ''}.")
