"""The per-process copy of the active version: reloaded on change, and never trusted blind."""

from __future__ import annotations

import pytest
from django.core.cache import cache

from chat.clock import ManualClock
from chat.snapshots import RECHECK_S, Snapshot
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


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    fake = ManualClock()
    monkeypatch.setattr(versions._routing, "_clock", fake.now)
    return fake


def test_a_change_elsewhere_is_seen_once_its_token_is_published(clock):
    v1, v2 = _two_versions()
    assert versions.version_for(conversation_id=1).version_id == v1.pk
    _switch_without_signals(v2)
    # The snapshot is what makes a message cheap: until told, it answers v1 ...
    clock.advance(1)
    assert versions.version_for(conversation_id=1).version_id == v1.pk
    # ... and another process's change publishes a new token, as this does.
    Snapshot("versions", lambda: None).changed()
    # The token was checked just now: it is checked again RECHECK_S later.
    clock.advance(RECHECK_S / 2)
    assert versions.version_for(conversation_id=1).version_id == v1.pk
    clock.advance(RECHECK_S / 2)
    assert versions.version_for(conversation_id=1).version_id == v2.pk


def test_a_change_in_this_process_is_seen_at_once(clock):
    v1, v2 = _two_versions()
    assert versions.version_for(conversation_id=1).version_id == v1.pk
    # version_activate changes the rows and tells the snapshot itself.
    versions.version_activate(version_id=v2.pk, actor_id=None)
    assert versions.version_for(conversation_id=1).version_id == v2.pk


def test_a_burst_of_reads_checks_the_token_once(clock, monkeypatch):
    _two_versions()
    reads = []
    real_get = cache.get
    monkeypatch.setattr(cache, "get", lambda *a, **k: reads.append(a[0]) or real_get(*a, **k))
    for _ in range(5):
        for _ in range(10):
            versions.version_for(conversation_id=1)
        clock.advance(RECHECK_S)
    assert reads == [versions._routing.key] * 5


def test_without_a_readable_cache_every_read_goes_to_the_database(clock, monkeypatch):
    v1, v2 = _two_versions()
    assert versions.version_for(conversation_id=1).version_id == v1.pk

    def down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("cache unreachable")

    monkeypatch.setattr(cache, "get", down)
    _switch_without_signals(v2)
    clock.advance(RECHECK_S)  # the next check of the token fails
    assert versions.version_for(conversation_id=1).version_id == v2.pk
    _switch_without_signals(v1)
    assert versions.version_for(conversation_id=1).version_id == v1.pk


def test_the_settings_profile_is_built_once_and_follows_a_settings_change(settings):
    settings.CHAT_MODEL = "demo:one"
    first = versions.settings_profile()
    assert first.model == "demo:one" and versions.settings_profile() is first
    settings.CHAT_MODEL = "demo:two"
    settings.CHAT_FALLBACK_MODELS = ["demo:three"]
    assert versions.settings_profile().model == "demo:two"
    assert versions.settings_profile().fallbacks == ("demo:three",)
    # With no version, a conversation is answered by that profile.
    assert versions.version_for(conversation_id=1).model == "demo:two"
