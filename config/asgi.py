"""ASGI entry point: Django for HTTP, the chat consumer for WebSockets."""

import asyncio
import gc
import logging
import os
import weakref
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.embedded")

# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.db import database_sync_to_async  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from chat.routing import websocket_urlpatterns  # noqa: E402
from chat.ws_auth import RefuseUnreadableOrigin, SessionUserMiddleware  # noqa: E402
from config import cpu_pin, gc_idle  # noqa: E402

logger = logging.getLogger(__name__)

router = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": RefuseUnreadableOrigin(
            AllowedHostsOriginValidator(SessionUserMiddleware(URLRouter(websocket_urlpatterns)))
        ),
    }
)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    # The collector's long scans run while the process is idle (config/gc_idle.py).
    gc_idle.ensure_running()
    _warm_database_thread_once()
    await router(scope, receive, send)


_warmed: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_warming: set[asyncio.Task[None]] = set()  # held until done (the loop keeps weak refs)


def _warm_database_thread_once() -> None:
    """Open the database thread's cache connections while the first socket connects.

    Messages store in Django's database thread, whose first use of the SQLite
    cache (the rate-limit counters) opened its connection: 12-27 ms, in the
    trip of the first burst of messages (make bench (c), py-spy). A socket's
    own authentication opens the database connection there already.
    """
    loop = asyncio.get_running_loop()
    if loop in _warmed:
        return
    _warmed.add(loop)
    task = loop.create_task(database_sync_to_async(_warm_caches)())
    _warming.add(task)
    task.add_done_callback(_warming.discard)


def _warm_caches() -> None:
    from django.core.cache import caches

    for alias in settings.CACHES:
        warm = getattr(caches[alias], "warm", None)
        if warm is None:
            continue
        try:
            warm()
        except Exception:  # the first message will open it, or report the store down
            logger.warning("could not open the %s cache's connection", alias, exc_info=True)


def _start_wal_checkpoints() -> None:
    """In the embedded mode, checkpoint the SQLite files off the serving threads."""
    from config import sqlite_wal

    paths = [
        str(db["NAME"])
        for db in settings.DATABASES.values()
        if db["ENGINE"] in ("config.sqlite_db", "django.db.backends.sqlite3")
    ]
    paths += [
        str(cache["LOCATION"])
        for cache in settings.CACHES.values()
        if cache["BACKEND"] == "config.sqlite_cache.SQLiteCache"
    ]
    if paths:
        sqlite_wal.start(paths)


def _warm_task_queue() -> None:
    """Do Celery's one-time set-up now, not in the first message's enqueue.

    The first `.delay()` of a process finalizes the Celery app, builds its
    result backend and producer pool and imports their modules: ~11 ms of
    work that would stall the messages being streamed at that moment. None
    of it talks to the broker.
    """
    from chat import tasks  # noqa: F401 - registers the tasks
    from config.celery import app as celery_app

    celery_app.finalize(auto=True)
    # The task sender too: building it imports Celery's events modules (in
    # the enqueue thread, while a burst's replies start).
    _ = celery_app.backend, celery_app.amqp.router, celery_app.producer_pool
    _ = celery_app.amqp.send_task_message


def _import_model_providers() -> None:
    """Import the configured models' vendor code now, not in the first reply.

    A provider's module is imported when a reply first asks for it, on the
    event loop: the demo's took ~4 ms in the middle of make bench (c)'s
    burst, and a vendor SDK takes far longer. Models activated later in the
    admin still load theirs on first use.
    """
    from chat.providers import import_provider, split_model

    for spec in (settings.CHAT_MODEL, *settings.CHAT_FALLBACK_MODELS):
        try:
            import_provider(split_model(spec)[0])
        except (ValueError, ImportError):
            logger.warning("model %r: its provider could not be imported", spec)


def _load_semantic_model() -> None:
    """Load the semantic cache's model before serving, when the cache is on.

    Its load is seconds of imports holding the GIL: started by the first
    question of a burst, it held up every other message (make bench (c) with
    the cache on: chat.accepted p99 5 s). The process serves once it is in.
    """
    if settings.CHAT_SEMANTIC_CACHE:
        from chat import semantic_cache

        semantic_cache.warm()


# The cyclic garbage collector: what start-up built (Django, the URL conf,
# the rules) lives as long as the process, so freeze it out of every scan; and
# collect the youngest objects every 10,000 allocations instead of 700. A
# streaming reply allocates a lot of short-lived acyclic objects (frames,
# strings, futures) that reference counting frees anyway; with 1,000 open
# streams the default thresholds spent about a tenth of the server's CPU
# (perf) in collections that found almost nothing (make bench (c): 10.3 ->
# 7.9 ms of CPU per reply).
_start_wal_checkpoints()
_warm_task_queue()
_import_model_providers()
_load_semantic_model()
# After the threads above exist: every thread of the process moves together.
cpu_pin.pin(settings.CHAT_WEB_CPU)
gc.collect()
gc.freeze()
gc.set_threshold(10_000, 20, 20)
