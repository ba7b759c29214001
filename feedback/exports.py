"""Feedback exports as JSONL and CSV (format: docs/feedback-export.md).

Small sets stream straight from the request; large ones are written by a
Celery worker (`export_run`) to the export storage, with progress on the job.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from django.conf import settings
from django.core.files.base import File
from django.core.files.storage import FileSystemStorage, Storage, storages
from django.utils import timezone

from feedback.models import ExportJob
from feedback.selectors import export_rows, feedback_filtered

CSV_COLUMNS = (
    "id",
    "conversation",
    "message",
    "rating",
    "reasons",
    "comment",
    "model",
    "version",
    "finish_reason",
    "review_status",
    "reply_created_at",
    "rated_at",
    "updated_at",
    "context",
    "reply",
)
_PROGRESS_EVERY = 1000


def export_storage() -> Storage:
    """Return where export files go: STORAGES["feedback_exports"] if set, else a local folder.

    With several machines, point STORAGES["feedback_exports"] at shared
    storage (S3 and the like) so any web process can serve the download.
    """
    if "feedback_exports" in settings.STORAGES:
        return storages["feedback_exports"]
    return FileSystemStorage(location=settings.FEEDBACK_EXPORT_DIR)


def content_type(format: str) -> str:
    return "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson; charset=utf-8"


def file_name(format: str, *, stamp: dt.datetime | None = None) -> str:
    stamp = stamp or timezone.now()
    return f"feedback-{stamp:%Y%m%d-%H%M%S}.{format}"


def render_lines(records: Iterator[dict[str, Any]], *, format: str) -> Iterator[str]:
    """Yield the export's text in chunks: a header first for CSV, then one line per record."""
    if format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_COLUMNS)
        yield buffer.getvalue()
        for record in records:
            buffer.seek(0)
            buffer.truncate()
            writer.writerow(_csv_row(record))
            yield buffer.getvalue()
        return
    for record in records:
        yield json.dumps(record, ensure_ascii=False) + "\n"


def _csv_row(record: dict[str, Any]) -> list[Any]:
    context = "\n\n".join(f"{line['role']}: {line['content']}" for line in record["context"])
    values = dict(record, reasons=";".join(record["reasons"]), context=context)
    return [_csv_safe(values[column]) for column in CSV_COLUMNS]


def _csv_safe(value: Any) -> Any:
    # A cell starting with = + - @ is run as a formula by spreadsheet apps; user
    # text could use that to attack whoever opens the file.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def export_stream(*, params: Mapping[str, str], format: str) -> Iterator[str]:
    """Yield a small export of the filtered feedback, for a streamed response."""
    records = export_rows(
        feedback_filtered(params=params), context_limit=settings.FEEDBACK_EXPORT_CONTEXT_MESSAGES
    )
    yield from render_lines(records, format=format)


class JobLost(Exception):
    """Another worker took this export job over; the one that held it must stop."""


class _Lease:
    """A worker's hold on a running export job, renewed by every write it makes.

    The job's `updated_at` is the lease: the claim stamps it, and each later
    write stamps it again, but only while it still holds the stamp this worker
    wrote last. A second worker that takes a silent job over stamps it anew,
    so the first one's next write matches nothing and it stops (`JobLost`)
    instead of writing over the new owner's progress and result.
    """

    def __init__(self, *, job_id: int, stamp: dt.datetime) -> None:
        self.job_id = job_id
        self.stamp = stamp

    def renew(self, **fields: Any) -> None:
        """Write fields to the job and stamp it; raise JobLost if it is no longer ours."""
        # Strictly later than the last stamp, even if the clock did not move.
        stamp = max(timezone.now(), self.stamp + dt.timedelta(microseconds=1))
        held = ExportJob.objects.filter(
            pk=self.job_id, status=ExportJob.Status.RUNNING, updated_at=self.stamp
        ).update(updated_at=stamp, **fields)
        if not held:
            raise JobLost(self.job_id)
        self.stamp = stamp

    def due(self) -> bool:
        """Say whether the job should be stamped now to show its worker is alive."""
        return timezone.now() - self.stamp >= heartbeat_every()


def stale_after() -> dt.timedelta:
    """Return how long a running job may stay silent before another worker takes it over."""
    return dt.timedelta(seconds=settings.FEEDBACK_EXPORT_STALE_SECONDS)


def heartbeat_every() -> dt.timedelta:
    """Return how often a live worker stamps its job: well inside the stale limit."""
    return stale_after() / 5


def export_job_claim(*, job_id: int) -> _Lease | None:
    """Claim a queued job, or a running one whose worker has gone silent; None if neither.

    QuerySet.update() never moves an auto_now field, so every write here
    stamps `updated_at` itself: a job that waited long in the queue is fresh
    the moment a worker claims it, and is never taken from a live worker.
    """
    now = timezone.now()
    claimed = ExportJob.objects.filter(pk=job_id, status=ExportJob.Status.QUEUED).update(
        status=ExportJob.Status.RUNNING, written=0, updated_at=now
    ) or ExportJob.objects.filter(
        pk=job_id, status=ExportJob.Status.RUNNING, updated_at__lt=now - stale_after()
    ).update(written=0, updated_at=now)
    return _Lease(job_id=job_id, stamp=now) if claimed else None


def export_job_write(*, job_id: int) -> bool:
    """Write a queued export job's file; return False when another worker owns the job.

    Safe to run twice: only a queued job, or a running one whose worker has
    gone silent, is claimed; a finished job is left alone. A worker whose job
    was taken over while it was silent stops at its next write and leaves the
    job to the new owner.
    """
    lease = export_job_claim(job_id=job_id)
    if lease is None:
        return False
    job = ExportJob.objects.get(pk=job_id)
    try:
        name = _write(job, lease=lease)
        lease.renew(status=ExportJob.Status.DONE, file_name=name, finished_at=timezone.now())
    except JobLost:
        return False
    except Exception:
        with contextlib.suppress(JobLost):
            lease.renew(
                status=ExportJob.Status.FAILED, error="The export failed; see the worker log."
            )
        raise
    return True


def _write(job: ExportJob, *, lease: _Lease) -> str:
    queryset = feedback_filtered(params=job.params)
    records = export_rows(queryset, context_limit=settings.FEEDBACK_EXPORT_CONTEXT_MESSAGES)
    written = 0

    def counted() -> Iterator[dict[str, Any]]:
        nonlocal written
        for record in records:
            yield record
            written += 1
            if written % _PROGRESS_EVERY == 0 or lease.due():
                lease.renew(written=written)

    storage = export_storage()
    name = f"job-{job.pk}-{file_name(job.format, stamp=job.created_at)}"
    # Large exports go through a temporary file, not memory.
    with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as temp:
        for chunk in render_lines(counted(), format=job.format):
            temp.write(chunk.encode("utf-8"))
        lease.renew(written=written)  # still ours, just before the file is replaced
        temp.seek(0)
        if storage.exists(name):
            storage.delete(name)  # a re-run replaces the file of a dead worker
        return storage.save(name, File(temp))
