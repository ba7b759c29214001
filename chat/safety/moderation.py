"""Moderation of what users send and what models answer, behind one interface."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Verdict:
    stage: str  # "input" | "output"
    category: str
    score: float

    def as_json(self) -> dict[str, object]:
        return {"stage": self.stage, "category": self.category, "score": round(self.score, 4)}


class Moderated(Exception):
    """Raised by the output gate when a window of the reply is flagged."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(f"{verdict.stage}:{verdict.category}")
        self.verdict = verdict


async def moderate_input(text: str) -> Verdict | None:
    """Return a verdict when the user's message is flagged, else None."""
    return None


class OutputGate:
    """Hold the reply back until each window of it has been moderated."""

    async def feed(self, chunk: str) -> list[str]:
        """Return the text that is now safe to show; raise Moderated on a flag."""
        return [chunk]

    async def finish(self) -> list[str]:
        """Moderate and return whatever is still held back."""
        return []
