"""Rate limits, daily budgets and abuse blocks, checked before a message is stored."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from chat.owners import Owner


@dataclass(frozen=True, slots=True)
class Reservation:
    """Budget held for one reply until it is settled with the real cost."""

    owner_key: str
    usd: Decimal = Decimal("0")
    tokens: int = 0


def check_send_limits(*, owner: Owner, client_ip: str) -> Reservation:
    """Raise RateLimited / BudgetExceeded / Forbidden, or return a reservation."""
    return Reservation(owner_key=owner.key)


def budget_settle(*, reservation: Reservation, cost_usd: Decimal, tokens: int) -> None:
    """Replace the reservation with what the reply really cost."""
    return None


def record_violation(*, owner: Owner, client_ip: str, kind: str) -> None:
    """Count a violation (a rate-limit hit, a blocked input) towards a block."""
    return None
