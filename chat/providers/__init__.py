"""Model vendors behind one interface, chosen by a `provider:model` name."""

from __future__ import annotations

from django.conf import settings

from .base import ChatMessage, Provider, ProviderError, StreamEvent, StreamOptions, Usage

__all__ = [
    "ChatMessage",
    "Provider",
    "ProviderError",
    "StreamEvent",
    "StreamOptions",
    "Usage",
    "provider_for",
    "split_model",
]

KNOWN_PROVIDERS = ("demo", "openai", "anthropic")


def split_model(spec: str) -> tuple[str, str]:
    """Split `provider:model`; raise ValueError for anything else."""
    provider, sep, model = spec.partition(":")
    if not sep or not model or provider not in KNOWN_PROVIDERS:
        raise ValueError(
            f"model must look like 'provider:model' with provider one of "
            f"{', '.join(KNOWN_PROVIDERS)}; got {spec!r}"
        )
    return provider, model


def provider_for(spec: str) -> Provider:
    """Return a ready provider for `provider:model`, configured from settings."""
    provider, _model = split_model(spec)
    if provider == "demo":
        from .demo import DemoProvider

        return DemoProvider(
            ttft_ms=settings.CHAT_DEMO_TTFT_MS,
            tokens_per_second=settings.CHAT_DEMO_TPS,
            reply_tokens=settings.CHAT_DEMO_REPLY_TOKENS,
        )
    raise ValueError(f"provider {provider!r} is not wired in yet")
