"""The embedded mode's SQLite backend converts each statement's placeholders once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db.backends.sqlite3 import base as django_sqlite
from django.db.utils import ConnectionHandler

from config.sqlite_db import base


@pytest.fixture
def conn(tmp_path, monkeypatch, django_db_blocker) -> Iterator[Any]:
    """A connection of our backend to a file of its own, with nothing kept yet."""
    monkeypatch.setattr(base, "_converted", {})
    monkeypatch.setattr(base, "_kept_chars", 0)
    handler = ConnectionHandler(
        {"default": {"ENGINE": "config.sqlite_db", "NAME": str(tmp_path / "x.sqlite3")}}
    )
    connection = handler["default"]
    with django_db_blocker.unblock():
        yield connection
        connection.close()


@pytest.fixture
def scans(monkeypatch) -> list[str]:
    """The statements Django's own conversion scanned."""
    scanned: list[str] = []
    convert = django_sqlite.SQLiteCursorWrapper.convert_query

    def counting(self: Any, query: str, *, param_names: Any = None) -> Any:
        scanned.append(query)
        return convert(self, query, param_names=param_names)

    monkeypatch.setattr(django_sqlite.SQLiteCursorWrapper, "convert_query", counting)
    return scanned


def test_a_statement_run_again_is_not_converted_again(conn, scans):
    rows = ", ".join(["(%s, %s)"] * 100)
    with conn.cursor() as cursor:
        cursor.execute("CREATE TABLE t (a INTEGER, b TEXT)")
        for start in (0, 100):
            params = [v for i in range(start, start + 100) for v in (i, f"{i}%")]
            cursor.execute(f"INSERT INTO t (a, b) VALUES {rows}", params)
        # A literal %% is still a percent sign; %s still a parameter.
        for _ in range(2):
            cursor.execute("SELECT count(*), max(a) FROM t WHERE b = %s || '%%'", ["142"])
            assert cursor.fetchone() == (1, 142)
    inserts = [q for q in scans if q.startswith("INSERT")]
    selects = [q for q in scans if q.startswith("SELECT")]
    assert (len(inserts), len(selects)) == (1, 1)


@pytest.mark.parametrize(
    "bound, value", [("MAX_KEPT", 2), ("MAX_KEPT_CHARS", 2 * len("SELECT %s + 0"))]
)
def test_only_so_many_statements_are_kept(conn, scans, monkeypatch, bound, value):
    monkeypatch.setattr(base, bound, value)
    with conn.cursor() as cursor:
        for _ in range(2):
            for n in range(4):
                cursor.execute(f"SELECT %s + {n}", [1])
                assert cursor.fetchone() == (1 + n,)
    # The first two are kept; the other two are converted every time.
    assert scans == [f"SELECT %s + {n}" for n in (0, 1, 2, 3, 2, 3)]
    assert len(base._converted) == 2


def test_the_embedded_mode_uses_it():
    from django.db import connections

    if connections["default"].vendor != "sqlite":
        pytest.skip("the scaled pass runs on PostgreSQL")
    assert isinstance(connections["default"], base.DatabaseWrapper)
