"""Versioned model profiles: create (never edit), audit with diffs, rollback, A/B split."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.test import Client

from chat.models import Message
from feedback import versions
from feedback.models import ModelVersion, VersionEvent
from tests.chat.helpers import recv, recv_until_done, send, send_frame
from tests.conftest import session_cookie_for

VERSIONS = "/admin/feedback/modelversion/"


def add_version(client: Client, **fields: object) -> None:
    data = {
        "model": "demo:alpha",
        "fallbacks_text": "",
        "system_prompt": "Be brief.",
        "temperature": "",
        "max_tokens": "",
        "note": "",
        **fields,
    }
    response = client.post(f"{VERSIONS}add/", data)
    assert response.status_code == 302, response.content.decode()[:3000]


@pytest.mark.django_db
def test_without_versions_replies_use_settings(settings):
    settings.CHAT_MODEL = "demo:from-settings"
    active = versions.version_for(conversation_id=1)
    assert (active.version_id, active.model) == (None, "demo:from-settings")


@pytest.mark.django_db
def test_staff_edit_by_creating_versions_and_every_change_is_audited_as_a_diff(staff_client):
    add_version(staff_client, model="demo:alpha", system_prompt="Be brief.", activate="on")
    v1 = ModelVersion.objects.get()
    add_version(
        staff_client,
        model="demo:beta",
        fallbacks_text="demo:alpha",
        system_prompt="Be brief.\nCite sources.",
        temperature="0.3",
        based_on=str(v1.pk),
        note="try beta",
    )
    v2 = ModelVersion.objects.get(number=2)
    assert (v2.model, v2.fallbacks, v2.temperature, v2.is_active) == (
        "demo:beta",
        ["demo:alpha"],
        0.3,
        False,
    )
    created = VersionEvent.objects.get(kind="created", version=v2)
    assert created.actor.username == "staffer" and created.from_version == v1
    assert created.changes == {
        "model": ["demo:alpha", "demo:beta"],
        "fallbacks": [[], ["demo:alpha"]],
        "system_prompt": ["Be brief.", "Be brief.\nCite sources."],
        "temperature": [None, 0.3],
    }
    page = staff_client.get(f"{VERSIONS}{v2.pk}/change/").content.decode()
    assert "+Cite sources." in page and "demo:alpha</del>" in page
    log = staff_client.get("/admin/feedback/versionevent/").content.decode()
    assert "+Cite sources." in log

    # The admin never edits a version in place.
    response = staff_client.post(f"{VERSIONS}{v1.pk}/change/", {"model": "demo:gamma"})
    assert response.status_code == 403
    assert ModelVersion.objects.get(pk=v1.pk).model == "demo:alpha"
    # The "edit" link opens the add form filled from the version.
    form = staff_client.get(f"{VERSIONS}add/", {"from": v2.pk}).content.decode()
    assert "demo:beta" in form and "Cite sources." in form


@pytest.mark.django_db
def test_a_version_that_could_not_answer_is_refused(staff_client):
    response = staff_client.post(
        f"{VERSIONS}add/",
        {"model": "gpt-4o", "fallbacks_text": "nope", "temperature": "5", "system_prompt": ""},
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert set(errors) == {"model", "fallbacks_text", "temperature"}
    assert not ModelVersion.objects.exists()


@database_sync_to_async
def _setup_two_versions(make_user) -> tuple[str, Client]:
    staff = Client()
    staff.force_login(make_user("staffer", staff=True))
    add_version(staff, model="demo:alpha", activate="on")
    add_version(staff, model="demo:beta", activate="on", note="bad one")
    return session_cookie_for(make_user("alice")), staff


@database_sync_to_async
def _roll_back(staff: Client) -> str:
    page = staff.get(VERSIONS).content.decode()
    assert "Roll back to v1 (demo:alpha)" in page
    response = staff.post(f"{VERSIONS}rollback/", _rollback_form(page))
    assert response.status_code == 302
    return staff.get(response["Location"]).content.decode()


@database_sync_to_async
def _reply(message_id: int) -> Message:
    return Message.objects.select_related("version").get(pk=message_id)


@pytest.mark.django_db(transaction=True)
async def test_rollback_changes_the_model_of_the_next_reply(ws, make_user):
    cookie, staff = await _setup_two_versions(make_user)
    comm = await ws(cookie)

    await send(comm, send_frame("before the rollback"))
    before = await recv(comm)
    await recv_until_done(comm)
    assert before["model"] == "demo:beta"

    page = await _roll_back(staff)
    assert "Rolled back: v1 (demo:alpha) answers the next reply." in page

    await send(comm, send_frame("after the rollback", conversation=before["conversation"]))
    after = await recv(comm)
    done = (await recv_until_done(comm))[-1]
    assert after["model"] == "demo:alpha" and done["model"] == "demo:alpha"
    reply = await _reply(after["message"])
    assert (reply.version.number, reply.model, reply.status) == (1, "demo:alpha", "finished")
    event = await database_sync_to_async(VersionEvent.objects.filter(kind="rolled_back").get)()
    assert (event.version_id, event.from_version_id) == (
        reply.version_id,
        (await _reply(before["message"])).version_id,
    )


@pytest.mark.django_db
def test_rollback_walks_back_instead_of_undoing_itself():
    v1, v2, _v3 = (
        versions.version_create(
            actor_id=None,
            model=f"demo:m{n}",
            fallbacks=[],
            system_prompt="",
            temperature=None,
            max_tokens=None,
            activate=True,
        )
        for n in (1, 2, 3)
    )
    assert versions.version_rollback(actor_id=None) == v2
    assert versions.version_rollback(actor_id=None) == v1
    assert versions.version_rollback(actor_id=None) is None
    assert versions.version_for(conversation_id=7).version_id == v1.pk


@pytest.mark.django_db
def test_ab_split_lands_within_tolerance_over_1000_conversations_and_is_sticky(staff_client):
    add_version(staff_client, model="demo:control", activate="on")
    add_version(staff_client, model="demo:challenger")
    challenger = ModelVersion.objects.get(model="demo:challenger")
    response = staff_client.post(
        f"{VERSIONS}split/", {"challenger": challenger.pk, "challenger_percent": "30"}
    )
    assert response.status_code == 302

    first = {cid: versions.version_for(conversation_id=cid).model for cid in range(1, 1001)}
    counts = Counter(first.values())
    # 30 % of 1,000: binomial sd is 14.5, so ±50 is well over 3 sd.
    assert 250 <= counts["demo:challenger"] <= 350, counts
    assert counts["demo:challenger"] + counts["demo:control"] == 1000
    again = {cid: versions.version_for(conversation_id=cid).model for cid in range(1, 201)}
    assert again == {cid: first[cid] for cid in range(1, 201)}

    staff_client.post(f"{VERSIONS}split/end/")
    assert {versions.version_for(conversation_id=c).model for c in range(1, 50)} == {"demo:control"}
    kinds = list(VersionEvent.objects.order_by("id").values_list("kind", flat=True))
    assert kinds[-2:] == ["split_started", "split_ended"]


@pytest.mark.django_db(transaction=True)
async def test_split_assignment_is_what_the_websocket_reports_and_stores(ws, make_user):
    @database_sync_to_async
    def setup() -> str:
        v1 = versions.version_create(
            actor_id=None,
            model="demo:control",
            fallbacks=[],
            system_prompt="",
            temperature=None,
            max_tokens=None,
            activate=True,
        )
        v2 = versions.version_create(
            actor_id=None,
            model="demo:challenger",
            fallbacks=[],
            system_prompt="",
            temperature=None,
            max_tokens=None,
        )
        versions.split_start(actor_id=None, challenger_id=v2.pk, challenger_percent=50)
        assert v1.is_active
        return session_cookie_for(make_user("alice"))

    comm = await ws(await setup())
    seen = []
    for _ in range(6):
        await send(comm, send_frame("hello"))
        accepted = await recv(comm)
        await recv_until_done(comm)
        expected = await database_sync_to_async(versions.version_for)(
            conversation_id=accepted["conversation"]
        )
        assert accepted["model"] == expected.model
        assert (await _reply(accepted["message"])).version_id == expected.version_id
        seen.append(accepted["model"])
        # A later message in the same conversation stays on the same side.
        await send(comm, send_frame("again", conversation=accepted["conversation"]))
        assert (await recv(comm))["model"] == accepted["model"]
        await recv_until_done(comm)


@pytest.mark.django_db
def test_two_staff_pressing_the_same_rollback_roll_back_once(make_user):
    for n in (1, 2, 3):
        versions.version_create(
            actor_id=None,
            model=f"demo:m{n}",
            fallbacks=[],
            system_prompt="",
            temperature=None,
            max_tokens=None,
            activate=True,
        )
    first, second = Client(), Client()
    first.force_login(make_user("first", staff=True))
    second.force_login(make_user("second", staff=True))
    # Both have the list open: v3 is active and the button says "Roll back to v2".
    pages = [c.get(VERSIONS).content.decode() for c in (first, second)]
    assert all("Roll back to v2 (demo:m2)" in page for page in pages)
    forms = [_rollback_form(page) for page in pages]

    assert first.post(f"{VERSIONS}rollback/", forms[0]).status_code == 302
    response = second.post(f"{VERSIONS}rollback/", forms[1], follow=True)

    # The second press asked for v3 → v2, which has happened: v1 is not activated.
    assert ModelVersion.objects.get(is_active=True).number == 2
    assert VersionEvent.objects.filter(kind="rolled_back").count() == 1
    page = response.content.decode()
    assert "v2 (demo:m2) is active" in page and "Nothing was changed" in page
    # A post that does not say what it rolls back from (a page from an older release) neither.
    assert first.post(f"{VERSIONS}rollback/").status_code == 302
    assert ModelVersion.objects.get(is_active=True).number == 2


def _rollback_form(page: str) -> dict[str, str]:
    """Return the fields the changelist's rollback form posts (besides the CSRF token)."""
    form = re.search(r'<form[^>]*action="[^"]*rollback/"[^>]*>(.*?)</form>', page, re.S)
    assert form is not None, "no rollback form on the page"
    fields = re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', form.group(1))
    return {name: value for name, value in fields if name != "csrfmiddlewaretoken"}


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Check a condition again and again (each check is a query) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)


@pytest.mark.django_db(transaction=True)
def test_two_staff_activating_at_once_are_served_one_after_the_other(make_user, monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("SQLite's IMMEDIATE transactions let one writer in at a time")
    v1, v2, _v3 = (
        versions.version_create(
            actor_id=None,
            model=f"demo:m{n}",
            fallbacks=[],
            system_prompt="",
            temperature=None,
            max_tokens=None,
            activate=n == 3,
        )
        for n in (1, 2, 3)
    )
    first, second = Client(), Client()
    first.force_login(make_user("first", staff=True))
    second.force_login(make_user("second", staff=True))

    # The first activation stops half-way, once it has read which version is active.
    paused, go = threading.Event(), threading.Event()
    split_end = versions._split_end

    def pausing_split_end(**kwargs: Any) -> bool:
        if threading.current_thread().name == "first":
            paused.set()
            assert go.wait(10)
        return split_end(**kwargs)

    monkeypatch.setattr(versions, "_split_end", pausing_split_end)
    statuses: dict[str, int] = {}

    def activate(name: str, client: Client, version: ModelVersion) -> None:
        try:
            statuses[name] = client.post(f"{VERSIONS}{version.pk}/activate/").status_code
        finally:
            connection.close()

    threads = [
        threading.Thread(target=activate, args=("first", first, v1), name="first"),
        threading.Thread(target=activate, args=("second", second, v2), name="second"),
    ]
    threads[0].start()
    try:
        assert paused.wait(10)
        threads[1].start()

        def second_done_or_waiting() -> bool:
            if not threads[1].is_alive():
                return True
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
                return cursor.fetchone()[0] > 0

        _wait_until(second_done_or_waiting, "the second activation neither ended nor waited")
    finally:
        go.set()
        for thread in threads:
            thread.join(20)

    # Both were served; the later one is active, and the history says so.
    assert statuses == {"first": 302, "second": 302}
    active = ModelVersion.objects.get(is_active=True)
    last = VersionEvent.objects.filter(kind="activated").order_by("-id").first()
    assert last is not None and last.version_id == active.pk
    assert last.from_version_id in (v1.pk, v2.pk) and last.from_version_id != active.pk


@pytest.mark.django_db
@pytest.mark.parametrize("page", ["add/?from=", "split/?challenger="])
@pytest.mark.parametrize("value", ["²", "99999999999999999999999", "x"])
def test_version_pages_take_any_version_parameter_without_failing(staff_client, page, value):
    """Str.isdigit() takes "²", which int() refuses; staff edit these links by hand."""
    versions.version_create(
        actor_id=None,
        model="demo:one",
        fallbacks=[],
        system_prompt="",
        temperature=None,
        max_tokens=None,
        activate=True,
    )
    staff_client.raise_request_exception = False
    response = staff_client.get(f"{VERSIONS}{page}{value}")
    assert response.status_code == 200
