"""Resolve the WebSocket's owner once, at connect.

Channels' AuthMiddlewareStack wraps every send in its session layer, which
costs a measurable share of frame throughput (NOTES.md); a chat socket only
needs to know who it belongs to, once.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any
from urllib.parse import urlsplit

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


class RefuseUnreadableOrigin:
    """Refuse a handshake whose Origin header cannot be parsed as a URL.

    Channels' origin check parses it with `urlparse`, which raises ValueError
    for an IPv6 bracket left open ("http://[::1"): the handshake crashed the
    application, an exception logged per attempt, instead of being refused.
    """

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if not origin_is_readable(scope.get("headers", [])):
            from channels.security.websocket import WebsocketDenier

            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)


def origin_is_readable(headers: list[tuple[bytes, bytes]]) -> bool:
    """Return False when an Origin header is present that `urlparse` refuses."""
    for name, value in headers:
        if name == b"origin":
            try:
                urlsplit(value.decode("latin1"))
            except ValueError:
                return False
    return True
