"""The per-process copy of the active version: reloaded on change, and never trusted blind."""

from __future__ import annotations

import pytest
from django.core.cache import cache

from chat.snapshots import Snapshot
from feedback import versions
from feedback.models import ModelVersion

pytestmark = pytest.mark.django_db


def _two_versions() -> tuple[ModelVersion, ModelVersion]:
    made = [
        versions.version_create(
            actor_id=None,
            model=f"demo:v{n}",
            fallbacks=[],
            system_prompt="",
            temperature=None,
            max_tokens=None,
            activate=n == 1,
        )
        for n in (1, 2)
    ]
    return made[0], made[1]


def _switch_without_signals(to: ModelVersion) -> None:
    # What another process's change looks like from here: rows change, no
    # signal fires in this process.
    ModelVersion.objects.update(is_active=False)
    ModelVersion.objects.filter(pk=to.pk).update(is_active=True)


def test_a_change_elsewhere_is_seen_once_its_token_is_published():
    v1, v2 = _two_versions()
    assert versions.version_for(conversation_id=1).version_id == v1.pk
    _switch_without_signals(v2)
    # The snapshot is what makes a message cheap: until told, it answers v1 ...
    assert versions.version_for(conversation_id=1).version_id == v1.pk
    # ... and another process's change publishes a new token, as this does.
    Snapshot("versions", lambda: None).changed()
    assert versions.version_for(conversation_id=1).version_id == v2.pk


def test_without_a_readable_cache_every_read_goes_to_the_database(monkeypatch):
    v1, v2 = _two_versions()
    assert versions.version_for(conversation_id=1).version_id == v1.pk

    def down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("cache unreachable")

    monkeypatch.setattr(cache, "get", down)
    _switch_without_signals(v2)
    assert versions.version_for(conversation_id=1).version_id == v2.pk
