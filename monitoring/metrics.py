"""Prometheus metrics (SPEC names). Every function here is cheap and never raises."""

from __future__ import annotations


def reply_observed(
    *,
    model: str,
    outcome: str,
    ttft_s: float | None,
    duration_s: float,
    prompt_tokens: int,
    completion_tokens: int,
    cost_usd: float,
    error_code: str,
) -> None:
    return None


def stream_started() -> None:
    return None


def stream_ended() -> None:
    return None


def ratelimited(scope: str) -> None:
    return None


def moderation_blocked(stage: str, category: str) -> None:
    return None


def cache_checked(result: str) -> None:
    return None


def feedback_saved(rating: int) -> None:
    return None


def queue_depth_changed(delta: int) -> None:
    return None


def circuit_state(model: str, is_open: bool) -> None:
    return None
