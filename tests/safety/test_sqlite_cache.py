"""The shared caches: add, incr and expiry behave like Django's; any key is taken."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from config.sqlite_cache import SQLiteCache


def make(tmp_path) -> SQLiteCache:
    return SQLiteCache(str(tmp_path / "cache.sqlite3"), {})


def test_add_writes_only_an_absent_or_expired_key(tmp_path):
    cache = make(tmp_path)
    assert cache.add("k", 1, timeout=60) is True
    assert cache.add("k", 2, timeout=60) is False
    assert cache.get("k") == 1
    cache.set("gone", "old", timeout=-1)  # already expired
    assert cache.get("gone") is None
    assert cache.add("gone", "new", timeout=60) is True
    assert cache.get("gone") == "new"
    assert cache.add("forever", 0, timeout=None) is True
    assert cache.add("forever", 5, timeout=None) is False


def test_get_many_reads_what_get_reads_in_a_statement_per_500_keys(tmp_path):
    cache = make(tmp_path)
    values = {f"k{n}": {"text": f"reply {n}"} for n in range(1200)}
    values.update({"int": 7, "flag": False, "text": "plain"})
    cache.set_many(values, timeout=60)
    cache.set("expired", "old", timeout=-1)
    statements: list[str] = []
    cache._db().set_trace_callback(statements.append)
    try:
        found = cache.get_many([*values, "expired", "absent"])
    finally:
        cache._db().set_trace_callback(None)
    assert found == values  # the caller's own keys, without the expired or absent ones
    assert found["flag"] is False and found["int"] == 7
    assert len(statements) == 3  # 1,205 keys: 500 + 500 + 205
    cache.set("v", "second", version=2)
    assert cache.get_many(["v", "k1"], version=2) == {"v": "second"}


def test_counting_from_many_threads_and_instances_loses_nothing(tmp_path):
    # Django keeps a cache instance per async context: they share the file.
    caches = [make(tmp_path) for _ in range(4)]
    caches[0].add("n", 0, timeout=60)

    def count(cache: SQLiteCache) -> None:
        for _ in range(200):
            cache.incr("n")

    threads = [threading.Thread(target=count, args=(c,)) for c in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert caches[0].get("n") == 800


def test_the_wal_is_checkpointed_by_the_thread_not_by_commits(tmp_path):
    from config import sqlite_wal

    cache = make(tmp_path)
    for n in range(300):  # well past SQLite's default 1,000-page auto-checkpoint
        cache.set(f"key-{n}", "x" * 4000, timeout=None)
    wal = tmp_path / "cache.sqlite3-wal"
    # The commits left the log alone: only the backstop would checkpoint it.
    assert wal.stat().st_size > 1000 * 4096
    busy, log, done = sqlite_wal.checkpoint(str(tmp_path / "cache.sqlite3"))
    assert busy == 0 and log > 1000 and done == log


def _seen_elsewhere(cache: SQLiteCache, key: str) -> object:
    """Read `key` on another thread: its own connection, outside this one's transaction."""
    seen: list[object] = []
    reader = threading.Thread(target=lambda: seen.append(cache.get(key)))
    reader.start()
    reader.join()
    return seen[0]


def test_writes_together_are_one_transaction(tmp_path):
    cache = make(tmp_path)
    with cache.together():
        cache.add("n", 0, timeout=60)
        assert cache.incr("n", 5) == 5
        cache.set_many({"a": 1, "b": 2}, timeout=60)  # joins the block
        with cache.together():  # so does a nested block
            cache.set("c", 3, timeout=60)
        assert _seen_elsewhere(cache, "n") is None  # nothing committed yet
    assert [_seen_elsewhere(cache, k) for k in ("n", "a", "b", "c")] == [5, 1, 2, 3]


def test_an_error_in_a_block_writes_nothing_of_it(tmp_path):
    cache = make(tmp_path)
    cache.set("kept", 1, timeout=60)
    try:
        with cache.together():
            cache.incr("kept", 10)
            cache.set("new", 2, timeout=60)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert (cache.get("kept"), cache.get("new")) == (1, None)
    cache.set("after", 3, timeout=60)  # the connection is usable again, autocommitting
    assert _seen_elsewhere(cache, "after") == 3


def test_a_block_that_cannot_begin_writes_one_by_one(tmp_path, monkeypatch):
    """A locked or unwritable file: each write meets its own error handling, as without a block."""
    cache = make(tmp_path)
    real = cache._db()

    class Locked:
        in_transaction = False

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if sql == "BEGIN IMMEDIATE":
                raise sqlite3.OperationalError("database is locked")
            return real.execute(sql, *args)

    monkeypatch.setattr(cache, "_db", Locked)
    with cache.together():
        cache.set("a", 1, timeout=60)
        assert _seen_elsewhere(make(tmp_path), "a") == 1  # committed at once
    # set_many does not fall back to a commit a key: it fails as a whole.
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        cache.set_many({"b": 2, "c": 3}, timeout=60)
    assert _seen_elsewhere(make(tmp_path), "b") is None


@pytest.mark.parametrize("alias", ["default", "ratelimit"])
def test_the_configured_caches_take_any_key_without_a_memcached_warning(alias):
    # SQLite (embedded) and Redis (scaled) take keys memcached would refuse,
    # so Django's per-operation check for those is skipped: a warning here
    # would mean every cache operation pays for it again.
    import warnings

    from django.core.cache import CacheKeyWarning, caches

    cache = caches[alias]
    key = "a key with spaces, \x07 and " + "x" * 300
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheKeyWarning)
        assert cache.add(key, 1, timeout=60) is True
        assert cache.incr(key) == 2
        assert cache.get(key) == 2
        cache.delete(key)
    assert cache.get(key) is None


def test_count_many_counts_each_key_in_order_with_a_statement_per_400(tmp_path):
    cache = make(tmp_path)
    cache.set("expired", 9, timeout=-1)
    cache.set("text", "not a number", timeout=60)
    counters = [("a", 60), ("b", 60), ("a", 60), ("expired", 60), ("text", 60)]
    assert cache.count_many(counters) == [1, 1, 2, 1, None]
    assert cache.get("a") == 2 and cache.get("expired") == 1 and cache.get("text") == "not a number"
    statements: list[str] = []
    cache._db().set_trace_callback(statements.append)
    try:
        counts = cache.count_many([(f"k{n % 600}", 60) for n in range(1000)])
    finally:
        cache._db().set_trace_callback(None)
    assert counts == [1] * 600 + [2] * 400
    assert len(statements) == 3  # 400 + 400 + 200


@pytest.mark.django_db
def test_the_rate_limit_store_counts_many_at_once(django_db_blocker):
    # The configured store: this SQLite file, or Redis in the scaled pass.
    import uuid

    from django.core.cache import caches

    cache = caches["ratelimit"]
    a, b = f"count-many-{uuid.uuid4()}", f"count-many-{uuid.uuid4()}"
    assert cache.count_many([(a, 60), (b, 60), (a, 60)]) == [1, 1, 2]
    assert cache.count_many([(a, 60)]) == [3]
    assert cache.get(a) == 3
    assert cache.count_many([]) == []
    if hasattr(cache, "_cache"):  # Redis: each counter expires with its window
        client = cache._cache.get_client(None)
        assert 0 < client.pttl(cache.make_and_validate_key(a)) <= 60_000
    cache.delete(a)
    cache.delete(b)
