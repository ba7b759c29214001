"""Who owns a conversation: a signed-in user, or an anonymous browser session."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Q


@dataclass(frozen=True, slots=True)
class Owner:
    user_id: int | None
    session_key: str = ""

    @property
    def key(self) -> str:
        """Return the stable key that idempotency and limits are counted by."""
        return f"u:{self.user_id}" if self.user_id is not None else f"s:{self.session_key}"

    @property
    def is_anonymous(self) -> bool:
        return self.user_id is None

    def conversation_filter(self, prefix: str = "") -> Q:
        """Return a filter that matches only this owner's conversations."""
        if self.user_id is not None:
            return Q(**{f"{prefix}user_id": self.user_id})
        return Q(**{f"{prefix}user__isnull": True, f"{prefix}session_key": self.session_key})
