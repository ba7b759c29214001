"""Django's SQLite backend, with each statement's placeholders converted once.

Django writes SQL with `%s` placeholders and its SQLite cursor rewrites them
to `?` with a regular expression on every execute. For the statements a
burst of messages runs, a multi-row INSERT of 128 rows among them, that scan
cost ~8 ms of a 1,000-send trip (make bench (c), docs/benchmarks.md). The same
few statements run again and again, so each conversion is kept, looked up
by the statement's text: the first distinct statements of the process, up
to `MAX_KEPT` of them and `MAX_KEPT_CHARS` characters in all (their
conversions take as much again).
"""

from __future__ import annotations

from typing import Any

from django.db.backends.sqlite3 import base

MAX_KEPT = 1024
MAX_KEPT_CHARS = 4_000_000
_converted: dict[str, str] = {}
_kept_chars = 0


class SQLiteCursorWrapper(base.SQLiteCursorWrapper):
    def convert_query(self, query: str, *, param_names: Any = None) -> str:
        global _kept_chars
        if param_names is not None:  # named parameters: rare, left to Django
            return str(super().convert_query(query, param_names=param_names))  # type: ignore[misc]
        converted = _converted.get(query)
        if converted is None:
            converted = str(super().convert_query(query))  # type: ignore[misc]  # not in the stubs
            if len(_converted) < MAX_KEPT and _kept_chars + len(query) <= MAX_KEPT_CHARS:
                _converted[query] = converted
                _kept_chars += len(query)
        return converted


class DatabaseWrapper(base.DatabaseWrapper):
    def create_cursor(self, name: str | None = None) -> Any:
        return self.connection.cursor(factory=SQLiteCursorWrapper)
