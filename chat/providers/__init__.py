"""Model vendors behind one interface, chosen by a `provider:model` name."""

from __future__ import annotations

import importlib

from django.conf import settings
from django.core.signals import setting_changed

from .base import ChatMessage, Provider, ProviderError, StreamEvent, StreamOptions, Usage

__all__ = [
    "ChatMessage",
    "Provider",
    "ProviderError",
    "StreamEvent",
    "StreamOptions",
    "Usage",
    "import_provider",
    "provider_for",
    "providers_aclose",
    "split_model",
    "timeouts_for",
]

KNOWN_PROVIDERS = ("demo", "openai", "anthropic")

# One instance per vendor configuration and process: each holds a connection
# pool, and a new pool per reply would pay a TCP (and TLS) handshake every time.
_instances: dict[tuple[object, ...], Provider] = {}
# Every reply asks for its model's provider and deadlines, which settings
# alone decide: read once per model (eight settings, ~8 us a reply in a
# burst of a thousand), again after a change (tests change settings).
_providers: dict[str, Provider] = {}
_timeouts: dict[str, dict[str, float]] = {}


def _settings_changed(**_: object) -> None:
    _providers.clear()
    _timeouts.clear()


setting_changed.connect(_settings_changed)


def split_model(spec: str) -> tuple[str, str]:
    """Split `provider:model`; raise ValueError for anything else."""
    provider, sep, model = spec.partition(":")
    if not sep or not model or provider not in KNOWN_PROVIDERS:
        raise ValueError(
            f"model must look like 'provider:model' with provider one of "
            f"{', '.join(KNOWN_PROVIDERS)}; got {spec!r}"
        )
    return provider, model


def timeouts_for(spec: str) -> dict[str, float]:
    """Return this model's deadlines in seconds: connect, first_token, idle, total."""
    known = _timeouts.get(spec)
    if known is None:
        known = _timeouts[spec] = _read_timeouts(spec)
    return dict(known)


def _read_timeouts(spec: str) -> dict[str, float]:
    timeouts = {
        "connect": float(settings.CHAT_TIMEOUT_CONNECT_S),
        "first_token": float(settings.CHAT_TIMEOUT_FIRST_TOKEN_S),
        "idle": float(settings.CHAT_TIMEOUT_IDLE_S),
        "total": float(settings.CHAT_TIMEOUT_TOTAL_S),
    }
    override = settings.CHAT_TIMEOUTS.get(spec) or {}
    timeouts.update({k: float(v) for k, v in override.items() if k in timeouts})
    return timeouts


def provider_for(spec: str) -> Provider:
    """Return a ready provider for `provider:model`, configured from settings."""
    made = _providers.get(spec)
    if made is None:
        made = _providers[spec] = _provider_from_settings(spec)
    return made


def import_provider(provider: str) -> None:
    """Import a vendor's module (its SDK with it) ahead of its first reply."""
    if provider not in KNOWN_PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}")
    importlib.import_module(f"{__name__}.{provider}")


def _provider_from_settings(spec: str) -> Provider:
    provider, model = split_model(spec)
    if provider == "demo":
        from .demo import DemoProvider

        return DemoProvider(
            ttft_ms=settings.CHAT_DEMO_TTFT_MS,
            tokens_per_second=settings.CHAT_DEMO_TPS,
            reply_tokens=settings.CHAT_DEMO_REPLY_TOKENS,
        )
    connect = timeouts_for(spec)["connect"]
    if provider == "openai":
        key: tuple[object, ...] = (
            provider,
            settings.OPENAI_API_KEY,
            settings.OPENAI_BASE_URL,
            connect,
        )
    else:
        key = (provider, settings.ANTHROPIC_API_KEY, settings.ANTHROPIC_BASE_URL, connect)
    made = _instances.get(key)
    if made is None:
        made = _instances[key] = _make(provider, model=model, connect=connect)
    return made


async def providers_aclose() -> None:
    """Close the pooled connections of every provider this process made.

    Call it before the event loop that used them ends (server shutdown, a test),
    so the SDK clients are not left to close themselves on another loop.
    """
    for provider in list(_instances.values()):
        aclose = getattr(provider, "aclose", None)
        if aclose is not None:
            await aclose()


def _make(provider: str, *, model: str, connect: float) -> Provider:
    # The SDK's read timeout is only a backstop: the call path enforces the
    # first-token, idle-gap and whole-reply deadlines itself, per model.
    backstop = 3600.0
    if provider == "openai":
        from .openai import OpenAIProvider

        return OpenAIProvider(
            model=model,
            api_key=settings.OPENAI_API_KEY or None,
            base_url=settings.OPENAI_BASE_URL or None,
            connect_timeout=connect,
            read_timeout=backstop,
        )
    from .anthropic import AnthropicProvider

    return AnthropicProvider(
        model=model,
        api_key=settings.ANTHROPIC_API_KEY or None,
        base_url=settings.ANTHROPIC_BASE_URL or None,
        connect_timeout=connect,
        read_timeout=backstop,
    )
