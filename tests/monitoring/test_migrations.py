"""Rolling back a release: every migration of ours can be undone (README, "Rolling back")."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader

APPS = ("chat", "feedback", "monitoring")


def test_every_operation_of_every_migration_has_a_way_back() -> None:
    graph = MigrationLoader(None, ignore_no_migrations=True).graph
    migrations = [graph.nodes[key] for key in sorted(graph.nodes) if key[0] in APPS]
    assert {m.app_label for m in migrations} == set(APPS)
    irreversible = [
        f"{m.app_label}.{m.name}: {op.describe()}"
        for m in migrations
        for op in m.operations
        if not op.reversible
    ]
    assert irreversible == []


@pytest.mark.django_db(transaction=True)
def test_each_apps_latest_migration_is_undone_and_redone() -> None:
    executor = MigrationExecutor(connection)
    leaves = [key for key in executor.loader.graph.leaf_nodes() if key[0] in APPS]
    targets = []
    for app, name in leaves:
        parents = [
            p for p in executor.loader.graph.node_map[(app, name)].parents if p.key[0] == app
        ]
        targets.append((app, parents[0].key[1] if parents else None))
    try:
        executor.migrate(targets)
        executor.loader.build_graph()
        applied = executor.loader.applied_migrations
        assert not any(leaf in applied for leaf in leaves)
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(leaves)
    executor.loader.build_graph()
    assert all(leaf in executor.loader.applied_migrations for leaf in leaves)
