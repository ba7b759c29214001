"""Rate limits, daily budgets and abuse blocks, checked before a message is stored.

`check_send_limits` runs once per `chat.send`, in this order:

1. an active `AbuseBlock` on the user (or, for anonymous visitors, on the
   session or the IP) refuses with `Forbidden`, saying when it ends;
2. the message is counted per user (`CHAT_RATELIMIT_USER`) or per IP for
   anonymous visitors (`CHAT_RATELIMIT_ANON`), in django-ratelimit's fixed
   windows (`count_sends`), and refused with
   `RateLimited` and the seconds until its window resets; each refusal is a
   violation;
3. the daily budget (`CHAT_DAILY_BUDGET_USD`, `CHAT_DAILY_BUDGET_TOKENS`) is
   reserved with one atomic cache increment, so parallel sends cannot spend
   past it; `budget_settle` later swaps the reservation for the real cost.

`check_feedback_rate` limits ratings (`FEEDBACK_RATELIMIT`) the same way,
for the WebSocket frame and the HTTP endpoint alike.

Counters live in the `ratelimit` cache: the SQLite file shared by the
embedded processes, or Redis in the scaled mode, so they hold exactly across
processes. When that cache is down, limits fail open to a per-process
fallback (docs/decisions/0004-ratelimit-when-redis-is-down.md).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import math
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal

from django.conf import settings
from django.core.cache import BaseCache, caches
from django.core.signals import setting_changed
from django.db.models import Sum
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from chat.errors import BudgetExceeded, Forbidden, RateLimited
from chat.models import AbuseBlock, Message
from chat.owners import Owner
from chat.snapshots import Snapshot
from monitoring import metrics

logger = logging.getLogger(__name__)

_MICRO = Decimal("1000000")
_ZERO = Decimal("0")
RATELIMIT_GROUP = "chat.send"
FEEDBACK_RATELIMIT_GROUP = "feedback"


@dataclass(frozen=True, slots=True)
class Reservation:
    """Budget held for one reply until it is settled with the real cost."""

    owner_key: str
    usd: Decimal = Decimal("0")
    tokens: int = 0
    # Who the budget is counted for ("u:<id>" or "ip:<addr>") and on which UTC day.
    subject: str = ""
    day: str = ""


# --- the counter store ----------------------------------------------------------


# The counter store, per thread: Django's cache handler is an asgiref Local,
# ~4 us a lookup, and a burst's admission trip looks it up a thousand times.
# Our stores keep their connections per thread or per process anyway.
_store = threading.local()


def _counters() -> BaseCache:
    cache: BaseCache | None = getattr(_store, "cache", None)
    if cache is None:
        cache = _store.cache = caches[getattr(settings, "RATELIMIT_USE_CACHE", "default")]
    return cache


def _forget_store(*, setting: str, **_: object) -> None:
    global _store
    if setting in ("CACHES", "RATELIMIT_USE_CACHE"):
        _store = threading.local()


setting_changed.connect(_forget_store)


def counters_together() -> contextlib.AbstractContextManager[None]:
    """Group this thread's counter writes in the block into one commit, where the store can.

    The embedded mode's SQLite cache commits every write on its own; a batch
    of sends checked together shares one commit instead. Redis needs none.
    """
    together = getattr(_counters(), "together", None)
    return together() if together is not None else contextlib.nullcontext()


def _add_and_incr(key: str, delta: int, *, timeout: float) -> int | None:
    """Atomically add `delta` to a counter (created at 0); None when the store is down."""
    cache = _counters()
    for _ in range(2):
        try:
            cache.add(key, 0, timeout)
            return int(cache.incr(key, delta))
        except ValueError:
            # Expired between add and incr, or the store is down: try once more.
            continue
        except Exception as exc:  # the SQLite file locked past its timeout, unwritable...
            logger.warning("rate-limit counters unavailable (%s)", type(exc).__name__)
            return None
    return None


# --- blocks ---------------------------------------------------------------------


def _subjects(owner: Owner, client_ip: str) -> list[str]:
    """Return who a violation or a block applies to: the user, or the anonymous IP."""
    if not owner.is_anonymous:
        return [owner.key]
    return [owner.key, f"ip:{client_ip}"] if client_ip else [owner.key]


def _load_blocks() -> dict[str, datetime]:
    """Return when each blocked subject's last active block ends."""
    ends: dict[str, datetime] = {}
    rows = AbuseBlock.objects.filter(lifted_at__isnull=True, expires_at__gt=timezone.now())
    for subject, expires_at in rows.values_list("subject", "expires_at"):
        ends[subject] = max(expires_at, ends.get(subject, expires_at))
    return ends


# Blocks are read on every send and change rarely: see chat/snapshots.py.
_blocks = Snapshot("abuse-blocks", _load_blocks)


@receiver(post_save, sender=AbuseBlock)
@receiver(post_delete, sender=AbuseBlock)
def _block_rows_changed(**kwargs: object) -> None:
    _blocks.changed()


def abuse_block_ends(*, subjects: list[str]) -> datetime | None:
    """Return when the active block that ends last among these subjects ends, if any."""
    now = timezone.now()
    ends = _blocks.get()
    found = [ends[s] for s in subjects if s in ends and ends[s] > now]
    return max(found) if found else None


def abuse_block_create(*, subject: str, reason: str, seconds: int) -> AbuseBlock:
    block = AbuseBlock.objects.create(
        subject=subject, reason=reason, expires_at=timezone.now() + timedelta(seconds=seconds)
    )
    logger.warning("abuse block on %s for %ss: %s", subject.split(":")[0], seconds, reason)
    return block


def abuse_block_lift(*, block_ids: list[int], by_user_id: int | None) -> int:
    """Lift these blocks now and forget their subjects' violations; return how many."""
    blocks = AbuseBlock.objects.filter(pk__in=block_ids, lifted_at__isnull=True)
    subjects = list(blocks.values_list("subject", flat=True))
    lifted = blocks.update(lifted_at=timezone.now(), lifted_by_id=by_user_id)
    _blocks.changed()
    cache = _counters()
    for subject in subjects:
        cache.delete(_violation_key(subject))
    return lifted


def _violation_key(subject: str) -> str:
    return f"abuse:violations:{subject}"


def record_violation(*, owner: Owner, client_ip: str, kind: str) -> None:
    """Count a violation (a rate-limit hit, a blocked input) towards a block.

    The `CHAT_ABUSE_THRESHOLD`-th violation within `CHAT_ABUSE_WINDOW_SECONDS`
    blocks the user (an anonymous visitor: the IP) for
    `CHAT_ABUSE_BLOCK_SECONDS`. The counter is exact across processes, so the
    block is made once, by whichever process counted the threshold.
    """
    subject = _subjects(owner, client_ip)[-1]
    count = _add_and_incr(_violation_key(subject), 1, timeout=settings.CHAT_ABUSE_WINDOW_SECONDS)
    if count is not None and count == settings.CHAT_ABUSE_THRESHOLD:
        abuse_block_create(
            subject=subject,
            reason=f"{count} violations in {settings.CHAT_ABUSE_WINDOW_SECONDS}s (last: {kind})",
            seconds=settings.CHAT_ABUSE_BLOCK_SECONDS,
        )


def _check_not_blocked(owner: Owner, client_ip: str) -> None:
    ends = abuse_block_ends(subjects=_subjects(owner, client_ip))
    if ends is None:
        return
    left = max(1.0, (ends - timezone.now()).total_seconds())
    raise Forbidden(
        "You are temporarily blocked after repeated violations of the usage policy. "
        f"The block ends at {ends:%H:%M} UTC, in {_duration(left)}.",
        retry_after=left,
    )


# --- rate limits ----------------------------------------------------------------


class _LocalWindows:
    """Fixed-window counters in this process: the fallback while the cache is down.

    With N processes this lets through at most N times the rate, which is the
    price of keeping chat up through a Redis outage (decision 0004).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}

    def hit(self, key: str, limit: int, period: int) -> tuple[bool, float]:
        now = time.monotonic()
        with self._lock:
            if len(self._windows) > 10_000:
                self._windows = {k: v for k, v in self._windows.items() if v[0] > now}
            ends, count = self._windows.get(key, (now + period, 0))
            if ends <= now:
                ends, count = now + period, 0
            count += 1
            self._windows[key] = (ends, count)
        return count > limit, ends - now


_local = _LocalWindows()


# Seconds a window's counter outlives the window, so a late send still finds it.
_EXPIRATION_FUDGE = 5


@functools.lru_cache(maxsize=8)
def _parsed_rate(rate: str) -> tuple[int, int]:
    return parse_rate(rate)


def _rate_of(scope: str) -> str:
    return str(settings.CHAT_RATELIMIT_USER if scope == "user" else settings.CHAT_RATELIMIT_ANON)


def _rate_subject(owner: Owner, client_ip: str) -> tuple[str, str]:
    """Return (scope, who is counted): the user, or an anonymous visitor's network."""
    if not owner.is_anonymous:
        return "user", owner.key
    # As django-ratelimit's "ip" key: an IPv6 visitor is counted per /64 (by
    # default), since one host can hold many of its addresses.
    ip = client_ip or "0.0.0.0"  # noqa: S104 - a key, not a bind
    mask = settings.RATELIMIT_IPV6_MASK if ":" in ip else settings.RATELIMIT_IPV4_MASK
    try:
        network = ipaddress.ip_network(f"{ip}/{mask}", strict=False).network_address
    except ValueError:
        return "anon", f"ip:{ip}"
    return "anon", f"ip:{network}"


# A send counted in its rate window: (the limit, seconds until the window
# ends, the count with this send, or None while the counter store is down).
Counted = tuple[int, float, int | None]


def _window_key(scope: str, subject: str, now: float) -> tuple[str, int, int, float]:
    """Return the key of the subject's current send window, its limit, its period and its end."""
    return _window(RATELIMIT_GROUP, _rate_of(scope), subject, now)


def _window(group: str, rate: str, subject: str, now: float) -> tuple[str, int, int, float]:
    """Return the key of the subject's current window in `group`, its limit, period and end.

    django-ratelimit's scheme: one window per `period` seconds, offset per
    subject so that windows do not all end together.
    """
    limit, period = _parsed_rate(rate)
    ends = now - now % period + zlib.crc32(subject.encode()) % period
    if ends <= now:
        ends += period
    return f"rl:{group}:{limit}/{period}:{subject}:{int(ends)}", limit, period, ends


def count_sends(sends: list[tuple[Owner, str]]) -> list[Counted | None]:
    """Count many sends (owner, client IP) in their rate windows with one write to the store.

    django-ratelimit's `get_usage` did this for ~35 us of Python a send
    (parsing the rate twice, a hash, the cache handler, five settings): a
    burst of 1,000 sends spent ~50 ms of its admission trip on it.

    For check_send_limits(counted=...), in the same order. A send whose
    sender is blocked is not counted (None), as check_send_limits would
    refuse it first; with rate limits off every answer is None. A store
    that fails is down for all of them: each then falls back to this
    process's count (decision 0004).
    """
    answers: list[Counted | None] = [None] * len(sends)
    if not settings.RATELIMIT_ENABLE or not sends:
        return answers
    now = time.time()
    blocked = _blocks.get()
    todo: list[tuple[int, str, int, float]] = []
    counters: list[tuple[str, float]] = []
    for i, (owner, client_ip) in enumerate(sends):
        if blocked and abuse_block_ends(subjects=_subjects(owner, client_ip)) is not None:
            continue
        key, limit, period, ends = _window_key(*_rate_subject(owner, client_ip), now)
        todo.append((i, key, limit, ends))
        counters.append((key, period + _EXPIRATION_FUDGE))
    cache = _counters()
    count_many = getattr(cache, "count_many", None)
    counts: list[int | None]
    try:
        if count_many is None or len(counters) == 1:
            # Another store, or a lone send: one add (and incr) each. For one
            # counter the add is cheaper than the upsert that returns its rows
            # (~8 against ~14 us a statement on SQLite, before Python's part).
            counts = [_add_or_incr(cache, key, timeout) for key, timeout in counters]
        else:
            counts = count_many(counters)
    except Exception as exc:  # the SQLite file locked past its timeout, unwritable...
        logger.warning("rate-limit counters unavailable (%s)", type(exc).__name__)
        counts = [None] * len(counters)
    for (i, _key, limit, ends), count in zip(todo, counts, strict=True):
        answers[i] = (limit, ends - now, count)
    return answers


def _add_or_incr(cache: BaseCache, key: str, timeout: float) -> int | None:
    try:
        return 1 if cache.add(key, 1, timeout) else int(cache.incr(key))
    except ValueError:
        return None


def _would_limit(owner: Owner, client_ip: str, counted: Counted | None) -> bool:
    """Return whether `_check_rate` would refuse a send already counted (no side effects)."""
    if not settings.RATELIMIT_ENABLE or counted is None:
        return False
    limit, _time_left, count = counted
    return count is None or count > limit


def _check_rate(owner: Owner, client_ip: str, counted: Counted | None = None) -> None:
    if not settings.RATELIMIT_ENABLE:
        return
    counted = counted or count_sends([(owner, client_ip)])[0]
    if counted is None:  # blocked since _check_not_blocked: refused next time
        return
    scope, subject = _rate_subject(owner, client_ip)
    limited, time_left = _over_limit(counted, rate=_rate_of(scope), local_key=subject)
    if not limited:
        return
    metrics.ratelimited(scope)
    record_violation(owner=owner, client_ip=client_ip, kind="rate_limited")
    wait = max(1, math.ceil(time_left))
    raise RateLimited(
        f"You are sending messages too quickly. Please wait {_duration(wait)} and try again.",
        retry_after=wait,
    )


def _over_limit(counted: Counted, *, rate: str, local_key: str) -> tuple[bool, float]:
    """Return whether a counted hit is over its limit, and the seconds until its window ends."""
    limit, time_left, count = counted
    if count is not None:
        return count > limit, time_left
    if settings.RATELIMIT_FAIL_OPEN:
        # The counter store is down: count in this process instead (decision 0004).
        return _local.hit(local_key, *_parsed_rate(rate))
    return True, 60.0


def check_feedback_rate(*, owner: Owner, client_ip: str) -> None:
    """Raise RateLimited once the owner rates replies faster than `FEEDBACK_RATELIMIT`.

    The one limit on ratings: `feedback_submit` checks it first, so the
    WebSocket `feedback` frame and `POST /api/feedback/` share it and share
    one counter. Rating over both at once earns no more than the one rate.
    It is counted as chat messages are (per user, an anonymous visitor per
    network, in the `ratelimit` cache, so exactly across processes, with the
    same per-process fallback while that store is down), but in its own
    windows, and a refusal is no violation towards a block: flipping a thumb
    too fast is impatience, not abuse.
    """
    if not settings.RATELIMIT_ENABLE:
        return
    _scope, subject = _rate_subject(owner, client_ip)
    rate = str(settings.FEEDBACK_RATELIMIT)
    now = time.time()
    key, limit, period, ends = _window(FEEDBACK_RATELIMIT_GROUP, rate, subject, now)
    try:
        count = _add_or_incr(_counters(), key, period + _EXPIRATION_FUDGE)
    except Exception as exc:  # the SQLite file locked past its timeout, unwritable...
        logger.warning("rate-limit counters unavailable (%s)", type(exc).__name__)
        count = None
    limited, time_left = _over_limit(
        (limit, ends - now, count), rate=rate, local_key=f"{FEEDBACK_RATELIMIT_GROUP}:{subject}"
    )
    if not limited:
        return
    metrics.ratelimited("feedback")
    wait = max(1, math.ceil(time_left))
    raise RateLimited(
        f"You are rating replies too quickly. Please wait {_duration(wait)} and try again.",
        retry_after=wait,
    )


def parse_rate(rate: str) -> tuple[int, int]:
    """Return (count, period in seconds) for a django-ratelimit rate like "20/m" or "5/10m"."""
    count, _, per = rate.partition("/")
    unit = per[-1:] if per[-1:] in "smhd" else "s"
    multiplier = int(per[:-1] or 1) if per[-1:] in "smhd" else int(per or 1)
    return int(count), multiplier * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


# --- daily budget ---------------------------------------------------------------


def _next_midnight(now: datetime) -> datetime:
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


def _budget_key(kind: str, subject: str, day: str) -> str:
    return f"budget:{kind}:{subject}:{day}"


def _micro_usd(usd: Decimal) -> int:
    return int((usd * _MICRO).to_integral_value(rounding=ROUND_CEILING))


def _budget_caps() -> tuple[Decimal | None, int | None]:
    usd_setting = str(settings.CHAT_DAILY_BUDGET_USD or "").strip()
    usd = Decimal(usd_setting) if usd_setting else None
    tokens = settings.CHAT_DAILY_BUDGET_TOKENS
    return usd, tokens


def _spent_today_in_db(owner: Owner, since: datetime) -> tuple[Decimal, int]:
    """Return today's spend from the stored replies: the fallback when the cache is down."""
    totals = Message.objects.filter(
        owner.conversation_filter("conversation__"),
        role=Message.Role.ASSISTANT,
        created_at__gte=since,
    ).aggregate(
        usd=Sum("cost_usd"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")
    )
    return totals["usd"] or Decimal("0"), (totals["prompt"] or 0) + (totals["completion"] or 0)


def _reserve_budget(owner: Owner, client_ip: str) -> Reservation:
    cap_usd, cap_tokens = _budget_caps()
    subject = owner.key if not owner.is_anonymous else f"ip:{client_ip or owner.key}"
    if cap_usd is None and cap_tokens is None:
        return Reservation(owner_key=owner.key)
    now = timezone.now().astimezone(UTC)
    midnight = _next_midnight(now)
    day = now.strftime("%Y%m%d")
    ttl = (midnight - now).total_seconds() + 3600
    want_usd = Decimal(str(settings.CHAT_BUDGET_RESERVE_USD)) if cap_usd is not None else None
    want_tokens = settings.CHAT_BUDGET_RESERVE_TOKENS if cap_tokens is not None else 0

    held: list[tuple[str, int]] = []  # undone if a later cap refuses
    exceeded = False
    fell_back = False
    for kind, cap, amount in (
        ("usd", None if cap_usd is None else _micro_usd(cap_usd), _micro_usd(want_usd or _ZERO)),
        ("tokens", cap_tokens, want_tokens),
    ):
        if cap is None:
            continue
        key = _budget_key(kind, subject, day)
        total = _add_and_incr(key, amount, timeout=ttl)
        if total is None:
            fell_back = True
            continue
        held.append((key, amount))
        if total > cap:
            exceeded = True
            break
    if fell_back and not exceeded and not owner.is_anonymous:
        # The counter store is down: check what is already spent instead
        # (exact but not reserved, so parallel sends may overshoot a little).
        start_of_day = midnight - timedelta(days=1)
        spent_usd, spent_tokens = _spent_today_in_db(owner, start_of_day)
        exceeded = (cap_usd is not None and spent_usd >= cap_usd) or (
            cap_tokens is not None and spent_tokens >= cap_tokens
        )
    if exceeded:
        cache = _counters()
        for key, amount in held:
            _safe_incr(cache, key, -amount)
        left = (midnight - timezone.now()).total_seconds()
        raise BudgetExceeded(
            "You have reached today's usage limit. It resets at midnight UTC, "
            f"in {_duration(left)}.",
            retry_after=max(1.0, left),
        )
    return Reservation(
        owner_key=owner.key,
        usd=want_usd or Decimal("0"),
        tokens=want_tokens,
        subject=subject,
        day=day,
    )


def _safe_incr(cache: BaseCache, key: str, delta: int) -> None:
    if delta == 0:
        return
    # A missing key: the day rolled over or the store is down; nothing to correct.
    with contextlib.suppress(ValueError):
        cache.incr(key, delta)


def budget_settle(*, reservation: Reservation, cost_usd: Decimal, tokens: int) -> None:
    """Replace the reservation with what the reply really cost."""
    if not reservation.day:
        return
    cache = _counters()
    cap_usd, cap_tokens = _budget_caps()
    if cap_usd is not None:
        delta = _micro_usd(Decimal(cost_usd)) - _micro_usd(reservation.usd)
        _safe_incr(cache, _budget_key("usd", reservation.subject, reservation.day), delta)
    if cap_tokens is not None:
        _safe_incr(
            cache,
            _budget_key("tokens", reservation.subject, reservation.day),
            tokens - reservation.tokens,
        )


# --- the one entry point --------------------------------------------------------


def check_send_limits(
    *,
    owner: Owner,
    client_ip: str,
    counted: Counted | None = None,
    resent: Callable[[], bool] | None = None,
) -> Reservation:
    """Raise RateLimited / BudgetExceeded / Forbidden, or return a reservation.

    `counted`: the send's rate count from count_sends, when a batch of
    sends was counted together; else it is counted here.

    `resent` is asked only of a send about to be refused: True when it is a
    client's retry of a send already stored (its socket dropped before the
    answer came). That one is not refused, and is no violation: it asks for
    nothing new, and its answer exists. It gets an empty reservation.
    """
    try:
        _check_not_blocked(owner, client_ip)
        if resent is not None and _would_limit(owner, client_ip, counted) and resent():
            return Reservation(owner_key=owner.key)
        _check_rate(owner, client_ip, counted)
        return _reserve_budget(owner, client_ip)
    except (Forbidden, BudgetExceeded):
        if resent is not None and resent():
            return Reservation(owner_key=owner.key)
        raise


def _duration(seconds: float) -> str:
    """Return "45 seconds", "3 minutes" or "2 hours 5 minutes" for a wait."""
    seconds = max(1, math.ceil(seconds))
    if seconds < 90:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    if minutes < 90:
        return f"{minutes} minutes"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} hour{'s' if hours != 1 else ''} {minutes} minute{'s' if minutes != 1 else ''}"
