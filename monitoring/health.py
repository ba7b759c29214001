"""Readiness checks: one per dependency, run concurrently, each bounded in time.

A check returns normally when its dependency works and raises otherwise.
`health_check_all()` never takes longer than about `HEALTH_CHECK_TIMEOUT_S`:
checks that have not answered by then count as failed (their thread is left
to finish on its own socket timeout, never joined).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.db import connections
from django.db.migrations.executor import MigrationExecutor

HEARTBEAT_KEY = "monitoring:worker-heartbeat"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    run: Callable[[], str]
    # A failing critical check makes /health/ready answer 503; the others
    # only mark the service degraded (a dead worker delays titles and
    # rollups, but taking every web server out of the pool would not help).
    critical: bool


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    status: str  # "ok" | "fail"
    critical: bool
    latency_ms: float
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "critical": self.critical,
            "latency_ms": round(self.latency_ms, 1),
            "detail": self.detail,
        }


def check_database() -> str:
    connection = connections[settings.HEALTH_DATABASE_ALIAS]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        connection.close()  # this thread is throwaway; return the connection
    return connection.vendor


def check_cache() -> str:
    cache = caches[settings.HEALTH_CACHE_ALIAS]
    key = f"monitoring:ready:{uuid.uuid4().hex}"
    cache.set(key, "1", timeout=10)
    if cache.get(key) != "1":
        raise RuntimeError("the cache did not return what was written")
    cache.delete(key)
    return type(cache).__name__


def check_channel_layer() -> str:
    from channels.layers import channel_layers

    # A fresh layer on a private event loop: this runs in a worker thread, and
    # the server's own layer keeps per-loop connection pools we must not touch.
    layer = channel_layers.make_backend(settings.HEALTH_CHANNEL_LAYER_ALIAS)

    async def round_trip() -> None:
        try:
            channel = await layer.new_channel("health.")
            await layer.send(channel, {"type": "health.ping"})
            message = await layer.receive(channel)
            if message.get("type") != "health.ping":
                raise RuntimeError("the channel layer returned another message")
        finally:
            close = getattr(layer, "close_pools", None)
            if close is not None:
                await close()

    async def bounded() -> None:
        await asyncio.wait_for(round_trip(), settings.HEALTH_CHECK_TIMEOUT_S)

    asyncio.run(bounded())
    return type(layer).__name__


def check_broker() -> str:
    from kombu import Connection

    url = settings.CELERY_BROKER_URL
    timeout = settings.HEALTH_CHECK_TIMEOUT_S
    with Connection(
        url,
        connect_timeout=timeout,
        transport_options={
            **settings.CELERY_BROKER_TRANSPORT_OPTIONS,
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
            "max_retries": 0,
        },
    ) as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout)
        # The Redis transport connects lazily: make it talk to the server.
        with connection.channel() as channel:
            client = getattr(channel, "client", None)
            if client is not None and hasattr(client, "ping"):
                client.ping()
    return url.split("://", 1)[0]


def check_worker_heartbeat() -> str:
    beat = caches[settings.HEALTH_CACHE_ALIAS].get(HEARTBEAT_KEY)
    if beat is None:
        raise RuntimeError("no worker heartbeat yet")
    age = time.time() - float(beat)
    if age > settings.HEALTH_HEARTBEAT_MAX_AGE_S:
        raise RuntimeError(f"last worker heartbeat {age:.0f}s ago")
    return f"{age:.0f}s ago"


def check_migrations() -> str:
    connection = connections[settings.HEALTH_DATABASE_ALIAS]
    try:
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    finally:
        connection.close()
    if plan:
        raise RuntimeError(f"{len(plan)} migration(s) not applied")
    return "all applied"


def check_disk() -> str:
    usage = shutil.disk_usage(settings.DATA_DIR)
    free_mb = usage.free / 1024 / 1024
    if free_mb < settings.HEALTH_MIN_FREE_DISK_MB:
        raise RuntimeError(f"{free_mb:.0f} MB free")
    return f"{free_mb:.0f} MB free"


def checks() -> list[Check]:
    return [
        Check("database", check_database, critical=True),
        Check("cache", check_cache, critical=True),
        Check("channel_layer", check_channel_layer, critical=True),
        # Background work only (titles, exports, rollups, the reaper): a
        # broker outage degrades it, but every web process failing readiness
        # at once would drain the whole service from the load balancer.
        Check("broker", check_broker, critical=False),
        Check("worker_heartbeat", check_worker_heartbeat, critical=False),
        Check("migrations", check_migrations, critical=True),
        Check("disk", check_disk, critical=False),
    ]


def _timed(check: Check) -> CheckResult:
    started = time.perf_counter()
    try:
        detail = check.run()
        status = "ok"
    except Exception as exc:
        # The class and a short message only: a DSN or password never leaves.
        detail = f"{type(exc).__name__}: {str(exc)[:120]}"
        status = "fail"
    return CheckResult(
        check.name, status, check.critical, (time.perf_counter() - started) * 1000, detail
    )


def health_check_all() -> tuple[str, list[CheckResult]]:
    """Run every check at once; return the overall status ("ok"/"degraded"/"fail") and results."""
    from chat.safety.pii import redact

    timeout = settings.HEALTH_CHECK_TIMEOUT_S
    todo = checks()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="health")
    started = time.perf_counter()
    futures = {pool.submit(_timed, check): check for check in todo}
    done, _ = concurrent.futures.wait(futures, timeout=timeout)
    pool.shutdown(wait=False, cancel_futures=True)
    results = []
    for future, check in futures.items():
        if future in done:
            result = future.result()
            results.append(
                CheckResult(
                    result.name,
                    result.status,
                    result.critical,
                    result.latency_ms,
                    redact(result.detail),
                )
            )
        else:
            elapsed = (time.perf_counter() - started) * 1000
            results.append(CheckResult(check.name, "fail", check.critical, elapsed, "timed out"))
    if any(r.status != "ok" and r.critical for r in results):
        overall = "fail"
    elif any(r.status != "ok" for r in results):
        overall = "degraded"
    else:
        overall = "ok"
    return overall, results
