"""What a reply cost, from the price table in force when it was made.

Prices are rows of `chat.models.Price` (staff edit them in the admin); the
row that applies is the latest whose `effective_from` is not after the reply,
so a new price never rewrites what old replies were charged. A snapshot of a
model (`openai:gpt-4o-2024-08-06`, `anthropic:claude-3-5-sonnet-latest`)
takes the price of the name it dates (`openai:gpt-4o`); any other suffix is
another model, with a price of its own (`openai:gpt-5-pro` is not `gpt-5`).
The demo model is free; a model with no price costs 0 and is logged once
per process.
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from decimal import Decimal

from django.db import close_old_connections, connection

from chat.models import Price
from chat.providers import Usage

logger = logging.getLogger(__name__)

_MILLION = Decimal(1_000_000)
_warned: set[str] = set()
# For `reply_cost` called from async code: one thread, one database connection.
_lookup_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="price-lookup")


# A snapshot's suffix: a date (-2024-08-06, -20241022), a month-day code
# (-0125) or -latest. Only these fall back to the name they extend: another
# suffix is another model (gpt-5-pro costs about ten times gpt-5).
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|latest)$")


def price_at(*, model: str, at: datetime) -> Price | None:
    """Return the Price row in force for `model` at `at`, or None."""
    candidates = [model]
    while (snapshot := _SNAPSHOT.search(candidates[-1])) is not None:
        candidates.append(candidates[-1][: snapshot.start()])
    rows = list(
        Price.objects.filter(model__in=candidates, effective_from__lte=at).order_by(
            "model", "-effective_from"
        )
    )
    for candidate in candidates:
        for row in rows:
            if row.model == candidate:
                return row
    return None


def cost_of(*, price: Price, usage: Usage) -> Decimal:
    """Return the USD cost of `usage` at `price`."""
    return (
        Decimal(usage.prompt_tokens) * price.input_per_mtok
        + Decimal(usage.completion_tokens) * price.output_per_mtok
    ) / _MILLION


def reply_cost(*, model: str, usage: Usage | None, at: datetime) -> Decimal:
    """Return the reply's cost in USD; the demo model and unpriced models cost 0.

    Safe to call from async code: the price is then read on a worker thread
    (one indexed query) so the ORM's async guard is respected.
    """
    if usage is None or model.startswith("demo:"):
        return Decimal("0")
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        price = price_at(model=model, at=at)
    else:
        price = _lookup_thread.submit(_price_in_thread, model, at).result()
    return _priced(model, price, usage)


async def areply_cost(*, model: str, usage: Usage | None, at: datetime) -> Decimal:
    """Return the reply's cost in USD without blocking the event loop."""
    if usage is None or model.startswith("demo:"):
        return Decimal("0")
    loop = asyncio.get_running_loop()
    price = await loop.run_in_executor(_lookup_thread, _price_in_thread, model, at)
    return _priced(model, price, usage)


def _priced(model: str, price: Price | None, usage: Usage) -> Decimal:
    if price is None:
        if model not in _warned:
            _warned.add(model)
            logger.warning("no price for %s: its replies are recorded as costing 0", model)
        return Decimal("0")
    return cost_of(price=price, usage=usage)


def _price_in_thread(model: str, at: datetime) -> Price | None:
    close_old_connections()
    try:
        return price_at(model=model, at=at)
    finally:
        # Never hold a connection open between replies (a test database must
        # be droppable, and PostgreSQL connections are pooled anyway).
        connection.close()
