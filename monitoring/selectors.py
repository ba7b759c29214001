"""Reads for the dashboard and the health page; everything comes from rollups."""

from __future__ import annotations

import calendar
import datetime as dt
import importlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Sum
from django.utils import timezone

from monitoring.models import Alert, DailyUserSpend, HourlyRollup
from monitoring.rollups import MS_EDGES, hist_merge, hist_percentile

logger = logging.getLogger(__name__)

RANGES = {
    "1h": dt.timedelta(hours=1),
    "24h": dt.timedelta(hours=24),
    "7d": dt.timedelta(days=7),
    "30d": dt.timedelta(days=30),
}
TOP_USERS = 10


@dataclass(frozen=True, slots=True)
class TimeRange:
    start: dt.datetime
    end: dt.datetime
    label: str

    @property
    def step(self) -> dt.timedelta:
        """Return the width of one point on a chart: hours up to two days, else days."""
        return (
            dt.timedelta(hours=1)
            if self.end - self.start <= dt.timedelta(hours=48)
            else dt.timedelta(days=1)
        )


def check_time_range(
    *, name: str | None, start: str | None, end: str | None, now: dt.datetime
) -> TimeRange:
    """Return the range a dashboard URL asks for; unknown input falls back to 24 hours."""
    if name == "custom" and start:
        try:
            begin = dt.datetime.fromisoformat(start)
            finish = dt.datetime.fromisoformat(end) if end else now
            if timezone.is_naive(begin):
                begin = timezone.make_aware(begin, dt.UTC)
            if timezone.is_naive(finish):
                finish = timezone.make_aware(finish, dt.UTC)
            if begin < finish and finish - begin <= dt.timedelta(days=366):
                return TimeRange(begin, finish, "custom")
        except ValueError:
            pass
    key = name if name in RANGES else "24h"
    return TimeRange(now - RANGES[key], now, key)


def _point(moment: dt.datetime, step: dt.timedelta) -> dt.datetime:
    if step >= dt.timedelta(days=1):
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(minute=0, second=0, microsecond=0)


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def dashboard_data(*, time_range: TimeRange, now: dt.datetime) -> dict[str, Any]:
    """Return every number the dashboard shows for a time range."""
    # Rollups are hourly: an hour counts when it started inside the range.
    start = time_range.start.replace(minute=0, second=0, microsecond=0)
    rows = list(
        HourlyRollup.objects.filter(hour__gte=start, hour__lt=time_range.end).only(
            "hour",
            "model",
            "replies",
            "errors",
            "cached",
            "errors_by_code",
            "moderation_by_category",
            "ttft_hist",
            "latency_hist",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
            "thumbs_up",
            "thumbs_down",
            "truncated",
            "empty",
        )
    )
    step = time_range.step
    points: list[dt.datetime] = []
    cursor = _point(start, step)
    while cursor < time_range.end:
        points.append(cursor)
        cursor += step

    models = sorted({r.model for r in rows})
    per_point_model: dict[tuple[dt.datetime, str], list[HourlyRollup]] = defaultdict(list)
    per_point: dict[dt.datetime, list[HourlyRollup]] = defaultdict(list)
    for r in rows:
        p = _point(r.hour, step)
        per_point_model[(p, r.model)].append(r)
        per_point[p].append(r)

    def pct_series(field: str, q: float) -> dict[str, list[float | None]]:
        return {
            m: [
                hist_percentile(
                    hist_merge(
                        (getattr(r, field) for r in per_point_model.get((p, m), [])), MS_EDGES
                    ),
                    MS_EDGES,
                    q,
                )
                for p in points
            ]
            for m in models
        }

    latency: dict[str, dict[str, list[float | None]]] = {}
    for field in ("ttft_hist", "latency_hist"):
        for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
            latency[f"{field}:{name}"] = pct_series(field, q)

    def model_totals(field: str) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for m in models:
            merged = hist_merge((getattr(r, field) for r in rows if r.model == m), MS_EDGES)
            out[m] = {
                name: hist_percentile(merged, MS_EDGES, q)
                for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))
            }
        return out

    replies = sum(r.replies for r in rows)
    errors = sum(r.errors for r in rows)
    errors_by_code: dict[str, int] = defaultdict(int)
    moderation: dict[str, int] = defaultdict(int)
    for r in rows:
        for code, n in r.errors_by_code.items():
            errors_by_code[code] += n
        for category, n in r.moderation_by_category.items():
            moderation[category] += n
    error_rate_series = [
        _rate(sum(r.errors for r in per_point[p]), sum(r.replies for r in per_point[p]))
        for p in points
    ]
    spend_by_model: dict[str, Decimal] = defaultdict(Decimal)
    for r in rows:
        spend_by_model[r.model] += r.cost_usd
    day_start = _point(start, dt.timedelta(days=1))
    days: list[dt.date] = []
    d = day_start
    while d < time_range.end:
        days.append(d.date())
        d += dt.timedelta(days=1)
    spend_by_day_map: dict[dt.date, Decimal] = defaultdict(Decimal)
    for r in rows:
        spend_by_day_map[r.hour.date()] += r.cost_usd
    thumbs_up = sum(r.thumbs_up for r in rows)
    thumbs_down = sum(r.thumbs_down for r in rows)
    total_spend = sum((r.cost_usd for r in rows), Decimal("0"))
    return {
        "points": points,
        "models": models,
        "latency": latency,
        "ttft_totals": model_totals("ttft_hist"),
        "latency_totals": model_totals("latency_hist"),
        "replies": replies,
        "errors": errors,
        "error_rate": _rate(errors, replies),
        "error_rate_series": error_rate_series,
        "errors_by_code": dict(sorted(errors_by_code.items(), key=lambda kv: -kv[1])),
        "moderation_by_category": dict(sorted(moderation.items(), key=lambda kv: -kv[1])),
        "cache_hit_rate": _rate(sum(r.cached for r in rows), replies),
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "completion_tokens": sum(r.completion_tokens for r in rows),
        "spend_total": total_spend,
        "spend_by_model": dict(sorted(spend_by_model.items(), key=lambda kv: -kv[1])),
        "spend_by_day": [(day, spend_by_day_map.get(day, Decimal("0"))) for day in days],
        "top_users": spend_top_users(start=time_range.start.date(), end=time_range.end.date()),
        "month": spend_month_projection(now=now),
        "thumbs_up": thumbs_up,
        "thumbs_down": thumbs_down,
        "thumbs_up_rate": _rate(thumbs_up, thumbs_up + thumbs_down),
    }


def spend_top_users(
    *, start: dt.date, end: dt.date, limit: int = TOP_USERS
) -> list[dict[str, Any]]:
    """Return the users who spent most between two days (inclusive), biggest first."""
    rows = list(
        DailyUserSpend.objects.filter(day__gte=start, day__lte=end)
        .values("user_id")
        .annotate(cost=Sum("cost_usd"), replies=Sum("replies"), tokens=Sum("tokens"))
        .order_by("-cost")[:limit]
    )
    names = dict(
        get_user_model()
        .objects.filter(pk__in=[r["user_id"] for r in rows if r["user_id"]])
        .values_list("pk", "username")
    )
    return [
        {
            "user": names.get(r["user_id"], f"#{r['user_id']}") if r["user_id"] else "anonymous",
            "cost": r["cost"],
            "replies": r["replies"],
            "tokens": r["tokens"],
        }
        for r in rows
    ]


def spend_month_projection(*, now: dt.datetime) -> dict[str, Any]:
    """Return the month's spend so far and a straight-line projection to its end."""
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spent = HourlyRollup.objects.filter(hour__gte=month_start, hour__lt=now).aggregate(
        total=Sum("cost_usd")
    )["total"] or Decimal("0")
    days_in_month = calendar.monthrange(now.year, now.month)[1]
    elapsed = (now - month_start).total_seconds() / 86400
    projected = spent / Decimal(str(elapsed)) * days_in_month if elapsed > 0 else spent
    return {"spent": spent, "projected": projected.quantize(Decimal("0.0001"))}


def last_hour_summary(*, now: dt.datetime) -> dict[str, Any]:
    """Return the error rate and p95 latency of the replies rolled up in the last hour."""
    rows = list(HourlyRollup.objects.filter(hour__gte=now - dt.timedelta(hours=1)))
    replies = sum(r.replies for r in rows)
    errors = sum(r.errors for r in rows)
    latency = hist_merge((r.latency_hist for r in rows), MS_EDGES)
    ttft = hist_merge((r.ttft_hist for r in rows), MS_EDGES)
    return {
        "replies": replies,
        "error_rate": _rate(errors, replies),
        "p95_latency_ms": hist_percentile(latency, MS_EDGES, 0.95),
        "p95_ttft_ms": hist_percentile(ttft, MS_EDGES, 0.95),
    }


def alerts_open(*, limit: int = 20) -> list[Alert]:
    return list(Alert.objects.filter(resolved_at__isnull=True).order_by("-last_seen")[:limit])


def breaker_states() -> dict[str, str]:
    """Return each model's circuit-breaker state, or {} while chat.breaker has none."""
    try:
        module = importlib.import_module("chat.breaker")
        states = module.breaker_states()
        return {str(k): str(v) for k, v in dict(states).items()}
    except ModuleNotFoundError:
        return {}
    except Exception:
        logger.warning("breaker states could not be read", exc_info=True)
        return {}


def circuits_open() -> dict[str, bool] | None:
    """Return whether each model's breaker is open, or None while its shared state is unreadable."""
    try:
        module = importlib.import_module("chat.breaker")
        states = module.circuits_open()
        return {str(k): bool(v) for k, v in dict(states).items()}
    except ModuleNotFoundError:
        return {}
    except Exception as exc:
        logger.warning("circuit breakers could not be read for /metrics: %r", exc)
        return None
