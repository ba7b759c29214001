"""An exact-match response cache, keyed on the model version and the context.

Many users ask the same thing; a repeated question in the same context under
the same model version is answered from here, streamed through the same
protocol with `cached: true` and a cost of zero. Any change to the version
(model, prompt, temperature, max tokens) changes the key, so a rollback or a
new prompt never serves an old answer. Staff can switch it off at runtime.

The store is the Django cache: Redis in the scaled mode, the shared SQLite
cache in the embedded mode.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

from chat.callpath import ModelPlan
from chat.providers import ChatMessage

_SWITCH_KEY = "chat:response-cache:off"
_KEY_PREFIX = "chat:response:"


@dataclass(frozen=True, slots=True)
class CachedReply:
    text: str
    prompt_tokens: int
    completion_tokens: int


def normalise(text: str) -> str:
    """Return the text as keys see it: NFC, runs of white space as one space."""
    if not text.isascii():  # NFC leaves ASCII as it is
        text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())


def response_key(*, plan: ModelPlan, version_id: int | None, history: list[ChatMessage]) -> str:
    """Return the cache key for this version answering this exact context."""
    material = json.dumps(
        {
            "model": plan.model,
            "version": version_id,
            "temperature": plan.temperature,
            "max_tokens": plan.max_tokens,
            "context": [[m.role, normalise(m.content)] for m in history],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return _KEY_PREFIX + hashlib.sha256(material.encode()).hexdigest()


def last_resort_key(history: list[ChatMessage]) -> str:
    """Return a key for the same question under any version or context.

    Used only when every model has failed: an answer to the same question is
    better than none, so the key ignores the version and earlier turns.
    """
    question = next((m.content for m in reversed(history) if m.role == "user"), "")
    digest = hashlib.sha256(normalise(question).casefold().encode()).hexdigest()
    return _KEY_PREFIX + "any:" + digest


def cache_enabled() -> bool:
    return bool(settings.CHAT_RESPONSE_CACHE) and not cache.get(_SWITCH_KEY)


def cache_switch(*, enabled: bool) -> None:
    """Turn the cache on or off for every process at once (staff switch)."""
    if enabled:
        cache.delete(_SWITCH_KEY)
    else:
        cache.set(_SWITCH_KEY, 1, timeout=None)


def cache_lookup(key: str) -> CachedReply | None:
    return cache_lookup_many([key]).get(key)


def cache_lookup_many(keys: list[str], *, switch_read: bool = False) -> dict[str, CachedReply]:
    """Return the replies cached under any of `keys`, read in one round trip.

    A burst's sends are looked up together (chat/pipeline.py): one read of
    the staff switch and one of the keys, not two reads a send. With
    `switch_read`, the caller has just found the cache on.
    """
    if not keys or not (switch_read or cache_enabled()):
        return {}
    found: dict[str, CachedReply] = {}
    for key, raw in cache.get_many(keys).items():
        if not isinstance(raw, dict):
            continue
        try:
            found[key] = CachedReply(
                text=str(raw["text"]),
                prompt_tokens=int(raw["prompt_tokens"]),
                completion_tokens=int(raw["completion_tokens"]),
            )
        except (KeyError, TypeError, ValueError):
            continue
    return found


def cache_store_many(replies: dict[str, CachedReply]) -> None:
    """Store each reply under its key, in one round trip (one commit on SQLite).

    Replies that end together are stored together (chat/pipeline.py).
    """
    values = {
        key: {
            "text": reply.text,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
        }
        for key, reply in replies.items()
        if reply.text
    }
    if not values or not cache_enabled():
        return
    cache.set_many(values, timeout=settings.CHAT_RESPONSE_CACHE_TTL_SECONDS)
