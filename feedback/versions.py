"""Which model/prompt version answers a conversation, and how staff change it.

A version is immutable: staff change the profile by creating a new version
(`version_create`), then activating it, rolling back, or splitting traffic.
Every change writes a `VersionEvent` (who, when, what changed).

Rules the rest of the product relies on:

* `version_for` answers from a per-process snapshot of the active version
  and the running split (`chat.snapshots`): every change here (and any save
  of a version or split row) sets a new shared token, so an activation, a
  rollback or a split is used by the very next reply, in every process, and
  a message costs one cache read instead of two queries.
* With no version row at all it answers from settings (`CHAT_MODEL`,
  `CHAT_FALLBACK_MODELS`, `CHAT_SYSTEM_PROMPT`) with `version_id=None`, so a
  fresh install chats without any setup. v1 is not created behind the
  operator's back: staff create it in the admin, whose form starts from those
  settings; replies made before that are shown as "settings (no version)".
* A running A/B split sends `challenger_percent` % of conversations to the
  challenger by a hash of (split id, conversation id): the same conversation
  always gets the same side while that split runs, and nothing is stored.
  The control is the version that was active when the split started;
  activating or rolling back ends the split, so "the next reply uses it"
  holds for rollbacks too.
* Rollback activates the version that was active before the current one,
  skipping versions that were themselves rolled back from, so pressing it
  twice walks further back instead of undoing the first rollback. The admin
  says which version it rolls back from: a second press of the same button
  (a double click, or two staff members on the same page) finds that version
  no longer active and changes nothing, instead of walking back once more.
* Every change of the active version or the split runs under one lock
  (`_versions_lock`), so two staff members changing them at once are served
  one after the other, each reading what the other committed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Max
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from chat.snapshots import Snapshot, from_settings
from feedback.models import ModelVersion, VersionEvent, VersionSplit

PROFILE_FIELDS = ("model", "fallbacks", "system_prompt", "temperature", "max_tokens")
# The PostgreSQL advisory lock that serialises changes of the active version and split.
_LOCK_KEY = 0x7665_7273  # "vers"


class RolledBackAlready(Exception):
    """The version a rollback was asked to leave is no longer the active one."""

    def __init__(self, active: ModelVersion | None) -> None:
        super().__init__("the active version changed")
        self.active = active


@dataclass(frozen=True, slots=True)
class ActiveVersion:
    version_id: int | None
    model: str
    fallbacks: tuple[str, ...]
    system_prompt: str
    temperature: float | None
    max_tokens: int | None


@dataclass(frozen=True, slots=True)
class _Routing:
    """Who answers new messages: the active version, or a running split's two sides."""

    active: ActiveVersion | None
    split_id: int | None = None
    challenger_percent: int = 0
    control: ActiveVersion | None = None
    challenger: ActiveVersion | None = None


def _load_routing() -> _Routing:
    split = (
        VersionSplit.objects.filter(is_running=True).select_related("control", "challenger").first()
    )
    if split is not None:
        return _Routing(
            active=as_active(split.control),
            split_id=split.pk,
            challenger_percent=split.challenger_percent,
            control=as_active(split.control),
            challenger=as_active(split.challenger),
        )
    version = ModelVersion.objects.filter(is_active=True).first()
    return _Routing(active=as_active(version) if version is not None else None)


_routing = Snapshot("versions", _load_routing)


@receiver(post_save, sender=ModelVersion)
@receiver(post_delete, sender=ModelVersion)
@receiver(post_save, sender=VersionSplit)
@receiver(post_delete, sender=VersionSplit)
def _routing_rows_changed(**kwargs: Any) -> None:
    _routing.changed()


def version_for(*, conversation_id: int) -> ActiveVersion:
    """Return the version that should answer this conversation's next message."""
    routing = _routing.get()
    if routing.split_id is not None and routing.control and routing.challenger:
        challenger = split_bucket(split_id=routing.split_id, conversation_id=conversation_id) < (
            routing.challenger_percent
        )
        return routing.challenger if challenger else routing.control
    if routing.active is not None:
        return routing.active
    return settings_profile()


def split_bucket(*, split_id: int, conversation_id: int) -> int:
    """Return a stable 0..99 bucket for a conversation within one split."""
    digest = hashlib.sha256(f"{split_id}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


@from_settings
def settings_profile() -> ActiveVersion:
    """Return the profile configured by settings, used while no version exists.

    Built once and again after a settings change: every message stored while
    no version exists asks for it (a burst of 1,000 in one trip).
    """
    return ActiveVersion(
        version_id=None,
        model=settings.CHAT_MODEL,
        fallbacks=tuple(settings.CHAT_FALLBACK_MODELS),
        system_prompt=settings.CHAT_SYSTEM_PROMPT,
        temperature=None,
        max_tokens=None,
    )


def as_active(version: ModelVersion) -> ActiveVersion:
    return ActiveVersion(
        version_id=version.pk,
        model=version.model,
        fallbacks=tuple(version.fallbacks or ()),
        system_prompt=version.system_prompt,
        temperature=version.temperature,
        max_tokens=version.max_tokens,
    )


def current_profile() -> dict[str, Any]:
    """Return the profile fields new versions start from: the active version's, or settings'."""
    active = ModelVersion.objects.filter(is_active=True).first()
    source = as_active(active) if active else settings_profile()
    return {
        "model": source.model,
        "fallbacks": list(source.fallbacks),
        "system_prompt": source.system_prompt,
        "temperature": source.temperature,
        "max_tokens": source.max_tokens,
    }


def check_profile(
    *,
    model: str,
    fallbacks: list[str],
    temperature: float | None,
    max_tokens: int | None,
) -> None:
    """Raise ValidationError (keyed by field) if a profile could not serve a reply."""
    from chat.providers import split_model

    errors: dict[str, str] = {}
    try:
        split_model(model)
    except ValueError as exc:
        errors["model"] = str(exc)
    for spec in fallbacks:
        try:
            split_model(spec)
        except ValueError as exc:
            errors["fallbacks"] = str(exc)
            break
    if temperature is not None and not 0 <= temperature <= 2:
        errors["temperature"] = "Temperature must be between 0 and 2."
    if max_tokens is not None and max_tokens < 1:
        errors["max_tokens"] = "Max tokens must be at least 1."
    if errors:
        raise ValidationError(errors)


def version_create(
    *,
    actor_id: int | None,
    model: str,
    fallbacks: list[str],
    system_prompt: str,
    temperature: float | None,
    max_tokens: int | None,
    note: str = "",
    based_on_id: int | None = None,
    activate: bool = False,
) -> ModelVersion:
    """Create the next-numbered version, record what changed, and optionally activate it.

    The diff is taken against `based_on_id`, or the active version, or the
    settings profile when there is no version yet.
    """
    check_profile(model=model, fallbacks=fallbacks, temperature=temperature, max_tokens=max_tokens)
    fields: dict[str, Any] = {
        "model": model,
        "fallbacks": list(fallbacks),
        "system_prompt": system_prompt,
        "temperature": temperature,
        "max_tokens": max_tokens,
    }
    for attempt in range(3):
        try:
            # The version, its audit row and its activation land together.
            with transaction.atomic():
                _versions_lock()
                base = (
                    ModelVersion.objects.filter(pk=based_on_id).first()
                    if based_on_id
                    else ModelVersion.objects.filter(is_active=True).first()
                )
                before = _profile_of(base) if base else current_profile()
                number = (ModelVersion.objects.aggregate(n=Max("number"))["n"] or 0) + 1
                version = ModelVersion.objects.create(
                    number=number, note=note, created_by_id=actor_id, **fields
                )
                VersionEvent.objects.create(
                    kind=VersionEvent.Kind.CREATED,
                    version=version,
                    from_version=base,
                    actor_id=actor_id,
                    changes=_diff(before, fields),
                    note=note,
                )
                if activate:
                    _activate(version=version, actor_id=actor_id, kind=VersionEvent.Kind.ACTIVATED)
                return version
        except IntegrityError:
            # Two staff members created a version at once and took the same number.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def version_activate(*, actor_id: int | None, version_id: int) -> ModelVersion:
    """Make a version the active one (ending any split); a no-op if it already is."""
    # Deactivating the old and activating the new must be seen together.
    with transaction.atomic():
        _versions_lock()
        version = ModelVersion.objects.select_for_update().get(pk=version_id)
        if version.is_active and not VersionSplit.objects.filter(is_running=True).exists():
            return version
        _activate(version=version, actor_id=actor_id, kind=VersionEvent.Kind.ACTIVATED)
        return version


def version_rollback(
    *, actor_id: int | None, from_version_id: int | None = None
) -> ModelVersion | None:
    """Activate the version that was active before the current one; None if there is none.

    `from_version_id` is the version the caller saw active and means to roll
    back from: if another one is active by now (someone rolled back or
    activated first), raise RolledBackAlready and change nothing.
    """
    # The target is chosen and activated under one lock on the history.
    with transaction.atomic():
        _versions_lock()
        current = ModelVersion.objects.select_for_update().filter(is_active=True).first()
        if from_version_id is not None and (current is None or current.pk != from_version_id):
            raise RolledBackAlready(current)
        if current is None:
            return None
        target = _rollback_target(current)
        if target is None:
            return None
        _activate(version=target, actor_id=actor_id, kind=VersionEvent.Kind.ROLLED_BACK)
        return target


def rollback_target() -> ModelVersion | None:
    """Return the version a rollback would activate now (for the admin's button)."""
    current = ModelVersion.objects.filter(is_active=True).first()
    return _rollback_target(current) if current else None


def _rollback_target(current: ModelVersion) -> ModelVersion | None:
    skip = {current.pk}
    history = VersionEvent.objects.filter(
        kind__in=[VersionEvent.Kind.ACTIVATED, VersionEvent.Kind.ROLLED_BACK]
    ).order_by("-id")
    for event in history.values("kind", "version_id", "from_version_id").iterator():
        if event["kind"] == VersionEvent.Kind.ROLLED_BACK and event["from_version_id"]:
            skip.add(event["from_version_id"])
        for candidate in (event["version_id"], event["from_version_id"]):
            if candidate and candidate not in skip:
                return ModelVersion.objects.get(pk=candidate)
    # Versions activated without an audit trail (e.g. loaded from a fixture).
    return ModelVersion.objects.filter(number__lt=current.number).exclude(pk__in=skip).first()


def _versions_lock() -> None:
    """Wait for any other change of the active version or split to commit; call in a transaction.

    Row locks cannot do it: a second activation locks its own target row and
    reads the active row from before the first one committed, then breaks
    the one-active constraint. PostgreSQL takes a transaction-scoped advisory
    lock; SQLite's IMMEDIATE transactions already let one writer in at a time.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])


def _activate(*, version: ModelVersion, actor_id: int | None, kind: str) -> None:
    previous = ModelVersion.objects.filter(is_active=True).exclude(pk=version.pk).first()
    _split_end(actor_id=actor_id, note=f"ended by {VersionEvent.Kind(kind).label.lower()}")
    if previous is not None:
        # The one-active constraint needs the old row cleared first.
        ModelVersion.objects.filter(pk=previous.pk).update(is_active=False)
    ModelVersion.objects.filter(pk=version.pk).update(is_active=True)
    _routing.changed()
    version.is_active = True
    VersionEvent.objects.create(
        kind=kind,
        version=version,
        from_version=previous,
        actor_id=actor_id,
        changes=_diff(_profile_of(previous), _profile_of(version)) if previous else {},
    )


def split_start(
    *, actor_id: int | None, challenger_id: int, challenger_percent: int
) -> VersionSplit:
    """Start sending a share of conversations to a challenger; ends any running split."""
    if not 1 <= challenger_percent <= 99:
        raise ValidationError({"challenger_percent": "The share must be between 1 and 99 %."})
    # The old split ends and the new one starts in one step.
    with transaction.atomic():
        _versions_lock()
        control = ModelVersion.objects.select_for_update().filter(is_active=True).first()
        if control is None:
            raise ValidationError("Activate a version first: it becomes the control.")
        if control.pk == challenger_id:
            raise ValidationError({"challenger": "The challenger must differ from the control."})
        challenger = ModelVersion.objects.get(pk=challenger_id)
        _split_end(actor_id=actor_id, note="replaced by a new split")
        split = VersionSplit.objects.create(
            control=control,
            challenger=challenger,
            challenger_percent=challenger_percent,
            started_by_id=actor_id,
        )
        VersionEvent.objects.create(
            kind=VersionEvent.Kind.SPLIT_STARTED,
            version=challenger,
            from_version=control,
            actor_id=actor_id,
            changes={"challenger_percent": [None, challenger_percent]},
            note=f"{challenger_percent}% of conversations to v{challenger.number}",
        )
        return split


def split_end(*, actor_id: int | None) -> bool:
    """End the running split, if any; the control stays active. Return whether one ran."""
    # The split's end and its audit row land together.
    with transaction.atomic():
        _versions_lock()
        return _split_end(actor_id=actor_id, note="ended by staff")


def _split_end(*, actor_id: int | None, note: str) -> bool:
    split = VersionSplit.objects.select_for_update().filter(is_running=True).first()
    if split is None:
        return False
    VersionSplit.objects.filter(pk=split.pk).update(is_running=False, ended_at=timezone.now())
    _routing.changed()
    VersionEvent.objects.create(
        kind=VersionEvent.Kind.SPLIT_ENDED,
        version_id=split.challenger_id,
        from_version_id=split.control_id,
        actor_id=actor_id,
        note=note,
    )
    return True


def _profile_of(version: ModelVersion | None) -> dict[str, Any]:
    if version is None:
        return {}
    return {name: getattr(version, name) for name in PROFILE_FIELDS}


def _diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    return {
        name: [before.get(name), after.get(name)]
        for name in PROFILE_FIELDS
        if before.get(name) != after.get(name)
    }
