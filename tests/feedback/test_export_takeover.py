"""Large exports: a live worker keeps its job; a silent one's job is taken over.

The job's `updated_at` is its worker's sign of life; these tests deliver the
Celery task again while the first delivery is still writing (from inside the
export storage, the one hook a deployment configures anyway).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import FileSystemStorage
from django.test import Client
from django.utils import timezone

from chat.owners import Owner
from feedback import services, tasks
from feedback.models import ExportJob
from tests.feedback import factories

pytestmark = pytest.mark.django_db

LIST = "/admin/feedback/feedback/"
# Called once, with the job's id, while a worker saves its file.
_on_save: list[Callable[[str], None]] = []


class SlowStorage(FileSystemStorage):
    """Export storage that lets a test act while a worker is saving its file."""

    def _save(self, name: str, content: Any) -> str:
        if _on_save:
            _on_save.pop()(name)
        return super()._save(name, content)


@pytest.fixture
def export_job(make_user, settings, tmp_path: Path) -> ExportJob:
    """A staff member's queued export of two rated replies, files in a hooked storage."""
    settings.FEEDBACK_EXPORT_STREAM_MAX = 1
    settings.STORAGES = {
        **settings.STORAGES,
        "feedback_exports": {
            "BACKEND": f"{__name__}.SlowStorage",
            "OPTIONS": {"location": str(tmp_path)},
        },
    }
    alice = make_user("alice")
    conv = factories.conversation(user=alice)
    for answer in ("First answer.", "Second answer."):
        _, reply = factories.exchange(conv, answer=answer)
        services.feedback_submit(
            owner=Owner(user_id=alice.pk),
            client_ip="127.0.0.1",
            message_id=reply.pk,
            rating=1,
            reasons=[],
            comment="",
        )
    staff = Client()
    staff.force_login(make_user("staffer", staff=True))
    assert staff.get(f"{LIST}export/", {"format": "jsonl"}).status_code == 302
    _on_save.clear()
    yield ExportJob.objects.get()
    _on_save.clear()


def deliver(job: ExportJob) -> bool:
    """Run the Celery task for the job, as a worker does on each delivery."""
    return bool(tasks.export_run.apply(args=[job.pk]).get())


def age(job: ExportJob, minutes: int) -> None:
    """Make the job look as if nothing had touched it for this many minutes."""
    ExportJob.objects.filter(pk=job.pk).update(
        updated_at=timezone.now() - dt.timedelta(minutes=minutes)
    )


def test_a_job_that_waited_long_in_the_queue_is_not_taken_from_its_live_worker(export_job):
    age(export_job, minutes=6)
    second: list[bool] = []
    _on_save.append(lambda name: second.append(deliver(export_job)))

    assert deliver(export_job) is True
    assert second == [False]  # redelivered mid-write: the live worker keeps the job
    export_job.refresh_from_db()
    assert (export_job.status, export_job.written) == ("done", 2)
    assert timezone.now() - export_job.updated_at < dt.timedelta(minutes=1)


def test_every_write_of_a_running_job_shows_its_worker_is_alive(export_job):
    age(export_job, minutes=60)
    seen: list[dt.datetime] = []
    _on_save.append(lambda name: seen.append(ExportJob.objects.get(pk=export_job.pk).updated_at))

    assert deliver(export_job) is True
    assert timezone.now() - seen[0] < dt.timedelta(minutes=1)


def test_a_silent_workers_job_is_taken_over_and_the_late_worker_leaves_it_alone(
    export_job, tmp_path
):
    taken_over: list[bool] = []

    def go_silent_then_redeliver(name: str) -> None:
        # The first worker stalls for six minutes here; the task comes round again.
        age(export_job, minutes=6)
        taken_over.append(deliver(export_job))

    _on_save.append(go_silent_then_redeliver)

    assert deliver(export_job) is False  # woke up to find the job was no longer its own
    assert taken_over == [True]
    export_job.refresh_from_db()
    assert (export_job.status, export_job.written, export_job.error) == ("done", 2, "")
    lines = (tmp_path / export_job.file_name).read_text().splitlines()
    assert sorted(json.loads(line)["reply"] for line in lines) == [
        "First answer.",
        "Second answer.",
    ]


def test_a_finished_job_is_never_written_again(export_job):
    assert deliver(export_job) is True
    age(export_job, minutes=60)
    assert deliver(export_job) is False
    export_job.refresh_from_db()
    assert export_job.status == "done"
