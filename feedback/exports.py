"""Feedback exports as JSONL and CSV (format: docs/feedback-export.md).

Small sets stream straight from the request; large ones are written by a
Celery worker (`export_run`) to the export storage, with progress on the job.
"""

from __future__ import annotations

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
from django.db.models import F
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
# A running job whose progress has not moved for this long lost its worker.
STALE_AFTER = dt.timedelta(minutes=5)


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


def export_job_write(*, job_id: int) -> bool:
    """Write a queued export job's file; return False when another worker owns the job.

    Safe to run twice: only a queued job, or a running one whose worker has
    gone silent, is claimed; a finished job is left alone.
    """
    now = timezone.now()
    claimed = ExportJob.objects.filter(pk=job_id, status=ExportJob.Status.QUEUED).update(
        status=ExportJob.Status.RUNNING, written=0
    ) or ExportJob.objects.filter(
        pk=job_id, status=ExportJob.Status.RUNNING, updated_at__lt=now - STALE_AFTER
    ).update(status=ExportJob.Status.RUNNING, written=0)
    if not claimed:
        return False
    job = ExportJob.objects.get(pk=job_id)
    try:
        name = _write(job)
    except Exception:
        ExportJob.objects.filter(pk=job_id).update(
            status=ExportJob.Status.FAILED, error="The export failed; see the worker log."
        )
        raise
    ExportJob.objects.filter(pk=job_id).update(
        status=ExportJob.Status.DONE, file_name=name, finished_at=timezone.now()
    )
    return True


def _write(job: ExportJob) -> str:
    queryset = feedback_filtered(params=job.params)
    records = export_rows(queryset, context_limit=settings.FEEDBACK_EXPORT_CONTEXT_MESSAGES)
    written = 0

    def counted() -> Iterator[dict[str, Any]]:
        nonlocal written
        for record in records:
            yield record
            written += 1
            if written % _PROGRESS_EVERY == 0:
                ExportJob.objects.filter(pk=job.pk).update(written=F("written") + _PROGRESS_EVERY)

    storage = export_storage()
    name = f"job-{job.pk}-{file_name(job.format, stamp=job.created_at)}"
    # Large exports go through a temporary file, not memory.
    with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as temp:
        for chunk in render_lines(counted(), format=job.format):
            temp.write(chunk.encode("utf-8"))
        ExportJob.objects.filter(pk=job.pk).update(written=written)
        temp.seek(0)
        if storage.exists(name):
            storage.delete(name)  # a re-run replaces the file of a dead worker
        return storage.save(name, File(temp))
