"""The few statements every chat message runs, built once instead of per call.

Django's ORM compiles SQL anew on every call: about 150-250 µs a statement on
this kind of machine, several times what SQLite or PostgreSQL take to run it.
A message runs the same handful of statements (store the user message and
its pending reply, bump the conversation, finish the reply), so these build
their SQL once per database vendor from the model's metadata and then only
convert values, with each field's own `get_db_prep_save`: the same
conversion the ORM applies, so what is stored is identical (a str for a text
field, an int for an integer one, a float for a float one or a bool for a
boolean one, which that conversion would return as it is, skips the call).
An INSERT writes the plain defaults its rows leave unset into the statement
instead of binding them (Insert).

Everything else keeps using the ORM; a model change reaches these statements
through `_meta`, and the tests that store and read messages cover both.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper
from django.utils import timezone


def _field(model: type[models.Model], name: str) -> models.Field[Any, Any]:
    field = model._meta.get_field(name)
    assert isinstance(field, models.Field), name
    return field


# Field kinds whose conversion hands a value of exactly this type to the
# database as it is (get_prep_value is str(), int(), float() or bool() of
# it, and the vendor adapts nothing), so such a value skips the call.
_PASSES_AS_IS: dict[str, type] = {
    "CharField": str,
    "TextField": str,
    "AutoField": int,
    "BigAutoField": int,
    "SmallAutoField": int,
    "IntegerField": int,
    "BigIntegerField": int,
    "SmallIntegerField": int,
    "PositiveIntegerField": int,
    "PositiveBigIntegerField": int,
    "PositiveSmallIntegerField": int,
    "FloatField": float,
    "BooleanField": bool,
}


def _passes_as_is(field: models.Field[Any, Any]) -> type | None:
    """Return the type of value the field stores unconverted, or None."""
    target = field.target_field if isinstance(field, models.ForeignKey) else field
    return _PASSES_AS_IS.get(target.get_internal_type())


# A default that can be written into the statement instead of bound: text
# of these characters only (no quote, backslash or percent sign to escape).
_PLAIN_TEXT = re.compile(r"[\w\[\]{}:.,\- ]*", re.ASCII)


def _literal(value: Any, vendor: str) -> str | None:
    """Return `value` as an SQL literal, or None if it must stay a parameter."""
    if value is None:
        return "NULL"
    if type(value) is bool:
        if vendor == "sqlite":
            return "1" if value else "0"
        return "TRUE" if value else "FALSE"
    if type(value) is int:
        return str(value)
    if isinstance(value, str) and _PLAIN_TEXT.fullmatch(value):
        # A choice's enum member is bound as its text, which str.__str__ gives.
        return f"'{str.__str__(value)}'"
    return None


@contextlib.contextmanager
def _cursor(conn: BaseDatabaseWrapper) -> Iterator[CursorWrapper]:
    """Yield a cursor for one of these statements: the connection's own, kept.

    Making and closing a cursor costs Django ~18 us, about what SQLite takes
    to run one of these statements; a message at one connection runs four
    before its first token. While queries are logged (DEBUG, or a test that
    captures them) each statement gets a new cursor, as Django hands out a
    logging one then. A cursor is kept per connection wrapper (one a thread)
    and made anew once the wrapper holds another database connection. Every
    statement here reads its rows to the end, so an SQLite statement left on
    a kept cursor is done and holds no snapshot or write open.
    """
    if conn.queries_logged:
        with conn.cursor() as cursor:
            yield cursor
        return
    conn.ensure_connection()
    kept: tuple[Any, CursorWrapper] | None = getattr(conn, "_chat_sql_cursor", None)
    if kept is None or kept[0] is not conn.connection:
        kept = (conn.connection, conn.cursor())
        conn._chat_sql_cursor = kept  # type: ignore[attr-defined]
    yield kept[1]


class Insert:
    """INSERT rows with every concrete field; absent values take the field's default.

    A default that every row of a statement takes is written into the
    statement as a literal where it is plain (NULL, a number, a boolean,
    simple text): binding a parameter costs the driver ~0.45 us, and a
    message row has 26 columns of which a send gives seven. A 128-row
    INSERT of messages took 32 us a row with every value bound against 19
    with the defaults written in (SQLite, 2-core machine).

    On PostgreSQL, rows go in as one array a column through UNNEST, as
    Django's own bulk_create does (see _statement).
    """

    def __init__(self, model: type[models.Model]) -> None:
        self.model = model
        self.fields = [
            f for f in model._meta.concrete_fields if not isinstance(f, models.AutoField)
        ]
        self._index = {f.attname: i for i, f in enumerate(self.fields)}
        # Per field: the type its conversion leaves as it is (with None).
        self._as_is = [_passes_as_is(f) for f in self.fields]
        self._now = [
            i
            for i, f in enumerate(self.fields)
            if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False)
        ]
        # Per vendor: the statement's head and tail, every field's default
        # already converted, and as a literal where it can be one.
        self._plans: dict[str, tuple[str, str, list[Any], list[str | None]]] = {}
        # Per vendor and set of fields the rows give: a row's SQL, and the
        # fields bound in it, in order.
        self._rows: dict[tuple[str, frozenset[str]], tuple[str, list[int]]] = {}
        # PostgreSQL, per set of fields the rows give: the UNNEST statement.
        self._unnest: dict[frozenset[str], str] = {}

    def _plan(self, conn: BaseDatabaseWrapper) -> tuple[str, str, list[Any], list[str | None]]:
        plan = self._plans.get(conn.vendor)
        if plan is not None:
            return plan
        meta = self.model._meta
        assert meta.pk is not None
        q = conn.ops.quote_name
        columns = ", ".join(q(f.column) for f in self.fields)
        # Names from the model's metadata; every value is a parameter or a
        # literal of _literal's plain kinds.
        head = f"INSERT INTO {q(meta.db_table)} ({columns}) VALUES "  # noqa: S608
        returning = f" RETURNING {q(meta.pk.column)}"
        defaults = [f.get_db_prep_save(f.get_default(), conn) for f in self.fields]
        literals = [
            None if i in self._now else _literal(value, conn.vendor)
            for i, value in enumerate(defaults)
        ]
        return self._plans.setdefault(conn.vendor, (head, returning, defaults, literals))

    def _row(
        self, conn: BaseDatabaseWrapper, literals: list[str | None], given: frozenset[str]
    ) -> tuple[str, list[int]]:
        """Return a row's SQL for rows that give these fields, and the fields it binds."""
        key = (conn.vendor, given)
        found = self._rows.get(key)
        if found is not None:
            return found
        parts: list[str] = []
        bound: list[int] = []
        for i, f in enumerate(self.fields):
            literal = None if f.attname in given else literals[i]
            if literal is None:
                parts.append("%s")
                bound.append(i)
            else:
                parts.append(literal)
        return self._rows.setdefault(key, ("(" + ", ".join(parts) + ")", bound))

    def _params(
        self,
        conn: BaseDatabaseWrapper,
        rows: Sequence[dict[str, Any]],
        defaults: list[Any],
        bound: list[int],
    ) -> list[Any]:
        """Every row's bound values in column order, converted as the ORM would, one list."""
        now = timezone.now()
        base = [
            self.fields[i].get_db_prep_save(now, conn) if i in self._now else defaults[i]
            for i in bound
        ]
        # Where each given field's value goes in a row's bound values.
        at = {self.fields[i].attname: k for k, i in enumerate(bound)}
        fields, index, as_is = self.fields, self._index, self._as_is
        params: list[Any] = []
        for values in rows:
            row = list(base)
            for name, value in values.items():
                i = index[name]
                kind = as_is[i]
                if kind is not None and (value is None or type(value) is kind):
                    row[at[name]] = value
                else:
                    row[at[name]] = fields[i].get_db_prep_save(value, conn)
            params += row
        return params

    def _unnest_sql(
        self,
        conn: BaseDatabaseWrapper,
        literals: list[str | None],
        given: frozenset[str],
        bound: list[int],
    ) -> str:
        """Return the UNNEST form of the INSERT for rows that give these fields.

        One array parameter a bound column, each cast to its column's type
        without a length or precision (as Django's bulk_create does), and
        the literal defaults in the SELECT list.
        """
        found = self._unnest.get(given)
        if found is not None:
            return found
        meta = self.model._meta
        assert meta.pk is not None
        q = conn.ops.quote_name
        position = {i: k for k, i in enumerate(bound)}
        # A field is bound unless its default is a literal (_row).
        selected = [
            f"u.c{position[i]}" if i in position else str(literals[i])
            for i in range(len(self.fields))
        ]
        arrays = ", ".join(
            f"(%s)::{str(self.fields[i].db_type(conn)).split('(')[0]}[]" for i in bound
        )
        aliases = ", ".join(f"c{k}" for k in range(len(bound)))
        columns = ", ".join(q(f.column) for f in self.fields)
        # Names from the model's metadata; every value is a parameter or a
        # literal of _literal's plain kinds.
        sql = (
            f"INSERT INTO {q(meta.db_table)} ({columns}) "  # noqa: S608
            f"SELECT {', '.join(selected)} FROM UNNEST({arrays}) AS u({aliases}) "
            f"RETURNING {q(meta.pk.column)}"
        )
        return self._unnest.setdefault(given, sql)

    def _statement(
        self, conn: BaseDatabaseWrapper, rows: Sequence[dict[str, Any]]
    ) -> tuple[str, list[Any]]:
        head, returning, defaults, literals = self._plan(conn)
        given = frozenset(name for values in rows for name in values)
        row, bound = self._row(conn, literals, given)
        params = self._params(conn, rows, defaults, bound)
        if conn.vendor == "postgresql" and len(rows) > 1 and bound:
            # A column of values a parameter: the statement's text is short
            # and the same for any number of rows, so psycopg converts it
            # once (its cache keeps statements up to 4 KB; a 32-row VALUES
            # list of messages is ~4.8 KB and was parsed again each time),
            # and PostgreSQL plans it faster. 32 messages: 2.3-3.3 -> 1.5-2.2 ms.
            n = len(bound)
            columns = [params[k::n] for k in range(n)]
            return self._unnest_sql(conn, literals, given, bound), columns
        sql = head + ", ".join([row] * len(rows)) + returning
        return sql, params

    def run(self, **values: Any) -> int:
        """Insert the row and return its primary key."""
        conn = connections[DEFAULT_DB_ALIAS]
        sql, params = self._statement(conn, [values])
        with _cursor(conn) as cursor:
            cursor.execute(sql, params)
            # Read to the end: a kept cursor's statement is then done, and
            # holds no transaction open on SQLite (see _cursor).
            [(pk,)] = cursor.fetchall()
            return int(pk)

    def run_many(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Insert the rows with one statement; return their primary keys, in row order.

        SQLite and PostgreSQL return a multi-row INSERT's rows in the order
        of its VALUES (Django's bulk_create relies on it as well); a count
        that does not match raises rather than pair ids with the wrong rows.
        """
        if not rows:
            return []
        conn = connections[DEFAULT_DB_ALIAS]
        sql, params = self._statement(conn, rows)
        with _cursor(conn) as cursor:
            cursor.execute(sql, params)
            ids = [int(found[0]) for found in cursor.fetchall()]
        if len(ids) != len(rows):
            raise DatabaseError(f"{len(ids)} ids came back for {len(rows)} rows")
        return ids


class Update:
    """UPDATE rows matching equality (and IS NULL) conditions; return the rows changed."""

    def __init__(
        self,
        model: type[models.Model],
        *,
        set_fields: Sequence[str],
        where: Sequence[str],
        where_null: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.set_fields = [_field(model, name) for name in set_fields]
        self.where = [_field(model, name) for name in where]
        self.where_null = [_field(model, name) for name in where_null]
        # Per field: the type its conversion leaves as it is (with None).
        self._as_is = [_passes_as_is(f) for f in (*self.set_fields, *self.where)]
        self._sql: dict[str, str] = {}

    def _build(self, conn: BaseDatabaseWrapper) -> str:
        q = conn.ops.quote_name
        assignments = ", ".join(f"{q(f.column)} = %s" for f in self.set_fields)
        conditions = [f"{q(f.column)} = %s" for f in self.where]
        conditions += [f"{q(f.column)} IS NULL" for f in self.where_null]
        return (
            f"UPDATE {q(self.model._meta.db_table)} SET {assignments} "  # noqa: S608
            f"WHERE {' AND '.join(conditions)}"
        )

    def _sql_for(self, conn: BaseDatabaseWrapper) -> str:
        return self._sql.get(conn.vendor) or self._sql.setdefault(conn.vendor, self._build(conn))

    def _params(
        self, conn: BaseDatabaseWrapper, where: Sequence[Any], values: dict[str, Any]
    ) -> list[Any]:
        given: list[Any] = [values[f.attname] for f in self.set_fields]
        given += where
        return [
            value
            if kind is not None and (value is None or type(value) is kind)
            else f.get_db_prep_save(value, conn)
            for f, kind, value in zip(
                (*self.set_fields, *self.where), self._as_is, given, strict=True
            )
        ]

    def run(self, *, where: Sequence[Any], **values: Any) -> int:
        conn = connections[DEFAULT_DB_ALIAS]
        params = self._params(conn, where, values)
        with _cursor(conn) as cursor:
            cursor.execute(self._sql_for(conn), params)
            return int(cursor.rowcount)

    def run_many(self, rows: Sequence[tuple[Sequence[Any], dict[str, Any]]]) -> None:
        """Run the UPDATE once per (where, values) row, in one call to the driver.

        One `executemany` instead of a statement each: the driver loops in C
        (SQLite) or pipelines the statements (psycopg), where a statement
        each through Django's cursor costs tens of microseconds of Python.
        The drivers do not say which rows changed: a caller that needs to
        know uses `run`.
        """
        if not rows:
            return
        conn = connections[DEFAULT_DB_ALIAS]
        params = [self._params(conn, where, values) for where, values in rows]
        with _cursor(conn) as cursor:
            cursor.executemany(self._sql_for(conn), params)


class Select:
    """A hand-written SELECT whose names come from the model: `{table}`, `{<field>}`.

    Each `{<field>}` becomes that field's quoted column, so the statement
    follows the model like the ORM's would.
    """

    def __init__(self, model: type[models.Model], template: str) -> None:
        self.model = model
        self.template = template
        self._sql: dict[str, str] = {}

    def _build(self, conn: BaseDatabaseWrapper) -> str:
        q = conn.ops.quote_name
        meta = self.model._meta
        names = {"table": q(meta.db_table)}
        for f in meta.concrete_fields:
            names[f.name] = names[f.attname] = q(f.column)
        return self.template.format_map(names)

    def rows(self, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        conn = connections[DEFAULT_DB_ALIAS]
        sql = self._sql.get(conn.vendor) or self._sql.setdefault(conn.vendor, self._build(conn))
        with _cursor(conn) as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())
