"""Celery beat jobs. Each takes no arguments or ids, calls one service, and is safe to rerun."""

from celery import shared_task

from monitoring import services


@shared_task(ignore_result=True)
def heartbeat() -> None:
    """Tell /health/ready that a worker is alive and consuming."""
    services.heartbeat_write()


@shared_task(ignore_result=True)
def rollups_refresh() -> None:
    """Recompute the last hours' rollups (idempotent: an hour is replaced whole)."""
    services.rollups_refresh()


@shared_task(ignore_result=True)
def replies_reap() -> None:
    """Fail replies left pending by a dead process, keeping their text."""
    services.replies_reap()


@shared_task(ignore_result=True)
def drift_check() -> None:
    """Alert when a version's last day differs from its previous week."""
    services.drift_check()


@shared_task(ignore_result=True)
def spend_check() -> None:
    """Alert when today's spend passes the configured threshold."""
    services.spend_check()


@shared_task(ignore_result=True)
def conversations_expire() -> None:
    """Delete or anonymise conversations past the retention period."""
    services.conversations_expire()
