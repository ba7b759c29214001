"""The prebuilt statements (chat/sql.py) store exactly what the ORM would."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection

from chat import sql
from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db


def _stored(pk: int, values: dict[str, Any]) -> dict[str, Any]:
    row = Message.objects.filter(pk=pk).values().get()
    for name in ("id", "created_at"):
        row.pop(name)
    # Unique per owner: each row has its own, and it is the one given.
    assert row.pop("client_msg_id") == values.get("client_msg_id")
    return row


@pytest.fixture
def conversation(make_user) -> Conversation:
    return Conversation.objects.create(user=make_user("alice"))


def _cases(conversation: Conversation, earlier: Message) -> list[dict[str, Any]]:
    return [
        # Plain values, choices given as their enum members, a UUID, JSON.
        {
            "conversation_id": conversation.pk,
            "role": Message.Role.USER,
            "content": "hello — ünïcode, 'quotes' and \\ back\\slashes",
            "owner_key": f"u:{conversation.user_id}",
            "client_msg_id": uuid.uuid4(),
            "injection_score": 0.25,
            "injection_signals": ["override", "roleplay"],
        },
        # Choices given as plain strings, None where a field allows it,
        # integers, a boolean, a decimal and a JSON object.
        {
            "conversation_id": conversation.pk,
            "role": "assistant",
            "status": "finished",
            "finish_reason": "stop",
            "reply_to_id": earlier.pk,
            "model": "demo:demo",
            "version_id": None,
            "ttft_ms": 12,
            "latency_ms": 3400,
            "prompt_tokens": 0,
            "completion_tokens": 150,
            "cost_usd": Decimal("0.00012345"),
            "cached": True,
            "injection_score": None,
            "moderation": {"stage": "output", "category": "violence", "score": 0.9},
            "call_path": [{"model": "demo:demo", "outcome": "ok"}],
        },
        # Values of another type than the field's: converted as the ORM does.
        {
            "conversation_id": str(conversation.pk),
            "role": "user",
            "latency_ms": 3400.9,
            "injection_score": 1,
            "usage_estimated": 1,
            "owner_key": 42,
        },
        # Nothing but the required fields: every default.
        {"conversation_id": conversation.pk, "role": Message.Role.USER},
    ]


def test_insert_stores_what_the_orm_stores(conversation):
    earlier = Message.objects.create(conversation=conversation, role="user", content="earlier")
    insert = sql.Insert(Message)
    for case in _cases(conversation, earlier):

        def fresh(case: dict[str, Any] = case) -> dict[str, Any]:
            if "client_msg_id" not in case:
                return dict(case)
            return dict(case, client_msg_id=uuid.uuid4())

        by_orm = fresh()
        orm_row = _stored(Message.objects.create(**by_orm).pk, by_orm)
        one = fresh()
        assert _stored(sql.Insert(Message).run(**one), one) == orm_row
        first, second = fresh(), fresh()
        ids = insert.run_many([first, second])
        assert _stored(ids[0], first) == _stored(ids[1], second) == orm_row


def test_update_stores_what_the_orm_stores(conversation):
    earlier = Message.objects.create(conversation=conversation, role="user", content="earlier")
    for case in _cases(conversation, earlier):
        values = {k: v for k, v in case.items() if k != "client_msg_id"}
        by_orm, by_update, many_a, many_b, done = (
            Message.objects.create(conversation=conversation, role="assistant", status="pending")
            for _ in range(5)
        )
        Message.objects.filter(pk=by_orm.pk).update(**values)
        update = sql.Update(Message, set_fields=list(values), where=["id", "status"])
        assert update.run(where=[by_update.pk, Message.Status.PENDING], **values) == 1
        assert _stored(by_update.pk, {}) == _stored(by_orm.pk, {})
        # The WHERE values are converted too, and a row that no longer matches is left alone.
        assert update.run(where=[str(by_update.pk), "pending"], **values) == int(
            values.get("status", "pending") == "pending"
        )
        # Many rows in one call: each as `run` stores it, and the guard holds per row.
        Message.objects.filter(pk=done.pk).update(status="finished", content="kept")
        before = _stored(done.pk, {})
        update.run_many(
            [
                ([many_a.pk, Message.Status.PENDING], values),
                ([str(done.pk), "pending"], values),
                ([many_b.pk, "pending"], values),
            ]
        )
        assert _stored(many_a.pk, {}) == _stored(many_b.pk, {}) == _stored(by_orm.pk, {})
        assert _stored(done.pk, {}) == before


def test_run_many_returns_each_rows_id_in_order(conversation):
    rows = [
        {"conversation_id": conversation.pk, "role": "user", "content": f"message {n}"}
        for n in range(40)
    ]
    ids = sql.Insert(Message).run_many(rows)
    assert len(set(ids)) == 40
    contents = dict(Message.objects.filter(pk__in=ids).values_list("pk", "content"))
    assert [contents[pk] for pk in ids] == [f"message {n}" for n in range(40)]
    assert sql.Insert(Message).run_many([]) == []


def test_a_row_binds_only_the_values_it_gives_and_its_time_stamp(conversation):
    # The defaults every row takes are written into the statement (binding a
    # parameter is the bulk of a multi-row INSERT's cost in the driver).
    bound: list[int] = []
    statements: list[str] = []

    def count(execute: Any, sql_text: str, params: Any, many: bool, context: Any) -> Any:
        statements.append(sql_text)
        # On PostgreSQL a multi-row INSERT binds one array a column (UNNEST).
        unnest = connection.vendor == "postgresql"
        bound.append(sum(len(column) for column in params) if unnest else len(params))
        if unnest:
            assert all(len(column) == 3 for column in params)
        return execute(sql_text, params, many, context)

    rows = [
        {"conversation_id": conversation.pk, "role": "user", "content": f"message {n}"}
        for n in range(3)
    ]
    with connection.execute_wrapper(count):
        ids = sql.Insert(Message).run_many(rows)
    # Each row's conversation, role, content and created_at, and the defaults
    # the driver adapts itself: cost_usd's decimal, and on PostgreSQL the two
    # JSON fields' wrapped values.
    per_row = 5 if connection.vendor == "sqlite" else 7
    assert bound == [3 * per_row]
    assert ("UNNEST" in statements[0]) == (connection.vendor == "postgresql")
    stored = Message.objects.filter(pk__in=ids).order_by("pk")
    assert [m.content for m in stored] == ["message 0", "message 1", "message 2"]
    assert all(
        m.status == Message.Status.FINISHED and m.cost_usd == 0 and not m.cached for m in stored
    )


def test_only_plain_defaults_are_written_into_a_statement():
    assert sql._literal(None, "sqlite") == "NULL"
    assert sql._literal(0, "postgresql") == "0"
    assert sql._literal(True, "sqlite") == "1"
    assert sql._literal(False, "postgresql") == "FALSE"
    assert sql._literal("[]", "sqlite") == "'[]'"
    assert sql._literal(Message.Status.PENDING, "postgresql") == "'pending'"
    # Anything that would need escaping, and what is not plainly typed, stays bound.
    for value in ("it's", "50%", "back\\slash", "ünï", "two\nlines", 1.5, Decimal("0")):
        assert sql._literal(value, "sqlite") is None


def test_the_statements_keep_one_cursor_yet_are_logged_when_queries_are(conversation, monkeypatch):
    from django.test.utils import CaptureQueriesContext

    made: list[int] = []
    create = connection.create_cursor

    def counted(name: Any = None) -> Any:
        made.append(1)
        return create(name)

    monkeypatch.setattr(connection, "create_cursor", counted)
    insert = sql.Insert(Message)
    ids = [
        insert.run(conversation_id=conversation.pk, role="user", content=f"kept {n}")
        for n in range(4)
    ]
    assert len(set(ids)) == 4
    assert len(made) <= 1  # one cursor for them all (none if an earlier test made it)
    with CaptureQueriesContext(connection) as captured:
        insert.run(conversation_id=conversation.pk, role="user", content="logged")
    assert [q["sql"].split()[0] for q in captured.captured_queries] == ["INSERT"]
    assert Message.objects.filter(content__in=["kept 3", "logged"]).count() == 2
