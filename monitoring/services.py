"""Writes: rollups, alerts, the reaper, retention and the worker heartbeat.

Every function here is safe to run twice, or twice at once (Celery may
redeliver): a rollup replaces its hour whole, the later of two overlapping
runs' rows winning, an alert with an open twin is counted on it, the
reaper finishes replies through the status-guarded `reply_finish`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from decimal import Decimal
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.cache import caches
from django.db import IntegrityError, transaction
from django.db.models import CharField, Count, F, Sum, Value
from django.db.models.functions import Cast, Coalesce, Concat, Length
from django.utils import timezone

from chat.models import Conversation, Message
from chat.services import reply_finish
from monitoring import drift, metrics
from monitoring.health import HEARTBEAT_KEY
from monitoring.models import Alert, DailyUserSpend, HourlyRollup
from monitoring.rollups import CHAR_EDGES, MS_EDGES, hist_add, hist_merge, hist_new

logger = logging.getLogger(__name__)


def hour_floor(moment: dt.datetime) -> dt.datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def _feedback_by_group(
    start: dt.datetime, end: dt.datetime
) -> dict[tuple[dt.datetime, str, int], list[int]]:
    """Return {(hour, model, version_id): [up, down]} for replies created in the window.

    Feedback rows belong to the feedback app, which may not have them yet;
    without them thumbs stay at zero rather than breaking the rollup.
    """
    try:
        feedback = apps.get_model("feedback", "Feedback")
        rows = feedback.objects.filter(
            message__created_at__gte=start, message__created_at__lt=end
        ).values_list("message__created_at", "message__model", "message__version_id", "rating")
        counts: dict[tuple[dt.datetime, str, int], list[int]] = defaultdict(lambda: [0, 0])
        for created_at, model, version_id, rating in rows.iterator(chunk_size=5000):
            counts[(hour_floor(created_at), model, version_id or 0)][0 if rating > 0 else 1] += 1
        return counts
    except LookupError:
        return {}
    except Exception:
        logger.warning("rollup: feedback could not be read", exc_info=True)
        return {}


def _rollup_rows(start: dt.datetime, end: dt.datetime) -> Iterator[tuple[Any, ...]]:
    return (
        Message.objects.filter(
            role=Message.Role.ASSISTANT,
            status=Message.Status.FINISHED,
            created_at__gte=start,
            created_at__lt=end,
        )
        # The length in SQL: reply text never leaves the database here.
        .annotate(chars=Length("content"))
        .values_list(
            "created_at",
            "model",
            "version_id",
            "finish_reason",
            "error_code",
            "ttft_ms",
            "latency_ms",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
            "cached",
            "moderation",
            "chars",
        )
        .iterator(chunk_size=5000)
    )


def _accumulate(
    rows: Iterable[tuple[Any, ...]],
) -> dict[tuple[dt.datetime, str, int], HourlyRollup]:
    groups: dict[tuple[dt.datetime, str, int], HourlyRollup] = {}
    for (
        created_at,
        model,
        version_id,
        finish_reason,
        error_code,
        ttft_ms,
        latency_ms,
        prompt_tokens,
        completion_tokens,
        cost_usd,
        cached,
        moderation,
        chars,
    ) in rows:
        hour = hour_floor(created_at)
        key = (hour, model, version_id or 0)
        r = groups.get(key)
        if r is None:
            r = groups[key] = HourlyRollup(
                hour=hour,
                model=model,
                version_id=version_id or 0,
                ttft_hist=hist_new(MS_EDGES),
                latency_hist=hist_new(MS_EDGES),
                length_hist=hist_new(CHAR_EDGES),
                errors_by_code={},
                moderation_by_category={},
                cost_usd=Decimal("0"),
            )
        r.replies += 1
        if finish_reason == "error":
            r.errors += 1
            code = error_code or "internal"
            r.errors_by_code[code] = r.errors_by_code.get(code, 0) + 1
        elif finish_reason == "length":
            r.truncated += 1
        elif finish_reason == "cancelled":
            r.cancelled += 1
        elif finish_reason == "moderated":
            r.moderated += 1
        if moderation:
            category = str(moderation.get("category") or "unknown")[:40]
            r.moderation_by_category[category] = r.moderation_by_category.get(category, 0) + 1
        if not chars and finish_reason != "cancelled":
            r.empty += 1
        if cached:
            r.cached += 1
        if ttft_ms is not None:
            hist_add(r.ttft_hist, MS_EDGES, ttft_ms)
        if latency_ms is not None:
            hist_add(r.latency_hist, MS_EDGES, latency_ms)
        if finish_reason in ("stop", "length"):
            hist_add(r.length_hist, CHAR_EDGES, chars or 0)
        r.prompt_tokens += prompt_tokens or 0
        r.completion_tokens += completion_tokens or 0
        r.cost_usd += cost_usd or Decimal("0")
    return groups


def _rollups_replace(start: dt.datetime, end: dt.datetime) -> int:
    groups = _accumulate(_rollup_rows(start, end))
    for key, (up, down) in _feedback_by_group(start, end).items():
        if key in groups:
            groups[key].thumbs_up, groups[key].thumbs_down = up, down
    # Readers see the old hours or the new ones, never half of each.
    with transaction.atomic():
        HourlyRollup.objects.filter(hour__gte=start, hour__lt=end).delete()
        _insert_replacing(HourlyRollup, list(groups.values()), key=["hour", "model", "version_id"])
    return len(groups)


def _insert_replacing(model: Any, rows: list[Any], *, key: list[str]) -> None:
    """Insert rows; one whose `key` another run wrote meanwhile replaces that run's.

    Two runs may overlap (a slow run and the next one, a redelivered task
    beside its first delivery): on PostgreSQL each deletes what was there
    when its DELETE began, so the later one to insert would find the
    other's new rows and fail on the unique key. The later write wins
    instead; both computed the rows from the replies, and the next run
    computes them again.
    """
    fields = [
        f.name for f in model._meta.concrete_fields if not f.primary_key and f.name not in key
    ]
    model.objects.bulk_create(
        rows, batch_size=1000, update_conflicts=True, unique_fields=key, update_fields=fields
    )


def rollup_hour(*, hour: dt.datetime) -> int:
    """Recompute one hour's rollups from the replies; return how many rows it wrote."""
    start = hour_floor(hour)
    return _rollups_replace(start, start + dt.timedelta(hours=1))


def rollups_rebuild(*, start: dt.datetime, end: dt.datetime) -> int:
    """Recompute every hour and day between two moments in one pass (backfills)."""
    first = start.replace(hour=0, minute=0, second=0, microsecond=0)
    written = _rollups_replace(first, end)
    day = first.date()
    while day <= end.date():
        user_spend_day(day=day)
        day += dt.timedelta(days=1)
    return written


def user_spend_day(*, day: dt.date) -> int:
    """Recompute one day's spend per user; return how many rows it wrote."""
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    end = start + dt.timedelta(days=1)
    rows = (
        Message.objects.filter(
            role=Message.Role.ASSISTANT,
            status=Message.Status.FINISHED,
            created_at__gte=start,
            created_at__lt=end,
        )
        .values("conversation__user_id")
        .annotate(
            n_replies=Count("pk"),
            cost=Coalesce(Sum("cost_usd"), Decimal("0")),
            tokens=Coalesce(Sum("prompt_tokens"), 0) + Coalesce(Sum("completion_tokens"), 0),
        )
    )
    spend = [
        DailyUserSpend(
            day=day,
            user_id=r["conversation__user_id"] or 0,
            replies=r["n_replies"],
            tokens=r["tokens"],
            cost_usd=r["cost"],
        )
        for r in rows
    ]
    # The day is replaced whole, like an hour's rollup.
    with transaction.atomic():
        DailyUserSpend.objects.filter(day=day).delete()
        _insert_replacing(DailyUserSpend, spend, key=["day", "user_id"])
    return len(spend)


def rollups_refresh(*, now: dt.datetime | None = None, hours: int = 3) -> None:
    """Recompute the last few hours (replies finish after the hour they started in)."""
    now = now or timezone.now()
    days = set()
    for back in range(hours):
        hour = hour_floor(now) - dt.timedelta(hours=back)
        rollup_hour(hour=hour)
        days.add(hour.date())
    for day in days:
        user_spend_day(day=day)


def alert_raise(*, kind: str, key: str, title: str, detail: dict[str, Any]) -> Alert:
    """Open an alert, or count one more occurrence on the open alert with this key.

    Only a new alert is logged and sent to Sentry: a condition that persists
    for days is one alert, not one a run.
    """
    now = timezone.now()
    existing = Alert.objects.filter(key=key, resolved_at__isnull=True).first()
    if existing is None:
        try:
            # The unique open-key constraint decides a race between two runs.
            with transaction.atomic():
                alert = Alert.objects.create(
                    kind=kind, key=key, title=title, detail=detail, last_seen=now
                )
        except IntegrityError:
            existing = Alert.objects.filter(key=key, resolved_at__isnull=True).first()
            if existing is None:
                raise
        else:
            logger.warning("alert: %s", title, extra={"alert_key": key, "detail": detail})
            from monitoring.sentry import capture_message

            capture_message(f"alert: {title}", level="warning")
            return alert
    Alert.objects.filter(pk=existing.pk).update(
        occurrences=F("occurrences") + 1, last_seen=now, detail=detail, title=title
    )
    existing.refresh_from_db()
    return existing


def alerts_resolve(*, kind: str, keep_keys: set[str], prefix: str = "") -> int:
    """Resolve open alerts of a kind whose condition no longer holds."""
    return (
        Alert.objects.filter(kind=kind, resolved_at__isnull=True, key__startswith=prefix)
        .exclude(key__in=keep_keys)
        .update(resolved_at=timezone.now())
    )


def _window(rows: list[HourlyRollup]) -> drift.WindowStats:
    return drift.WindowStats(
        replies=sum(r.replies for r in rows),
        errors=sum(r.errors for r in rows),
        moderated=sum(r.moderated for r in rows),
        empty_or_truncated=sum(r.empty + r.truncated for r in rows),
        thumbs_up=sum(r.thumbs_up for r in rows),
        thumbs_down=sum(r.thumbs_down for r in rows),
        ttft_hist=hist_merge((r.ttft_hist for r in rows), MS_EDGES),
        length_hist=hist_merge((r.length_hist for r in rows), CHAR_EDGES),
    )


def drift_check(*, now: dt.datetime | None = None) -> list[Alert]:
    """Compare each version's last 24 hours with its previous 7 days; alert on drift."""
    now = now or timezone.now()
    split = hour_floor(now) + dt.timedelta(hours=1) - dt.timedelta(hours=24)
    start = split - dt.timedelta(days=7)
    by_version: dict[int, tuple[list[HourlyRollup], list[HourlyRollup]]] = defaultdict(
        lambda: ([], [])
    )
    for r in HourlyRollup.objects.filter(hour__gte=start):
        by_version[r.version_id][0 if r.hour >= split else 1].append(r)
    policy = drift.DriftPolicy(
        alpha=settings.MONITORING_DRIFT_ALPHA,
        min_recent=settings.MONITORING_DRIFT_MIN_RECENT,
        min_baseline=settings.MONITORING_DRIFT_MIN_BASELINE,
    )
    raised: list[Alert] = []
    firing: set[str] = set()
    for version_id, (recent, baseline) in sorted(by_version.items()):
        for finding in drift.drift_findings(_window(recent), _window(baseline), policy):
            key = f"drift:v{version_id}:{finding.metric}"
            firing.add(key)
            raised.append(
                alert_raise(
                    kind=Alert.Kind.DRIFT,
                    key=key,
                    title=(
                        f"Drift on version {version_id}: {finding.metric} "
                        f"{finding.baseline:.4g} → {finding.recent:.4g}"
                    ),
                    detail={"version_id": version_id, **finding.as_json()},
                )
            )
    alerts_resolve(kind=Alert.Kind.DRIFT, keep_keys=firing)
    return raised


# After midnight, the day that just ended is checked again for this long: the
# check runs every ten minutes, so spend that passed the threshold in a day's
# last minutes would otherwise be seen by no run.
SPEND_CHECK_LOOKBACK = dt.timedelta(hours=1)


def spend_check(*, now: dt.datetime | None = None) -> Alert | None:
    """Alert when a day's spend passes MONITORING_DAILY_SPEND_ALERT_USD; return today's alert.

    Today so far, and in the first hour after midnight the whole of
    yesterday too, unless it has its alert already.
    """
    threshold = settings.MONITORING_DAILY_SPEND_ALERT_USD
    if threshold is None:
        return None
    now = now or timezone.now()
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    yesterday = day_start - dt.timedelta(days=1)
    if (
        now - day_start < SPEND_CHECK_LOOKBACK
        and not Alert.objects.filter(key=_spend_key(yesterday)).exists()
    ):
        _spend_alert(day_start=yesterday, until=day_start, threshold=threshold)
    return _spend_alert(day_start=day_start, until=now, threshold=threshold)


def _spend_key(day_start: dt.datetime) -> str:
    return f"spend:{day_start:%Y-%m-%d}"


def _spend_alert(*, day_start: dt.datetime, until: dt.datetime, threshold: float) -> Alert | None:
    spent = Message.objects.filter(
        role=Message.Role.ASSISTANT, created_at__gte=day_start, created_at__lt=until
    ).aggregate(total=Coalesce(Sum("cost_usd"), Decimal("0")))["total"]
    if spent <= Decimal(str(threshold)):
        return None
    return alert_raise(
        kind=Alert.Kind.SPEND,
        key=_spend_key(day_start),
        title=f"Spend on {day_start:%Y-%m-%d} passed ${threshold:.2f}",
        detail={"spent_usd": float(spent), "threshold_usd": float(threshold)},
    )


def reply_seen_text(*, reply_id: int) -> str | None:
    """Return the text a reply's user saw: its Redis replay stream when scaled,
    else (or once that has expired) the text kept for the reaper in the cache:
    a dead process's last checkpoint, or a finished reply that could not be
    stored."""
    from django.core.cache import cache

    from chat.replay import partial_key

    streamed = _replay_stream_text(reply_id) if settings.REDIS_URL else None
    if streamed:
        return streamed
    try:
        text = cache.get(partial_key(reply_id))
    except Exception:
        logger.warning("reaper: kept text of reply %s unreadable", reply_id, exc_info=True)
        return None
    return text if isinstance(text, str) and text else None


def _replay_stream_text(reply_id: int) -> str | None:
    try:
        import redis

        client = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=3
        )
        try:
            entries: list[Any] = client.xrange(f"chat:replay:{reply_id}")  # type: ignore[assignment]  # sync client
        finally:
            client.close()
    except Exception:
        logger.warning("reaper: replay stream of reply %s unreadable", reply_id, exc_info=True)
        return None
    texts: dict[int, str] = {}
    for _entry_id, fields in entries:
        if b"seq" in fields and b"text" in fields:
            texts[int(fields[b"seq"])] = fields[b"text"].decode()
    return "".join(texts[s] for s in sorted(texts)) if texts else None


def reply_fail_interrupted(
    *,
    reply_id: int,
    model: str,
    created_at: dt.datetime,
    text: str,
    now: dt.datetime | None = None,
) -> bool:
    """Fail a reply whose process died mid-reply, keeping `text`; return False if it was finished.

    The one way such a reply ends, whether the reaper finds it late or a
    resume finds it at once: `unavailable`, no usage or cost (nothing was
    measured), and counted in the metrics only by the finisher that wins
    the status-guarded `reply_finish`.
    """
    now = now or timezone.now()
    latency_ms = max(int((now - created_at).total_seconds() * 1000), 0)
    if not reply_finish(
        reply_id=reply_id,
        content=text,
        finish_reason=Message.FinishReason.ERROR,
        model=model,
        ttft_ms=None,
        latency_ms=latency_ms,
        prompt_tokens=None,
        completion_tokens=None,
        cost_usd=Decimal("0"),
        error_code="unavailable",
    ):
        return False
    metrics.reply_observed(
        model=model,
        outcome="error",
        ttft_s=None,
        duration_s=latency_ms / 1000,
        prompt_tokens=0,
        completion_tokens=0,
        cost_usd=0.0,
        error_code="unavailable",
    )
    return True


def reply_recover(*, reply_id: int, seen_text: str | None = None) -> Message:
    """Fail a pending reply whose process is known to be gone; return the row as stored.

    Called when a resume finds nobody generating the reply: in the embedded
    mode its one server process does not know it (so the process that began
    it has died), in the scaled mode the process writing its stream has
    stopped proving it lives. `seen_text` is what its stream held, when the
    caller has read it; otherwise it is read as the reaper reads it (the
    embedded checkpoint). A reply that is no longer pending is returned as is.
    """
    reply = Message.objects.get(pk=reply_id)
    if reply.status != Message.Status.PENDING:
        return reply
    if seen_text is None:
        seen_text = reply_seen_text(reply_id=reply_id)
    if reply_fail_interrupted(
        reply_id=reply_id,
        model=reply.model,
        created_at=reply.created_at,
        text=seen_text or reply.content,
    ):
        logger.warning("resume: reply %s left pending by a dead process failed", reply_id)
    return Message.objects.get(pk=reply_id)


def replies_reap(*, now: dt.datetime | None = None, limit: int = 500) -> list[int]:
    """Fail replies left pending by a process that died; return their ids.

    A reply is pending at most CHAT_REPLY_MAX_SECONDS while someone works on
    it; past MONITORING_REAP_AFTER_S nobody is. The text the user saw is kept
    (read back from the replay stream when scaled). `reply_finish` only moves
    a pending reply, so a live finisher racing with us wins or loses cleanly.
    Most such replies are failed sooner, when their page resumes them
    (`reply_recover`); the reaper finds those nobody came back for.
    """
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=settings.MONITORING_REAP_AFTER_S)
    stale = list(
        Message.objects.filter(
            status=Message.Status.PENDING, role=Message.Role.ASSISTANT, created_at__lt=cutoff
        )
        .order_by("created_at")
        .values_list("pk", "content", "model", "created_at")[:limit]
    )
    reaped = []
    for pk, content, model, created_at in stale:
        text = reply_seen_text(reply_id=pk) or content
        if reply_fail_interrupted(
            reply_id=pk, model=model, created_at=created_at, text=text, now=now
        ):
            reaped.append(pk)
    if reaped:
        logger.warning("reaper: %d reply(ies) left pending by a dead process failed", len(reaped))
    return reaped


def conversations_expire(*, now: dt.datetime | None = None, batch: int = 500) -> int:
    """Delete or anonymise conversations idle past MONITORING_RETENTION_DAYS; return the count."""
    days = settings.MONITORING_RETENTION_DAYS
    if not days:
        return 0
    now = now or timezone.now()
    cutoff = now - dt.timedelta(days=days)
    done = 0
    while True:
        ids = list(
            Conversation.objects.filter(updated_at__lt=cutoff)
            .exclude(session_key=ANONYMISED)
            .values_list("pk", flat=True)[:batch]
        )
        if not ids:
            return done
        # A conversation goes whole or not at all, batch by batch.
        with transaction.atomic():
            conversations_retire(conversation_ids=ids)
        done += len(ids)


def conversations_retire(*, conversation_ids: list[int]) -> None:
    """Delete or anonymise these conversations, as MONITORING_RETENTION_MODE says.

    The one rule for conversations that must go, whether they expired or
    their owner deleted the account (chat/account.py). Run it in a
    transaction: the messages and the feedback go with their conversation.
    """
    if settings.MONITORING_RETENTION_MODE == "anonymise":
        # Numbers (tokens, cost, latency) stay for the dashboards;
        # everything a person wrote or could be found by goes. The
        # idempotency key goes with its owner: clients choose it, so two
        # people's may be equal, and ("", same id) twice would break its
        # unique constraint and stop retention for good.
        Message.objects.filter(conversation_id__in=conversation_ids).update(
            content="", owner_key="", client_msg_id=None, injection_signals=[]
        )
        Conversation.objects.filter(pk__in=conversation_ids).update(
            user=None, session_key=ANONYMISED, title=""
        )
        _anonymise_feedback(conversation_ids)
    else:
        Conversation.objects.filter(pk__in=conversation_ids).delete()


# The owner of an anonymised conversation: no user, no session.
ANONYMISED = "anonymised"


def _anonymise_feedback(conversation_ids: list[int]) -> None:
    """Keep the ratings and reasons of these conversations' replies; drop who and what was written.

    The comment, the staff note and the review history's before/after (which
    quote the comment) go; so does who rated. The rating, its reasons (from a
    fixed list), model, version and review status stay for the scorecards.
    Each row's owner becomes its own placeholder, as one per owner and reply
    is allowed.
    """
    if not apps.is_installed("feedback"):
        return
    feedback = apps.get_model("feedback", "Feedback")
    review_event = apps.get_model("feedback", "ReviewEvent")
    rows = feedback.objects.filter(message__conversation_id__in=conversation_ids)
    review_event.objects.filter(feedback__in=rows).update(before="", after="")
    rows.update(
        user=None,
        owner_key=Concat(Value(f"{ANONYMISED}:"), Cast("pk", output_field=CharField())),
        comment="",
        staff_note="",
    )


def heartbeat_write() -> float:
    """Record that a worker ran a task just now (read by /health/ready)."""
    beat = time.time()
    caches[settings.HEALTH_CACHE_ALIAS].set(HEARTBEAT_KEY, beat, timeout=None)
    metrics.process_sample()
    return beat
