"""Scorecard rollups: per-version, per-day totals maintained by Celery beat.

Replies are grouped in blocks of `BLOCK` consecutive message ids. A block is
always recomputed whole from its rows (one primary-key range scan) and its
rollup rows replaced in one transaction, so a run can be repeated, interrupted
or overlap another run without changing or doubling any number.

The incremental pass (`rollup_refresh`) recomputes:

* every block from the oldest reply that may still change: the oldest reply
  still pending (younger than a day), or the newest id seen last time less a
  margin for transactions that committed out of id order;
* every block holding a reply whose feedback changed since the last run
  (less a minute, for the same reason).

What it cannot see, e.g. a conversation deleted with its replies, the nightly
`rollup_rebuild` corrects.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

from django.db import transaction
from django.db.models import Max, Min
from django.utils import timezone

from chat.models import Message
from feedback import stats
from feedback.models import Feedback, RollupState, VersionRollup

BLOCK = 10_000
STATE = "version_rollup"
# Ids below the newest seen that may still become visible (committed late).
ID_MARGIN = 1_000
CHANGE_MARGIN = dt.timedelta(minutes=1)
PENDING_HORIZON = dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class RollupRun:
    blocks: int
    rows: int


def rollup_refresh() -> RollupRun:
    """Recompute the blocks that may have changed since the last run."""
    state, _ = RollupState.objects.get_or_create(name=STATE)
    started = timezone.now()
    max_id = Message.objects.aggregate(m=Max("id"))["m"] or 0
    pending_min = Message.objects.filter(
        status=Message.Status.PENDING, created_at__gte=started - PENDING_HORIZON
    ).aggregate(m=Min("id"))["m"]
    blocks = set(range(state.message_id_from // BLOCK, max_id // BLOCK + 1)) if max_id else set()
    changed = Feedback.objects.all()
    if state.feedback_changed_from is not None:
        changed = changed.filter(updated_at__gte=state.feedback_changed_from)
    blocks |= {m // BLOCK for m in changed.values_list("message_id", flat=True).distinct()}
    rows = sum(_block_recompute(block) for block in sorted(blocks))
    next_from = max(0, max_id + 1 - ID_MARGIN)
    if pending_min is not None:
        next_from = min(next_from, pending_min)
    RollupState.objects.filter(pk=state.pk).update(
        message_id_from=next_from,
        feedback_changed_from=started - CHANGE_MARGIN,
        ran_at=timezone.now(),
    )
    return RollupRun(blocks=len(blocks), rows=rows)


def rollup_rebuild() -> RollupRun:
    """Recompute every block from scratch and drop rollups of blocks that no longer exist."""
    RollupState.objects.get_or_create(name=STATE)
    RollupState.objects.filter(name=STATE).update(message_id_from=0, feedback_changed_from=None)
    max_id = Message.objects.aggregate(m=Max("id"))["m"] or 0
    VersionRollup.objects.filter(block__gt=max_id // BLOCK).delete()
    return rollup_refresh()


def _block_recompute(block: int) -> int:
    """Replace one block's rollup rows with totals computed from its replies."""
    low, high = block * BLOCK, (block + 1) * BLOCK
    # Reading the block and replacing its rows is one step; the state row lock
    # queues a concurrent run's recompute of the same block behind this one.
    with transaction.atomic():
        RollupState.objects.select_for_update().filter(name=STATE).first()
        replies = Message.objects.filter(
            id__gte=low,
            id__lt=high,
            role=Message.Role.ASSISTANT,
            status=Message.Status.FINISHED,
        ).values_list(
            "id", "version_id", "created_at", "finish_reason", "ttft_ms", "latency_ms", "cost_usd"
        )
        groups: dict[tuple[int, dt.date], VersionRollup] = {}
        ttfts: dict[tuple[int, dt.date], list[int | None]] = defaultdict(list)
        latencies: dict[tuple[int, dt.date], list[int | None]] = defaultdict(list)
        where: dict[int, tuple[int, dt.date]] = {}
        for message_id, version_id, created_at, finish, ttft, latency, cost in replies.iterator(
            chunk_size=2000
        ):
            key = (version_id or 0, created_at.astimezone(dt.UTC).date())
            row = groups.get(key)
            if row is None:
                row = groups[key] = VersionRollup(
                    block=block, version_key=key[0], day=key[1], cost_usd=Decimal("0")
                )
            row.replies += 1
            row.errors += finish == Message.FinishReason.ERROR
            row.moderated += finish == Message.FinishReason.MODERATED
            row.cost_usd += cost or Decimal("0")
            ttfts[key].append(ttft)
            latencies[key].append(latency)
            where[message_id] = key
        ratings = Feedback.objects.filter(
            message_id__gte=low, message_id__lt=high, rating__isnull=False
        ).values_list("message_id", "rating", "reasons")
        for message_id, rating, reasons in ratings.iterator(chunk_size=2000):
            key_of = where.get(message_id)
            if key_of is None:
                continue
            row = groups[key_of]
            row.rated += 1
            if rating == 1:
                row.up += 1
            else:
                row.down += 1
                for reason in reasons or ():
                    row.down_reasons[reason] = row.down_reasons.get(reason, 0) + 1
        for key, row in groups.items():
            row.ttft_hist = stats.histogram_of(ttfts[key])
            row.latency_hist = stats.histogram_of(latencies[key])
        VersionRollup.objects.filter(block=block).delete()
        VersionRollup.objects.bulk_create(groups.values())
        return len(groups)
