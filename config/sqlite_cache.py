"""A Django cache on one SQLite file, shared by every process of the embedded mode.

Django's own choices fall short here: LocMemCache is per process, and the file
and database caches increment by read-then-write, so two processes counting
the same rate-limit key lose updates. This backend keeps integers as SQLite
integers and increments them with one UPDATE, which SQLite serialises.
"""

from __future__ import annotations

import contextlib
import pickle
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache

from config.sqlite_wal import BACKSTOP_PAGES

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires REAL
)
"""


# Keys a `get_many` statement reads: within the 999 variables an SQLite
# build may allow in a statement (before 3.32), with one for the time.
_KEYS_PER_READ = 500
# Counters a `count_many` statement writes (two variables each, and the time).
_COUNTERS_PER_WRITE = 400


# One connection per thread and file, shared by every instance: Django keeps
# a cache instance per async context, so a per-instance connection would
# open the file anew for every task that touches the cache.
_connections = threading.local()


class SQLiteCache(BaseCache):
    def __init__(self, location: str, params: dict[str, Any]) -> None:
        super().__init__(params)
        self._path = location

    def _db(self) -> sqlite3.Connection:
        opened: dict[str, sqlite3.Connection] | None = getattr(_connections, "by_path", None)
        if opened is None:
            opened = _connections.by_path = {}
        conn = opened.get(self._path)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=20, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints run in the web process's own thread (config/sqlite_wal.py).
            conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            conn.execute(_SCHEMA)
            opened[self._path] = conn
        return conn

    def validate_key(self, key: str) -> None:
        """Accept any key: SQLite has none of memcached's limits on them.

        Django's check warns about keys memcached would refuse, on every
        operation (~2 us, a rate-limit check makes two).
        """

    def warm(self) -> None:
        """Open this thread's connection now (a new one can wait tens of ms on the file's locks)."""
        self._db()

    @contextlib.contextmanager
    def together(self, *, strict: bool = False) -> Iterator[None]:
        """Make this thread's cache writes in the block one transaction: one commit.

        Every write is otherwise its own transaction; a commit (the WAL's
        write and its locks) costs several times the write itself. Other
        connections wait for the block's end to write, so keep it short. An
        exception in the block rolls its writes back; a nested block joins
        the outer one. If the transaction cannot begin (the file locked past
        the busy timeout, or not writable), `strict` raises that error;
        otherwise the writes go one by one, as without the block, each
        meeting its caller's handling of a store that is down.
        """
        db = self._db()
        if db.in_transaction:
            yield
            return
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            if strict:
                raise
            yield
            return
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _encode(value: Any) -> int | bytes:
        # bool is an int subclass but must round-trip as bool.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def _decode(raw: int | bytes) -> Any:
        if isinstance(raw, int):
            return raw
        return pickle.loads(raw)  # noqa: S301 - only this backend writes these rows

    def _expiry(self, timeout: float | object | None) -> float | None:
        seconds = self.get_backend_timeout(timeout)  # type: ignore[arg-type]  # DEFAULT_TIMEOUT sentinel is an object
        return None if seconds is None else float(seconds)

    def add(
        self,
        key: str,
        value: Any,
        timeout: float | object | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> bool:
        key = self.make_and_validate_key(key, version=version)
        # One statement: written when the key is absent or expired, else not.
        cur = self._db().execute(
            "INSERT INTO cache (key, value, expires) VALUES (?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires = excluded.expires"
            " WHERE cache.expires IS NOT NULL AND cache.expires <= ?",
            (key, self._encode(value), self._expiry(timeout), time.time()),
        )
        return cur.rowcount == 1

    def get(self, key: str, default: Any = None, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        row = (
            self._db()
            .execute(
                "SELECT value FROM cache WHERE key = ? AND (expires IS NULL OR expires > ?)",
                (key, time.time()),
            )
            .fetchone()
        )
        return default if row is None else self._decode(row[0])

    def get_many(self, keys: Iterable[str], version: int | None = None) -> dict[str, Any]:
        """Read the keys with one statement per _KEYS_PER_READ, not one statement a key.

        The batched trips read a burst's response-cache keys at once; Django's
        default runs `get` once for each.
        """
        names = {self.make_and_validate_key(key, version=version): key for key in keys}
        found: dict[str, Any] = {}
        listed = list(names)
        now = time.time()
        for start in range(0, len(listed), _KEYS_PER_READ):
            chunk = listed[start : start + _KEYS_PER_READ]
            rows = (
                self._db()
                .execute(
                    f"SELECT key, value FROM cache WHERE key IN ({', '.join('?' * len(chunk))})"  # noqa: S608 - placeholders only
                    " AND (expires IS NULL OR expires > ?)",
                    (*chunk, now),
                )
                .fetchall()
            )
            for name, raw in rows:
                found[names[name]] = self._decode(raw)
        return found

    def set(
        self,
        key: str,
        value: Any,
        timeout: float | object | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> None:
        key = self.make_and_validate_key(key, version=version)
        self._db().execute(
            "INSERT OR REPLACE INTO cache (key, value, expires) VALUES (?, ?, ?)",
            (key, self._encode(value), self._expiry(timeout)),
        )

    def set_many(
        self,
        data: dict[str, Any],
        timeout: float | object | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> list[str]:
        """Write every key in one transaction (one WAL commit, not one per key)."""
        expires = self._expiry(timeout)
        rows = [
            (self.make_and_validate_key(key, version=version), self._encode(value), expires)
            for key, value in data.items()
        ]
        with self.together(strict=True):  # not a thousand commits instead
            self._db().executemany(
                "INSERT OR REPLACE INTO cache (key, value, expires) VALUES (?, ?, ?)", rows
            )
        return []

    def touch(
        self,
        key: str,
        timeout: float | object | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> bool:
        key = self.make_and_validate_key(key, version=version)
        cur = self._db().execute(
            "UPDATE cache SET expires = ? WHERE key = ? AND (expires IS NULL OR expires > ?)",
            (self._expiry(timeout), key, time.time()),
        )
        return cur.rowcount == 1

    def delete(self, key: str, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        return self._db().execute("DELETE FROM cache WHERE key = ?", (key,)).rowcount == 1

    def incr(self, key: str, delta: int = 1, version: int | None = None) -> int:
        key = self.make_and_validate_key(key, version=version)
        row = (
            self._db()
            .execute(
                "UPDATE cache SET value = value + ? WHERE key = ? AND typeof(value) = 'integer'"
                " AND (expires IS NULL OR expires > ?) RETURNING value",
                (delta, key, time.time()),
            )
            .fetchone()
        )
        if row is None:
            raise ValueError(f"Key '{key}' not found")
        return int(row[0])

    def count_many(self, counters: list[tuple[str, float]]) -> list[int | None]:
        """Add one to each counter, made at 1 with its timeout if absent or expired.

        `counters` are (key, timeout in seconds); a key may come more than
        once and is then counted once for each, in order. Returns each
        counter's value after its increment, or None for a key that holds
        something other than an integer. One statement per _COUNTERS_PER_WRITE
        counters, instead of an add (and an incr) each.
        """
        keys = [self.make_and_validate_key(key) for key, _timeout in counters]
        now = time.time()
        found: dict[str, list[int]] = {}
        db = self._db()
        for start in range(0, len(counters), _COUNTERS_PER_WRITE):
            lot = counters[start : start + _COUNTERS_PER_WRITE]
            params: list[Any] = []
            for key, (_name, timeout) in zip(keys[start : start + len(lot)], lot, strict=True):
                params += (key, now + timeout)
            params += (now, now, now)
            # An expired counter starts again at 1 with its new timeout.
            rows = db.execute(
                "INSERT INTO cache (key, value, expires) VALUES "  # noqa: S608 - placeholders only
                + ", ".join(["(?, 1, ?)"] * len(lot))
                + " ON CONFLICT (key) DO UPDATE SET"
                " value = CASE WHEN cache.expires <= ? THEN 1 ELSE cache.value + 1 END,"
                " expires = CASE WHEN cache.expires <= ? THEN excluded.expires"
                " ELSE cache.expires END"
                " WHERE typeof(cache.value) = 'integer' OR cache.expires <= ?"
                " RETURNING key, value",
                params,
            ).fetchall()
            for key, value in rows:
                found.setdefault(key, []).append(int(value))
        # A key counted twice in a statement comes back twice: the lower
        # value is the earlier occurrence's.
        for values in found.values():
            values.sort(reverse=True)
        return [found[key].pop() if found.get(key) else None for key in keys]

    def decr(self, key: str, delta: int = 1, version: int | None = None) -> int:
        return self.incr(key, -delta, version=version)

    def has_key(self, key: str, version: int | None = None) -> bool:
        sentinel = object()
        return self.get(key, sentinel, version=version) is not sentinel

    def clear(self) -> None:
        self._db().execute("DELETE FROM cache")

    def close(self, **kwargs: Any) -> None:
        # Connections are per thread and reused; Django calls close() after
        # every request, which must not throw them away.
        return None
