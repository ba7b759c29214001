"""Beat jobs through their Celery tasks: rollups, dashboard, spend alert, reaper, retention."""

from __future__ import annotations

import datetime as dt
import re
import time
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from chat.models import Conversation, Message
from chat.services import reply_finish
from monitoring import tasks
from monitoring.models import Alert, DailyUserSpend, HourlyRollup

pytestmark = pytest.mark.django_db


def _reply(conversation: Conversation, **fields) -> Message:
    defaults = dict(
        role=Message.Role.ASSISTANT,
        status=Message.Status.FINISHED,
        finish_reason="stop",
        content="a reply",
        model="demo:demo",
        ttft_ms=100,
        latency_ms=1000,
        prompt_tokens=10,
        completion_tokens=20,
        cost_usd=Decimal("0.01"),
    )
    defaults.update(fields)
    return Message.objects.create(conversation=conversation, **defaults)


def _backdate(message: Message, moment: dt.datetime) -> None:
    Message.objects.filter(pk=message.pk).update(created_at=moment)


@pytest.fixture
def conversation(make_user) -> Conversation:
    return Conversation.objects.create(user=make_user("carol"))


def test_rollup_counts_each_reply_once_however_often_it_runs(conversation):
    for i in range(5):
        _reply(conversation, latency_ms=1000 + i)
    _reply(conversation, finish_reason="error", error_code="timeout", content="", ttft_ms=None)
    _reply(
        conversation,
        finish_reason="moderated",
        moderation={"stage": "output", "category": "violence", "score": 0.9},
    )
    _reply(conversation, status=Message.Status.PENDING, finish_reason="")
    for _ in range(3):
        tasks.rollups_refresh.apply()
    (row,) = HourlyRollup.objects.all()
    assert row.replies == 7
    assert row.errors == 1 and row.errors_by_code == {"timeout": 1}
    assert row.moderated == 1 and row.moderation_by_category == {"violence": 1}
    assert row.empty == 1
    assert sum(row.ttft_hist) == 6 and sum(row.latency_hist) == 7
    assert row.completion_tokens == 7 * 20
    assert row.cost_usd == Decimal("0.07")
    (spend,) = DailyUserSpend.objects.all()
    assert spend.user_id == conversation.user_id and spend.replies == 7


def test_dashboard_is_staff_only_and_shows_the_numbers(conversation, make_user):
    for _ in range(4):
        _reply(conversation)
    _reply(conversation, finish_reason="error", error_code="unavailable", content="")
    tasks.rollups_refresh.apply()
    assert Client().get("/admin/monitoring/dashboard/").status_code == 302
    staff = Client()
    staff.force_login(make_user("ops", staff=True))
    index = staff.get("/admin/").content.decode()
    assert "/admin/monitoring/dashboard/" in index
    for name in ("1h", "24h", "7d", "30d"):
        page = staff.get(f"/admin/monitoring/dashboard/?range={name}")
        assert page.status_code == 200
    html = page.content.decode()
    assert "<svg" in html
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert "20.0 %" in html  # error rate: 1 of 5
    assert "carol" in html  # top users by spend
    assert "unavailable" in html
    custom = staff.get(
        "/admin/monitoring/dashboard/?range=custom&start=2020-01-01T00:00&end=2020-01-02T00:00"
    )
    assert custom.status_code == 200 and "2020-01-01 00:00" in custom.content.decode()


def test_spend_alert_fires_once_per_day_over_the_threshold(conversation, settings):
    settings.MONITORING_DAILY_SPEND_ALERT_USD = 0.05
    _reply(conversation, cost_usd=Decimal("0.04"))
    tasks.spend_check.apply()
    assert not Alert.objects.exists()
    _reply(conversation, cost_usd=Decimal("0.02"))
    tasks.spend_check.apply()
    tasks.spend_check.apply()
    (alert,) = Alert.objects.all()
    assert alert.kind == "spend" and alert.occurrences == 2
    assert alert.detail["spent_usd"] == pytest.approx(0.06)


def test_spend_that_passes_the_threshold_just_before_midnight_is_alerted(conversation, settings):
    from monitoring import services

    settings.MONITORING_DAILY_SPEND_ALERT_USD = 0.05
    midnight = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    late = _reply(conversation, cost_usd=Decimal("0.06"))
    _backdate(late, midnight - dt.timedelta(minutes=3))  # after the day's last check
    # The first check of the new day, a few minutes past midnight.
    services.spend_check(now=midnight + dt.timedelta(minutes=7))
    (alert,) = Alert.objects.all()
    yesterday = midnight - dt.timedelta(days=1)
    assert alert.key == f"spend:{yesterday:%Y-%m-%d}"
    assert alert.detail["spent_usd"] == pytest.approx(0.06)
    # Later checks leave it be; today has spent nothing.
    services.spend_check(now=midnight + dt.timedelta(minutes=17))
    services.spend_check(now=midnight + dt.timedelta(hours=2))
    (alert,) = Alert.objects.all()
    assert alert.occurrences == 1


def test_reaper_fails_old_pending_replies_and_spares_live_ones(conversation, settings):
    settings.MONITORING_REAP_AFTER_S = 60
    stale = _reply(
        conversation, status=Message.Status.PENDING, finish_reason="", content="partial te"
    )
    _backdate(stale, timezone.now() - dt.timedelta(seconds=120))
    live = _reply(conversation, status=Message.Status.PENDING, finish_reason="", content="")
    tasks.replies_reap.apply()
    stale.refresh_from_db()
    live.refresh_from_db()
    assert stale.status == "finished"
    assert (stale.finish_reason, stale.error_code) == ("error", "unavailable")
    assert stale.content == "partial te"
    assert live.status == "pending"
    # A late finisher from the "dead" process cannot overwrite the reaper's result.
    assert not reply_finish(
        reply_id=stale.pk,
        content="late",
        finish_reason="stop",
        model="demo:demo",
        ttft_ms=1,
        latency_ms=1,
        prompt_tokens=1,
        completion_tokens=1,
        cost_usd=Decimal("0"),
    )


def test_retention_deletes_idle_conversations(conversation, make_user, settings):
    settings.MONITORING_RETENTION_DAYS = 30
    _reply(conversation)
    fresh = Conversation.objects.create(user=make_user("dave"))
    Conversation.objects.filter(pk=conversation.pk).update(
        updated_at=timezone.now() - dt.timedelta(days=31)
    )
    tasks.conversations_expire.apply()
    assert list(Conversation.objects.values_list("pk", flat=True)) == [fresh.pk]
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()


def test_retention_can_anonymise_instead(conversation, settings):
    settings.MONITORING_RETENTION_DAYS = 30
    settings.MONITORING_RETENTION_MODE = "anonymise"
    reply = _reply(conversation, content="my address is secret")
    Conversation.objects.filter(pk=conversation.pk).update(
        title="about me", updated_at=timezone.now() - dt.timedelta(days=31)
    )
    tasks.conversations_expire.apply()
    tasks.conversations_expire.apply()
    conversation.refresh_from_db()
    reply.refresh_from_db()
    assert conversation.user_id is None and conversation.title == ""
    assert reply.content == "" and reply.completion_tokens == 20


def test_anonymising_keeps_the_rating_and_drops_what_people_wrote_about_it(conversation, settings):
    from chat.owners import Owner
    from feedback.models import Feedback, ReviewEvent
    from feedback.services import feedback_submit

    settings.MONITORING_RETENTION_DAYS = 30
    settings.MONITORING_RETENTION_MODE = "anonymise"
    owner = Owner(user_id=conversation.user_id)
    reply = _reply(conversation, owner_key=owner.key)
    for rating, comment in ((1, "I am Alice Smith"), (-1, "call me on 555 0100")):
        feedback_submit(
            owner=owner,
            client_ip="10.0.0.8",
            message_id=reply.pk,
            rating=rating,
            reasons=["inaccurate"] if rating == -1 else [],
            comment=comment,
        )
    Feedback.objects.filter(message=reply).update(staff_note="rang Alice back")
    assert ReviewEvent.objects.filter(feedback__message=reply).exclude(before="").exists()
    Conversation.objects.filter(pk=conversation.pk).update(
        updated_at=timezone.now() - dt.timedelta(days=31)
    )
    tasks.conversations_expire.apply()
    (row,) = Feedback.objects.filter(message=reply)
    assert (row.rating, row.reasons, row.model) == (-1, ["inaccurate"], "demo:demo")
    assert (row.user_id, row.comment, row.staff_note) == (None, "", "")
    assert row.owner_key == f"anonymised:{row.pk}"
    assert not ReviewEvent.objects.filter(feedback=row).exclude(before="", after="").exists()


def test_retention_off_by_default(conversation):
    Conversation.objects.filter(pk=conversation.pk).update(
        updated_at=timezone.now() - dt.timedelta(days=3000)
    )
    tasks.conversations_expire.apply()
    assert Conversation.objects.filter(pk=conversation.pk).exists()


def test_seed_command_fills_the_dashboard_quickly(make_user):
    call_command("seed_replies", 3000, days=7, users=5)
    assert Message.objects.count() == 3000
    assert sum(HourlyRollup.objects.values_list("replies", flat=True)) == 3000
    staff = Client()
    staff.force_login(make_user("ops", staff=True))
    started = time.perf_counter()
    page = staff.get("/admin/monitoring/dashboard/?range=7d")
    assert page.status_code == 200
    assert time.perf_counter() - started < 2.0
    assert "seed-user-" in page.content.decode()


def test_anonymising_copes_with_two_owners_who_used_the_same_client_msg_id(make_user, settings):
    """Clients choose client_msg_id: two people's messages may share one."""
    import uuid

    settings.MONITORING_RETENTION_DAYS = 30
    settings.MONITORING_RETENTION_MODE = "anonymise"
    same = uuid.UUID(int=0)
    ids = []
    for name in ("erin", "frank"):
        user = make_user(name)
        conversation = Conversation.objects.create(user=user)
        Message.objects.create(
            conversation=conversation,
            role=Message.Role.USER,
            content=f"I am {name}",
            owner_key=f"u:{user.pk}",
            client_msg_id=same,
        )
        ids.append(conversation.pk)
    Conversation.objects.filter(pk__in=ids).update(
        updated_at=timezone.now() - dt.timedelta(days=31)
    )
    tasks.conversations_expire.apply(throw=True)
    assert set(Message.objects.values_list("content", "owner_key")) == {("", "")}
    assert set(Conversation.objects.values_list("session_key", flat=True)) == {"anonymised"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("table", [HourlyRollup, DailyUserSpend], ids=lambda t: t.__name__)
def test_two_rollup_runs_at_once_both_succeed_and_count_each_reply_once(
    conversation, monkeypatch, table
):
    """A slow run overlapping the next minute's, or a redelivered task beside its first run."""
    import threading

    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("SQLite's IMMEDIATE transactions run one replacement at a time")
    for _ in range(3):
        _reply(conversation)
    # The first run stops between deleting its rows and writing them again.
    paused, go = threading.Event(), threading.Event()
    bulk_create = table.objects.bulk_create

    def pausing_bulk_create(*args, **kwargs):
        if threading.current_thread().name == "first":
            paused.set()
            assert go.wait(10)
        return bulk_create(*args, **kwargs)

    monkeypatch.setattr(table.objects, "bulk_create", pausing_bulk_create)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            tasks.rollups_refresh.apply(throw=True)
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    first = threading.Thread(target=run, name="first")
    first.start()
    try:
        assert paused.wait(10)
        tasks.rollups_refresh.apply(throw=True)  # the second run, start to end
    finally:
        go.set()
        first.join(20)
    assert failures == []
    (row,) = HourlyRollup.objects.all()
    (spend,) = DailyUserSpend.objects.all()
    assert row.replies == spend.replies == 3
