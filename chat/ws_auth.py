"""Resolve the WebSocket's owner once, at connect.

Channels' AuthMiddlewareStack wraps every send in its session layer, which
costs a measurable share of frame throughput (NOTES.md); a chat socket only
needs to know who it belongs to, once.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user
from django.http import HttpRequest
from django.http.cookie import parse_cookie

from chat.owners import Owner


def owner_from_cookie_header(cookie_header: str) -> Owner | None:
    """Return the owner behind a session cookie, or None when there is none."""
    session_key = parse_cookie(cookie_header).get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return None
    engine = import_module(settings.SESSION_ENGINE)
    session = engine.SessionStore(session_key)
    # One read: load() forgets a key that does not exist (or has expired),
    # and get_user() below then reads the cached data instead of the store.
    session._session_cache = session.load()
    if session.session_key is None:
        return None
    request = HttpRequest()
    request.session = session
    user = get_user(request)
    if user.is_authenticated:
        return Owner(user_id=user.pk)
    return Owner(user_id=None, session_key=session_key)


class SessionUserMiddleware:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        cookie = ""
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                cookie = value.decode("latin-1")
                break
        owner = await database_sync_to_async(owner_from_cookie_header)(cookie) if cookie else None
        # A signed-in socket is closed when its session signs out (chat/signout.py).
        session_key = ""
        if owner is not None and not owner.is_anonymous:
            session_key = parse_cookie(cookie).get(settings.SESSION_COOKIE_NAME, "")
        return await self.inner(dict(scope, owner=owner, session_key=session_key), receive, send)
