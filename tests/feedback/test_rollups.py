"""Scorecards come from rollups kept by Celery beat; re-running them changes nothing."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import Client

from chat.models import Message
from chat.owners import Owner
from feedback import rollups, selectors, services, tasks, versions
from feedback.models import VersionRollup
from tests.feedback import factories

pytestmark = pytest.mark.django_db


def _snapshot() -> list[tuple]:
    return sorted(
        VersionRollup.objects.values_list(
            "block",
            "version_key",
            "day",
            "replies",
            "errors",
            "moderated",
            "cost_usd",
            "ttft_hist",
            "latency_hist",
            "rated",
            "up",
            "down",
            "down_reasons",
        )
    )


@pytest.fixture
def traffic(make_user, settings):
    """Two versions' replies: v1 40 replies 30 up / 10 down; v2 40 replies 10 up / 30 down."""
    settings.FEEDBACK_RATELIMIT = "1000/m"  # one person rates all 80 replies at once
    v1 = versions.version_create(
        actor_id=None,
        model="demo:one",
        fallbacks=[],
        system_prompt="",
        temperature=None,
        max_tokens=None,
        activate=True,
    )
    v2 = versions.version_create(
        actor_id=None,
        model="demo:two",
        fallbacks=[],
        system_prompt="",
        temperature=None,
        max_tokens=None,
    )
    alice = make_user("alice")
    owner = Owner(user_id=alice.pk)
    conv = factories.conversation(user=alice)
    for version, ups in ((v1, 30), (v2, 10)):
        for i in range(40):
            finish = "error" if version == v2 and i % 20 == 0 else "stop"
            _, reply = factories.exchange(
                conv,
                version=version,
                model=version.model,
                finish_reason=finish,
                ttft_ms=100 + i,
                latency_ms=1000 + 10 * i,
            )
            reasons = [] if i < ups else ["inaccurate"]
            services.feedback_submit(
                owner=owner,
                client_ip="127.0.0.1",
                message_id=reply.pk,
                rating=1 if i < ups else -1,
                reasons=reasons,
                comment="",
            )
    factories.exchange(conv, status=Message.Status.PENDING, version=v1)  # not counted until it ends
    return v1, v2, owner


def test_rollups_are_idempotent(traffic):
    tasks.rollup_refresh()
    first = _snapshot()
    assert first
    tasks.rollup_refresh()
    assert _snapshot() == first
    tasks.rollup_rebuild()
    assert _snapshot() == first


def test_scorecards_from_rollups_count_and_compare(traffic):
    v1, v2, _owner = traffic
    tasks.rollup_refresh()

    cards, baseline = selectors.scorecards()
    by_version = {c.version_key: c for c in cards}
    one, two = by_version[v1.pk], by_version[v2.pk]
    assert baseline == v1.pk and one.role == "active"
    assert (one.replies, one.rated, one.up, one.down, one.errors) == (40, 40, 30, 10, 0)
    assert (two.replies, two.up, two.down, two.errors) == (40, 10, 30, 2)
    assert two.top_down_reasons == [("inaccurate", 30)]
    assert one.up_rate == 0.75
    low, high = one.up_interval
    assert round(low, 4) == 0.5981 and round(high, 4) == 0.8581  # Wilson 95 % for 30/40
    assert two.comparisons["up_rate"].significant  # 25 % vs 75 % with 40 each
    assert not two.comparisons["error_rate"].significant  # 2/40 vs 0/40 is not enough
    assert 100 <= one.percentile("ttft", 0.5) <= 130
    assert one.cost_per_reply == one.cost_usd / 40


def test_incremental_refresh_picks_up_changed_feedback_and_finished_replies(traffic):
    v1, _v2, owner = traffic
    tasks.rollup_refresh()
    reply = Message.objects.filter(version=v1, role="assistant", status="finished").first()
    services.feedback_submit(
        owner=owner,
        client_ip="127.0.0.1",
        message_id=reply.pk,
        rating=-1,
        reasons=["unsafe"],
        comment="",
    )
    pending = Message.objects.get(status="pending")
    Message.objects.filter(pk=pending.pk).update(status="finished", finish_reason="stop")

    tasks.rollup_refresh()
    one = {c.version_key: c for c in selectors.scorecards()[0]}[v1.pk]
    assert (one.replies, one.up, one.down) == (41, 29, 11)
    assert one.down_reasons == {"inaccurate": 10, "unsafe": 1}
    incremental = _snapshot()
    tasks.rollup_rebuild()
    assert _snapshot() == incremental


def test_rollups_work_across_blocks(traffic, monkeypatch):
    monkeypatch.setattr(rollups, "BLOCK", 7)
    rollups.rollup_rebuild()
    assert VersionRollup.objects.values("block").distinct().count() > 5
    cards = {c.version_key: c for c in selectors.scorecards()[0]}
    assert sum(c.replies for c in cards.values()) == 80


def test_scorecards_page_shows_versions_side_by_side(traffic, make_user):
    tasks.rollup_refresh()
    client = Client()
    client.force_login(make_user("staffer", staff=True))

    page = client.get("/admin/feedback/modelversion/scorecards/").content.decode()

    assert "v1 · demo:one" in page and "v2 · demo:two" in page
    assert "75.0% (95% CI 59.8 to 85.8%)" in page
    assert "-50.0 pts vs baseline, p&lt;0.001 — statistically meaningful" in page
    assert "not statistically meaningful" in page  # the error-rate difference
    assert "inaccurate (30)" in page


def test_beat_schedule_has_the_rollup_tasks():
    tasks_scheduled = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert {"feedback.rollup_refresh", "feedback.rollup_rebuild"} <= tasks_scheduled


@pytest.mark.parametrize(
    "query",
    [
        {"days": "7"},
        {"days": "1000000"},  # further back than a date goes
        {"days": "99999999999999999999"},
        {"days": "²"},  # a digit to str.isdigit(), not to int()
        {"v": "99999999999999999999999"},  # past what an id column holds
        {"v": "²"},
    ],
)
def test_scorecards_page_takes_any_query_without_failing(traffic, make_user, query):
    tasks.rollup_refresh()
    client = Client(raise_request_exception=False)
    client.force_login(make_user("staffer", staff=True))

    response = client.get("/admin/feedback/modelversion/scorecards/", query)

    assert response.status_code == 200
    page = response.content.decode()
    if "days" in query:  # an unusable range is no range: every day is shown
        assert "v1 · demo:one" in page and "v2 · demo:two" in page
        assert ('value="7" selected' in page) == (query["days"] == "7")
