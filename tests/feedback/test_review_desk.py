"""The staff review desk in the admin: find feedback, see its story, review it, export it."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
from django.test import AsyncClient, Client

from chat.models import Message
from chat.owners import Owner
from feedback import services, tasks
from feedback.models import ExportJob, Feedback, ReviewEvent
from tests.feedback import factories

pytestmark = pytest.mark.django_db

LIST = "/admin/feedback/feedback/"


def rate(user: Any, reply: Message, rating: int, reasons: list[str], comment: str = "") -> None:
    services.feedback_submit(
        owner=Owner(user_id=user.pk),
        client_ip="127.0.0.1",
        message_id=reply.pk,
        rating=rating,
        reasons=reasons,
        comment=comment,
    )


@pytest.fixture
def story(make_user) -> dict[str, Any]:
    """Alice's two-turn conversation whose second reply she rated down with a comment."""
    alice = make_user("alice")
    conv = factories.conversation(user=alice)
    factories.exchange(conv, question="Who wrote Dune?", answer="Frank Herbert.")
    _, reply = factories.exchange(
        conv,
        question="When was it published?",
        answer="It was published in 1975.",
        model="demo:beta",
        ttft_ms=321,
        latency_ms=4567,
        finish_reason="moderated",
        moderation={"stage": "output", "category": "violence", "score": 0.91},
    )
    _, other = factories.exchange(conv, question="Thanks", answer="You're welcome!")
    rate(alice, reply, -1, ["inaccurate"], "Dune came out in 1965, not 1975.")
    rate(alice, other, 1, ["helpful"])
    return {"alice": alice, "reply": reply, "later": other}


def test_staff_find_thumbs_down_by_filters_and_search(staff_client, story):
    down = staff_client.get(LIST, {"rating": "-1", "reason": "inaccurate", "has_comment": "yes"})
    assert down.status_code == 200
    assert "Dune came out in 1965" in down.content.decode()
    assert "You&#x27;re welcome" not in down.content.decode()

    assert "Dune came out" in staff_client.get(LIST, {"q": "1965"}).content.decode()
    assert "Dune came out" not in staff_client.get(LIST, {"q": "nothing like"}).content.decode()
    assert "Dune came out" in staff_client.get(LIST, {"model": "demo:beta"}).content.decode()
    assert "Dune came out" not in staff_client.get(LIST, {"rating": "1"}).content.decode()
    assert (
        "Dune came out"
        in staff_client.get(LIST, {"status": "new", "version": "none"}).content.decode()
    )
    today = story["reply"].created_at.date().isoformat()
    dated = staff_client.get(LIST, {"created_from": today, "created_to": today})
    assert "Dune came out" in dated.content.decode()
    assert (
        "Dune came out" not in staff_client.get(LIST, {"created_to": "2000-01-01"}).content.decode()
    )


def test_detail_shows_the_conversation_up_to_the_rated_reply_and_its_facts(staff_client, story):
    feedback = Feedback.objects.get(message=story["reply"])
    page = staff_client.get(f"{LIST}{feedback.pk}/change/").content.decode()

    for text in (
        "Who wrote Dune?",
        "Frank Herbert.",
        "When was it published?",
        "It was published in 1975.",
    ):
        assert text in page
    assert "the rated reply" in page
    assert "You&#x27;re welcome!" not in page  # after the rated reply
    for fact in (
        "demo:beta",
        "321 ms",
        "4,567 ms",
        "20 in / 40 out",
        "$0.001200",
        "Moderated",
        "flagged at output: violence, score 0.91",
        "settings (no version)",
    ):
        assert fact in page, fact
    assert "Dune came out in 1965" in page and "alice" in page


def test_review_workflow_records_who_did_what(staff_client, story):
    feedback = Feedback.objects.get(message=story["reply"])
    staffer = staff_client.get("/admin/").wsgi_request.user

    response = staff_client.post(
        f"{LIST}{feedback.pk}/change/",
        {
            "review_status": "triaged",
            "assignee": staffer.pk,
            "staff_note": "Checked: the model is wrong.",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    feedback.refresh_from_db()
    assert (feedback.review_status, feedback.assignee_id, feedback.staff_note) == (
        "triaged",
        staffer.pk,
        "Checked: the model is wrong.",
    )

    # A bulk action resolves both items.
    staff_client.post(
        LIST,
        {
            "action": "mark_resolved",
            "_selected_action": list(Feedback.objects.values_list("pk", flat=True)),
        },
    )
    assert set(Feedback.objects.values_list("review_status", flat=True)) == {"resolved"}

    history = list(
        ReviewEvent.objects.filter(feedback=feedback)
        .order_by("id")
        .values_list("actor__username", "kind", "before", "after")
    )
    assert history == [
        ("staffer", "status", "new", "triaged"),
        ("staffer", "assignee", "nobody", "staffer"),
        ("staffer", "note", "", "Checked: the model is wrong."),
        ("staffer", "status", "triaged", "resolved"),
    ]
    page = staff_client.get(f"{LIST}{feedback.pk}/change/").content.decode()
    assert "who did what" in page.lower() and "Checked: the model is wrong." in page

    # The user says something new: the item comes back to the desk.
    rate(story["alice"], story["reply"], -1, ["inaccurate", "unhelpful"], "Still wrong.")
    feedback.refresh_from_db()
    assert feedback.review_status == "new"


def _records(content: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in content.decode().splitlines()]


async def _streamed(response: Any) -> bytes:
    return b"".join([chunk async for chunk in response.streaming_content])


@pytest.mark.django_db(transaction=True)
async def test_export_streams_the_filtered_set_as_jsonl_and_csv(make_user):
    from asgiref.sync import sync_to_async

    @sync_to_async
    def setup() -> tuple[Any, Any]:
        alice = make_user("alice")
        conv = factories.conversation(user=alice)
        factories.exchange(conv, question="Who wrote Dune?", answer="Frank Herbert.")
        _, reply = factories.exchange(conv, question="When?", answer="=1975 maybe")
        _, other = factories.exchange(conv, question="Thanks", answer="Welcome")
        rate(alice, reply, -1, ["inaccurate", "other"], "Wrong: 1965.")
        rate(alice, other, 1, [])
        return make_user("staffer", staff=True), reply

    staffer, reply = await setup()
    client = AsyncClient()
    await client.aforce_login(staffer)

    response = await client.get(f"{LIST}export/", {"format": "jsonl", "rating": "-1"})
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"].startswith("application/x-ndjson")
    [record] = _records(await _streamed(response))
    assert record["message"] == reply.pk
    assert record["context"] == [
        {"role": "user", "content": "Who wrote Dune?"},
        {"role": "assistant", "content": "Frank Herbert."},
        {"role": "user", "content": "When?"},
    ]
    assert (record["reply"], record["rating"], record["label"]) == ("=1975 maybe", -1, False)
    assert (record["reasons"], record["comment"], record["model"], record["version"]) == (
        ["inaccurate", "other"],
        "Wrong: 1965.",
        "demo:demo",
        None,
    )
    assert {"rated_at", "updated_at", "reply_created_at", "finish_reason"} <= set(record)

    response = await client.get(f"{LIST}export/", {"format": "csv"})
    rows = list(csv.DictReader(io.StringIO((await _streamed(response)).decode())))
    assert len(rows) == 2
    down = next(r for r in rows if r["rating"] == "-1")
    assert down["reasons"] == "inaccurate;other" and down["comment"] == "Wrong: 1965."
    assert down["reply"] == "'=1975 maybe"  # a formula in a spreadsheet cell is defused
    assert "user: Who wrote Dune?" in down["context"]


def test_large_export_runs_as_a_celery_job_with_progress_and_a_download(
    staff_client, story, settings
):
    settings.FEEDBACK_EXPORT_STREAM_MAX = 1
    with_commit = pytest.importorskip("django.test").TestCase.captureOnCommitCallbacks

    with with_commit(execute=False) as callbacks:
        response = staff_client.get(f"{LIST}export/", {"format": "jsonl"})
    job = ExportJob.objects.get()
    assert response.status_code == 302 and response["Location"].endswith(
        f"/exportjob/{job.pk}/change/"
    )
    assert (job.status, job.total, job.created_by.username) == ("queued", 2, "staffer")
    assert len(callbacks) == 1  # the worker is asked only once the job is committed
    assert "0% (0 of 2)" in staff_client.get(response["Location"]).content.decode()

    assert tasks.export_run(job.pk) is True
    assert tasks.export_run(job.pk) is False  # a second delivery does nothing
    job.refresh_from_db()
    assert (job.status, job.written, job.progress_percent) == ("done", 2, 100)

    download = staff_client.get(f"/admin/feedback/exportjob/{job.pk}/download/")
    assert download.status_code == 200
    records = _records(b"".join(download.streaming_content))
    assert {r["message"] for r in records} == {story["reply"].pk, story["later"].pk}


def test_desk_and_exports_are_staff_only(make_user, story):
    client = Client()
    client.force_login(make_user("mallory"))
    assert client.get(LIST).status_code == 302  # to the admin login
    assert client.get(f"{LIST}export/", {"format": "jsonl"}).status_code == 302
