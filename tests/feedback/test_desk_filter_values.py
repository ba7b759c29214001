"""The review desk and its exports ignore filter values they cannot read, never a 500.

A value is unreadable when it names nothing a database can compare: digits
int() refuses ("²"), an id past its column's range, a day whose bound no
datetime holds, text with a NUL (PostgreSQL refuses it). As the desk's other
unreadable values, such a filter changes nothing: the whole set is shown.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from feedback import tasks
from feedback.models import ExportJob
from tests.feedback import factories
from tests.feedback.test_review_desk import LIST, rate

pytestmark = pytest.mark.django_db

UNREADABLE = [
    {"version": "²"},
    {"assignee": "²"},
    {"version": "٣"},  # int() reads this Arabic-Indic 3; an id is written in ASCII
    {"version": "99999999999999999999999"},
    {"assignee": str(2**63)},
    {"version": "9" * 5000},  # past int()'s limit on digits
    {"created_to": "9999-12-31"},
    {"created_from": "0001-01-01"},
    {"created_from": "2026-02-30"},
    {"q": "\x00"},
    {"q": "Dune\x00"},
    {"model": "demo:demo\x00"},
    {"reason": "\x00"},
    {"status": "new\x00"},
    {"rating": "\x00"},
]


@pytest.fixture
def story(make_user) -> dict[str, Any]:
    """Alice rated two replies: one down with a comment, one up."""
    alice = make_user("alice")
    conv = factories.conversation(user=alice)
    _, down = factories.exchange(conv, question="When was Dune published?", answer="1975.")
    _, up = factories.exchange(conv, question="Thanks", answer="You're welcome!")
    rate(alice, down, -1, ["inaccurate"], "Dune came out in 1965.")
    rate(alice, up, 1, ["helpful"])
    return {"alice": alice}


@pytest.fixture
def staff_client(make_user) -> Client:
    client = Client(raise_request_exception=False)
    client.force_login(make_user("staffer", staff=True))
    return client


def _ids(query: dict[str, str]) -> str:
    return "&".join(f"{k}={v[:12]!r}" for k, v in query.items())


@pytest.mark.parametrize("query", UNREADABLE, ids=_ids)
def test_desk_ignores_an_unreadable_filter_value(staff_client, story, query):
    response = staff_client.get(LIST, query)
    assert response.status_code == 200
    assert response.context["cl"].result_count == 2


@pytest.mark.parametrize("query", UNREADABLE, ids=_ids)
def test_export_ignores_an_unreadable_filter_value(staff_client, story, query):
    response = staff_client.get(f"{LIST}export/", {"format": "csv", **query})
    assert response.status_code == 200
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert len(rows) == 2


@pytest.mark.parametrize("query", UNREADABLE, ids=_ids)
def test_large_export_job_ignores_an_unreadable_filter_value(
    staff_client,
    story,
    query,
    settings,
):
    settings.FEEDBACK_EXPORT_STREAM_MAX = 1
    response = staff_client.get(f"{LIST}export/", {"format": "jsonl", **query})
    assert response.status_code == 302
    job = ExportJob.objects.get()
    assert job.total == 2
    assert all("\x00" not in value for value in job.params.values())
    assert tasks.export_run(job.pk) is True
    job.refresh_from_db()
    assert (job.status, job.written) == ("done", 2)


def test_readable_values_at_the_edges_still_filter(staff_client, story):
    def shown(**query: str) -> Any:
        response = staff_client.get(LIST, query)
        assert response.status_code == 200
        return response.context["cl"].result_count

    today = timezone.localdate()
    assert shown(created_to=today.isoformat()) == 2
    assert shown(created_to=(today - dt.timedelta(days=1)).isoformat()) == 0
    assert shown(created_from=(today + dt.timedelta(days=1)).isoformat()) == 0
    assert shown(version=str(2**31 - 1)) == 0  # an id no version has: nothing, not everything
    assert shown(assignee=str(story["alice"].pk)) == 0
