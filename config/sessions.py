"""The session store: Django's database sessions, with keys that could be one of ours.

A session key comes from the client's cookie, and Django's cookie parser
turns an escaped `"\\000"` into a NUL, which PostgreSQL refuses in any text:
every request with such a cookie was a 500, before any sign-in (and in the
WebSocket handshake too, which reads the same store). Django makes its keys
of lower-case letters and digits; anything else is no session, as a key that
matches none is.
"""

from __future__ import annotations

from django.contrib.sessions.backends import db


class SessionStore(db.SessionStore):
    def _validate_session_key(self, key: str | None) -> bool:
        # Django's own rule (at least 8 characters), and only letters and digits.
        return bool(key) and len(key or "") >= 8 and bool(key and key.isascii() and key.isalnum())
