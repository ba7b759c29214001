from django.contrib import admin

from chat.models import Conversation, Message


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
        "created_at",
    )
    list_filter = ("role", "status", "finish_reason", "model", "error_code")
    search_fields = ("content",)
    list_select_related = ("conversation",)
    readonly_fields = [f.name for f in Message._meta.fields]
    show_full_result_count = False

    @admin.display(description="content")
    def short_content(self, obj: Message) -> str:
        return obj.content[:80] + ("…" if len(obj.content) > 80 else "")

    def has_add_permission(self, request):  # type: ignore[no-untyped-def]
        return False

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        # Staff can open a message but never rewrite what was said.
        return request.method in ("GET", "HEAD") and super().has_change_permission(request, obj)
