"""Signing out ends the WebSockets opened under that session.

A socket learns who it belongs to once, at connect (chat/ws_auth.py). Without
this, a tab left open after its user signed out in another one went on
chatting, resuming and rating as that user until it reconnected. Django
sends `user_logged_out` before it forgets the session, so its key is still
known: the sockets of that session (and only those; the user's other
sign-ins keep theirs) are closed with code 4401. Deleting an account closes
all of its sockets, whatever session opened them.

Signing in ends the session it began in the other way: Django gives the
session a new key, and the anonymous visitor's chats become the account's
(chat/adopt.py). The sockets still open under the old key would go on as
the anonymous owner, which no longer owns anything; they are closed with
code 4402 instead, which the page answers by reconnecting, as the account.

In one process the sockets are found in a registry here; the view that signs
out runs on another thread than their event loop, so each is closed through
its own loop. With Redis they join a channel-layer group per session, which
reaches every server process.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import transaction

from chat.owners import Owner

logger = logging.getLogger(__name__)

# The WebSocket close code of a socket whose session signed out.
SIGNED_OUT = 4401
# ... and of one whose session signed in (under a new key): reconnect.
SIGNED_IN = 4402
CLOSE_CODES = frozenset({SIGNED_OUT, SIGNED_IN})

# Called on the socket's own event loop with the close code.
Closer = Callable[[int], None]

_lock = threading.Lock()
_local: dict[str, list[tuple[asyncio.AbstractEventLoop, Closer]]] = {}


def session_group(session_key: str) -> str:
    """Return the opaque name of one session's sockets (a channel-layer group name)."""
    return "session." + hashlib.sha256(session_key.encode()).hexdigest()[:32]


def owner_group(owner_key: str) -> str:
    """Return the opaque name of one owner's sockets, every session of theirs (a group name)."""
    return "owner." + hashlib.sha256(owner_key.encode()).hexdigest()[:32]


def join(group: str, close: Closer) -> None:
    """Close this socket (`close(code)` runs on the calling event loop) when its session ends."""
    entry = (asyncio.get_running_loop(), close)
    with _lock:
        _local.setdefault(group, []).append(entry)


def leave(group: str, close: Closer) -> None:
    with _lock:
        entries = [e for e in _local.get(group, []) if e[1] != close]
        if entries:
            _local[group] = entries
        else:
            _local.pop(group, None)


def session_ended(session_key: str) -> None:
    """Close every socket opened under this session, in this process and the others."""
    if session_key:
        _close_group(session_group(session_key), code=SIGNED_OUT)


def session_rekeyed(session_key: str) -> None:
    """Close every socket opened under this session key, which a sign-in replaced.

    Both kinds: an anonymous visitor's (their owner is the session) and a
    signed-in one's (signing in as someone else replaces the session too).
    """
    if session_key:
        anonymous = Owner(user_id=None, session_key=session_key)
        _close_group(owner_group(anonymous.key), code=SIGNED_IN)
        _close_group(session_group(session_key), code=SIGNED_IN)


def account_ended(user_id: int) -> None:
    """Close every socket of this account, whatever session opened it (it was deleted)."""
    _close_group(owner_group(f"u:{user_id}"), code=SIGNED_OUT)


def _close_group(group: str, *, code: int) -> None:
    with _lock:
        entries = _local.pop(group, [])
    for loop, close in entries:
        try:
            loop.call_soon_threadsafe(close, code)
        except RuntimeError:  # that loop has closed, and its sockets with it
            continue
    if settings.REDIS_URL:
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(group, {"type": "session.ended", "code": code})
        except Exception:
            logger.warning("could not close the sockets of an ended session", exc_info=True)


def on_user_deleted(sender: Any, instance: Any = None, **_: Any) -> None:
    """The user model's `post_delete` receiver: its sockets close once the deletion is saved.

    Until then a socket opened under the account goes on as its owner, and a
    send from it would fail at the commit (its account's row is gone).
    """
    user_id = getattr(instance, "pk", None)
    if user_id is not None:
        transaction.on_commit(lambda: account_ended(user_id))


def on_logged_out(sender: Any, request: Any = None, **_: Any) -> None:
    """The `user_logged_out` receiver."""
    session = getattr(request, "session", None)
    key = getattr(session, "session_key", None)
    if key:
        session_ended(key)
