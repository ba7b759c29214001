"""The monitoring dashboard and alerts, inside the admin (staff only)."""

from __future__ import annotations

import time
from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from monitoring import charts, metrics, selectors
from monitoring.models import Alert, Dashboard, HourlyRollup


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


@admin.register(Dashboard)
class DashboardAdmin(admin.ModelAdmin):
    """Answers /admin/monitoring/dashboard/ with the charts instead of a list."""

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_staff)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        started = time.perf_counter()
        now = timezone.now()
        time_range = selectors.check_time_range(
            name=request.GET.get("range"),
            start=request.GET.get("start"),
            end=request.GET.get("end"),
            now=now,
        )
        data = selectors.dashboard_data(time_range=time_range, now=now)
        fmt = "%m-%d %H:00" if time_range.step.total_seconds() < 86400 else "%Y-%m-%d"
        labels = [p.strftime(fmt) for p in data["points"]]
        latency_charts = []
        for field, title in (
            ("ttft_hist", "Time to first token"),
            ("latency_hist", "Total latency"),
        ):
            totals = data["ttft_totals" if field == "ttft_hist" else "latency_totals"]
            for q in ("p50", "p95", "p99"):
                latency_charts.append(
                    {
                        "title": f"{title} {q} (ms)",
                        "svg": charts.line_chart(
                            labels=labels, series=data["latency"][f"{field}:{q}"], title=title
                        ),
                        "legend": [
                            (m, charts.PALETTE[i % len(charts.PALETTE)], _ms(totals[m][q]))
                            for i, m in enumerate(data["models"])
                        ],
                    }
                )
        context = {
            **self.admin_site.each_context(request),
            "title": "Monitoring dashboard",
            "opts": self.model._meta,
            "range": time_range,
            "ranges": list(selectors.RANGES),
            "d": data,
            "latency_charts": latency_charts,
            "error_chart": charts.line_chart(
                labels=labels,
                series={
                    "error rate %": [
                        None if v is None else v * 100 for v in data["error_rate_series"]
                    ]
                },
                title="Error rate",
            ),
            "errors_chart": charts.bar_chart(
                items=list(data["errors_by_code"].items()), title="Errors by code"
            ),
            "spend_day_chart": charts.bar_chart(
                items=[(f"{day:%Y-%m-%d}", float(v)) for day, v in data["spend_by_day"]][-31:],
                title="Spend by day",
            ),
            "spend_model_chart": charts.bar_chart(
                items=[(m, float(v)) for m, v in data["spend_by_model"].items()],
                title="Spend by model",
            ),
            "moderation_chart": charts.bar_chart(
                items=list(data["moderation_by_category"].items()), title="Moderation blocks"
            ),
            "error_rate": _pct(data["error_rate"]),
            "cache_hit_rate": _pct(data["cache_hit_rate"]),
            "thumbs_up_rate": _pct(data["thumbs_up_rate"]),
            "gauges": metrics.gauges_now(),
            "alerts": selectors.alerts_open(),
        }
        context["render_ms"] = round((time.perf_counter() - started) * 1000)
        return TemplateResponse(request, "admin/monitoring/dashboard.html", context)


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ("title", "kind", "occurrences", "first_seen", "last_seen", "resolved_at")
    list_filter = ("kind", ("resolved_at", admin.EmptyFieldListFilter))
    search_fields = ("key", "title")
    readonly_fields = ("kind", "key", "title", "detail", "occurrences", "first_seen", "last_seen")
    actions = ["resolve"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Mark as resolved")
    def resolve(self, request: HttpRequest, queryset: Any) -> None:
        queryset.filter(resolved_at__isnull=True).update(resolved_at=timezone.now())


@admin.register(HourlyRollup)
class HourlyRollupAdmin(admin.ModelAdmin):
    list_display = ("hour", "model", "version_id", "replies", "errors", "cost_usd")
    list_filter = ("model",)
    date_hierarchy = "hour"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
