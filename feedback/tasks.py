"""Celery tasks: each takes ids, calls one service, and is safe to run twice."""

from __future__ import annotations

from celery import shared_task

from feedback import exports, rollups


@shared_task(name="feedback.rollup_refresh", ignore_result=True)
def rollup_refresh() -> int:
    """Bring the scorecard rollups up to date (Celery beat, every minute)."""
    return rollups.rollup_refresh().blocks


@shared_task(name="feedback.rollup_rebuild", ignore_result=True)
def rollup_rebuild() -> int:
    """Recompute every scorecard rollup from scratch (Celery beat, nightly)."""
    return rollups.rollup_rebuild().blocks


@shared_task(name="feedback.export_run", ignore_result=True)
def export_run(job_id: int) -> bool:
    """Write one export job's file, unless another worker already has it."""
    return exports.export_job_write(job_id=job_id)
