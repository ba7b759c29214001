"""Reads: ratings for the page, the review desk's filtered set, context, scorecards."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connections
from django.db.models import Model, QuerySet
from django.utils import timezone

from chat.models import Message
from chat.owners import Owner
from feedback import stats
from feedback.models import Feedback, ModelVersion, VersionRollup, VersionSplit
from feedback.services import feedback_owner_key

# The desk's filter parameters, shared by the admin list and exports.
FILTER_PARAMS = (
    "rating",
    "reason",
    "model",
    "version",
    "status",
    "has_comment",
    "assignee",
    "created_from",
    "created_to",
    "q",
)
SIGNIFICANCE = 0.05


def ratings_for(*, owner: Owner, message_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Return the owner's current ratings of these messages, keyed by message id."""
    if not message_ids:
        return {}
    rows = Feedback.objects.filter(
        owner_key=feedback_owner_key(owner),
        message_id__in=message_ids,
        rating__isnull=False,
    ).values("message_id", "rating", "reasons", "comment")
    return {
        r["message_id"]: {"rating": r["rating"], "reasons": r["reasons"], "comment": r["comment"]}
        for r in rows
    }


def reason_choices() -> dict[str, list[str]]:
    """Return the reason chips the page offers: {"up": [...], "down": [...]} (settings)."""
    return {
        "up": list(settings.FEEDBACK_REASONS_UP),
        "down": list(settings.FEEDBACK_REASONS_DOWN),
    }


def feedback_filter(queryset: QuerySet[Feedback], *, name: str, value: str) -> QuerySet[Feedback]:
    """Apply one desk filter; unknown names and unreadable values change nothing.

    Unreadable includes what a database would refuse rather than answer: an
    id past its column's range, a day whose bound a datetime cannot hold,
    text with a NUL in it (see `_readable`).
    """
    if not _readable(value):
        return queryset
    if name == "rating":
        if value == "withdrawn":
            return queryset.filter(rating__isnull=True)
        if value in ("1", "-1"):
            return queryset.filter(rating=int(value))
    elif name == "reason":
        # Reasons are slugs from settings, stored as a JSON list: match the
        # quoted slug, which works on every database.
        return queryset.filter(reasons__icontains=f'"{value}"')
    elif name == "model":
        return queryset.filter(model=value)
    elif name == "version":
        if value == "none":
            return queryset.filter(version__isnull=True)
        version_id = _parse_id(value, model=ModelVersion, using=queryset.db)
        if version_id is not None:
            return queryset.filter(version_id=version_id)
    elif name == "status":
        return queryset.filter(review_status=value)
    elif name == "has_comment":
        if value == "yes":
            return queryset.exclude(comment="")
        if value == "no":
            return queryset.filter(comment="")
    elif name == "assignee":
        if value == "none":
            return queryset.filter(assignee__isnull=True)
        assignee_id = _parse_id(value, model=get_user_model(), using=queryset.db)
        if assignee_id is not None:
            return queryset.filter(assignee_id=assignee_id)
    elif name == "created_from":
        start = _day_start(value)
        if start is not None:
            return queryset.filter(created_at__gte=start)
    elif name == "created_to":
        # Up to the end of that day: before the next one begins.
        end = _day_start(value, days_later=1)
        if end is not None:
            return queryset.filter(created_at__lt=end)
    elif name == "q":
        return queryset.filter(comment__icontains=value)
    return queryset


def feedback_filter_params(query: Mapping[str, object]) -> dict[str, str]:
    """Return the desk filter parameters in a query worth keeping: known names, readable text.

    An export job stores these, so a value no database column could hold
    (a NUL: PostgreSQL's jsonb refuses it too) is dropped here, not stored.
    """
    params = {name: str(query[name]) for name in FILTER_PARAMS if name in query}
    return {name: value for name, value in params.items() if _readable(value)}


def feedback_filtered(*, params: Mapping[str, str]) -> QuerySet[Feedback]:
    """Return the feedback matching the desk's filter parameters, newest first."""
    queryset = Feedback.objects.all()
    for name in FILTER_PARAMS:
        value = params.get(name)
        if value:
            queryset = feedback_filter(queryset, name=name, value=str(value))
    return queryset.order_by("-id")


def _readable(value: str | None) -> bool:
    # PostgreSQL refuses a NUL in any text it is given, and none is stored
    # (the input checker refuses them), so such a value could match nothing.
    return bool(value) and "\x00" not in str(value)


def _parse_id(value: str, *, model: type[Model], using: str) -> int | None:
    """Return the id `value` names if `model`'s id column could hold it, else None.

    Only ASCII digits: str.isdigit() also takes "²" and other digits int()
    refuses. And within the column's range, which each database sets: past
    it SQLite raises OverflowError rather than matching nothing.
    """
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        return None
    number = int(value)
    low, high = connections[using].ops.integer_field_range(model._meta.pk.get_internal_type())
    return number if low <= number <= high else None


def _day_start(value: str, *, days_later: int = 0) -> dt.datetime | None:
    """Return when the day `value` names (plus `days_later`) begins, or None when unreadable.

    None also when a datetime cannot hold that moment: the day after
    9999-12-31 has no start, and a bound that far out excludes nothing.
    """
    try:
        day = dt.date.fromisoformat(value) + dt.timedelta(days=days_later)
        start = timezone.make_aware(dt.datetime.combine(day, dt.time.min))
        # The database compares in UTC: that too must be a datetime.
        start.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        return None
    return start


@dataclass(frozen=True, slots=True)
class ContextLine:
    id: int
    role: str
    content: str
    is_rated: bool


def conversation_context(*, reply: Message, limit: int = 200) -> tuple[list[ContextLine], int]:
    """Return the conversation up to and including a reply, and how many older lines are cut."""
    rows = list(
        Message.objects.filter(conversation_id=reply.conversation_id, id__lte=reply.pk)
        .order_by("-id")
        .values_list("id", "role", "content")[: limit + 1]
    )
    omitted = 0
    if len(rows) > limit:
        omitted = (
            Message.objects.filter(conversation_id=reply.conversation_id, id__lte=reply.pk).count()
            - limit
        )
        rows = rows[:limit]
    rows.reverse()
    return [
        ContextLine(id=i, role=r, content=c, is_rated=i == reply.pk) for i, r, c in rows
    ], omitted


def export_rows(queryset: QuerySet[Feedback], *, context_limit: int) -> Iterator[dict[str, Any]]:
    """Yield one export record per feedback row with its context (docs/feedback-export.md)."""
    batch_size = 500
    last_id: int | None = None
    base = queryset.order_by("-id").select_related("message", "version")
    while True:
        page = base.filter(id__lt=last_id) if last_id is not None else base
        rows = list(page[:batch_size])
        if not rows:
            return
        last_id = rows[-1].pk
        contexts = _contexts_for([r.message for r in rows], limit=context_limit)
        for row in rows:
            yield _export_record(row, contexts.get(row.message_id, ([], False)))


def _contexts_for(
    replies: list[Message], *, limit: int
) -> dict[int, tuple[list[dict[str, str]], bool]]:
    by_conversation: dict[int, list[Message]] = defaultdict(list)
    for reply in replies:
        by_conversation[reply.conversation_id].append(reply)
    lines: dict[int, list[tuple[int, str, str]]] = defaultdict(list)
    history = (
        Message.objects.filter(
            conversation_id__in=list(by_conversation),
            id__lt=max(r.pk for r in replies),
        )
        .exclude(role=Message.Role.ASSISTANT, content="")
        .order_by("id")
        .values_list("conversation_id", "id", "role", "content")
    )
    for conversation_id, message_id, role, content in history.iterator():
        lines[conversation_id].append((message_id, role, content))
    contexts: dict[int, tuple[list[dict[str, str]], bool]] = {}
    for reply in replies:
        before = [line for line in lines[reply.conversation_id] if line[0] < reply.pk]
        truncated = len(before) > limit
        contexts[reply.pk] = (
            [{"role": role, "content": content} for _, role, content in before[-limit:]],
            truncated,
        )
    return contexts


def _export_record(row: Feedback, context: tuple[list[dict[str, str]], bool]) -> dict[str, Any]:
    reply = row.message
    version = row.version
    return {
        "id": row.pk,
        "conversation": reply.conversation_id,
        "message": reply.pk,
        "system_prompt": version.system_prompt if version else None,
        "context": context[0],
        "context_truncated": context[1],
        "reply": reply.content,
        "rating": row.rating,
        "label": {1: True, -1: False}.get(row.rating) if row.rating is not None else None,
        "reasons": list(row.reasons),
        "comment": row.comment,
        "model": reply.model,
        "version": version.number if version else None,
        "finish_reason": reply.finish_reason,
        "review_status": row.review_status,
        "reply_created_at": reply.created_at.isoformat(),
        "rated_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
    }


# --- Scorecards ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comparison:
    """A rate against the baseline: the difference, its p-value, and whether it means anything."""

    diff_points: float
    p_value: float
    significant: bool


@dataclass(slots=True)
class Scorecard:
    version_key: int  # the version id, 0 for replies made from settings
    label: str
    model: str
    role: str  # "active", "control", "challenger" or ""
    replies: int = 0
    errors: int = 0
    moderated: int = 0
    rated: int = 0
    up: int = 0
    down: int = 0
    cost_usd: Decimal = Decimal("0")
    ttft_hist: dict[str, int] = field(default_factory=dict)
    latency_hist: dict[str, int] = field(default_factory=dict)
    down_reasons: dict[str, int] = field(default_factory=dict)
    comparisons: dict[str, Comparison] = field(default_factory=dict)

    @property
    def up_rate(self) -> float | None:
        return self.up / (self.up + self.down) if self.up + self.down else None

    @property
    def up_interval(self) -> tuple[float, float] | None:
        return stats.wilson_interval(self.up, self.up + self.down)

    @property
    def feedback_rate(self) -> float | None:
        return self.rated / self.replies if self.replies else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.replies if self.replies else None

    @property
    def moderation_rate(self) -> float | None:
        return self.moderated / self.replies if self.replies else None

    @property
    def cost_per_reply(self) -> Decimal | None:
        return self.cost_usd / self.replies if self.replies else None

    def percentile(self, which: str, q: float) -> int | None:
        hist = self.ttft_hist if which == "ttft" else self.latency_hist
        return stats.histogram_percentile(hist, q)

    @property
    def top_down_reasons(self) -> list[tuple[str, int]]:
        return sorted(self.down_reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:3]

    def rate_counts(self, metric: str) -> tuple[int, int]:
        """Return (successes, trials) behind one of the compared rates."""
        return {
            "up_rate": (self.up, self.up + self.down),
            "feedback_rate": (self.rated, self.replies),
            "error_rate": (self.errors, self.replies),
            "moderation_rate": (self.moderated, self.replies),
        }[metric]


COMPARED_RATES = ("up_rate", "feedback_rate", "error_rate", "moderation_rate")


def version_id_param(value: str) -> int | None:
    """Return the version id a query parameter names, or None when it names none."""
    return _parse_id(value, model=ModelVersion, using="default")


@dataclass(frozen=True, slots=True)
class ScorecardChoice:
    """What the scorecards page was asked for; what could not be read is left out."""

    version_keys: list[int] | None  # None: the default cards
    since: dt.date | None  # None: every day
    days: int | None


def scorecard_choice(*, versions: list[str], days: str) -> ScorecardChoice:
    """Read the scorecards page's query: versions (`v`, repeated) and how many days back.

    Staff edit these URLs by hand: an id no id column could hold, or a range
    further back than a date goes, is ignored (as the desk's filters do)
    rather than failing the page.
    """
    keys = [key for key in (version_id_param(v) for v in versions) if key is not None]
    number = int(days) if days.isascii() and days.isdigit() and len(days) <= 9 else 0
    since = None
    if number > 0:
        try:
            since = timezone.localdate() - dt.timedelta(days=number - 1)
        except OverflowError:
            number = 0
    return ScorecardChoice(version_keys=keys or None, since=since, days=number or None)


def scorecards(
    *, version_keys: list[int] | None = None, since: dt.date | None = None, limit: int = 6
) -> tuple[list[Scorecard], int | None]:
    """Return scorecards side by side from the rollups, and the baseline's version key.

    Without `version_keys`: the active version (or a split's two sides), then
    the most recent other versions with replies, up to `limit`. Each rate of
    each other card is compared with the baseline by a two-proportion test.
    """
    rollups = VersionRollup.objects.all()
    if since is not None:
        rollups = rollups.filter(day__gte=since)
    split = VersionSplit.objects.filter(is_running=True).first()
    active = ModelVersion.objects.filter(is_active=True).values_list("pk", flat=True).first()
    roles: dict[int, str] = {}
    if split is not None:
        roles = {split.control_id: "control", split.challenger_id: "challenger"}
    elif active is not None:
        roles = {active: "active"}
    if version_keys is None:
        with_data = set(rollups.values_list("version_key", flat=True).distinct())
        recent = [k for k in sorted(with_data, key=lambda k: (k == 0, -k)) if k not in roles]
        version_keys = (list(roles) + recent)[:limit]
    cards: dict[int, Scorecard] = {}
    versions = {v.pk: v for v in ModelVersion.objects.filter(pk__in=version_keys)}
    for key in version_keys:
        version = versions.get(key)
        if key != 0 and version is None:
            continue
        cards[key] = Scorecard(
            version_key=key,
            label=f"v{version.number}" if version else "settings (no version)",
            model=version.model if version else "",
            role=roles.get(key, ""),
        )
    for row in rollups.filter(version_key__in=list(cards)).iterator():
        card = cards[row.version_key]
        card.replies += row.replies
        card.errors += row.errors
        card.moderated += row.moderated
        card.rated += row.rated
        card.up += row.up
        card.down += row.down
        card.cost_usd += row.cost_usd
        stats.histogram_merge(card.ttft_hist, row.ttft_hist)
        stats.histogram_merge(card.latency_hist, row.latency_hist)
        stats.histogram_merge(card.down_reasons, row.down_reasons)
    ordered = list(cards.values())
    baseline_key = next((k for k, r in roles.items() if r in ("control", "active")), None)
    if baseline_key not in cards:
        baseline_key = ordered[0].version_key if ordered else None
    if baseline_key is not None:
        baseline = cards[baseline_key]
        for card in ordered:
            if card is not baseline:
                card.comparisons = compare(card, baseline)
    return ordered, baseline_key


def compare(card: Scorecard, baseline: Scorecard) -> dict[str, Comparison]:
    """Compare each rate of a card with the baseline's; leave out rates either side lacks."""
    result: dict[str, Comparison] = {}
    for metric in COMPARED_RATES:
        x1, n1 = card.rate_counts(metric)
        x2, n2 = baseline.rate_counts(metric)
        p = stats.two_proportion_p_value(x1, n1, x2, n2)
        if p is None:
            continue
        result[metric] = Comparison(
            diff_points=100 * (x1 / n1 - x2 / n2), p_value=p, significant=p < SIGNIFICANCE
        )
    return result
