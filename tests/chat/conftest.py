"""Fixtures for the tests that store batches of sends and replies."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import OperationalError, connections

from chat import services


@dataclass
class Commits:
    """The default database's commits since the fixture began; `fail_at` makes some fail."""

    made: list[str] = field(default_factory=list)
    # Which commits, counted from 1, raise "database or disk is full" instead.
    fail_at: set[int] = field(default_factory=set)
    tried: int = 0


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> Commits:
    seen = Commits()
    wrapper = type(connections["default"])
    real = wrapper.commit

    def commit(self: Any) -> None:
        seen.tried += 1
        if seen.tried in seen.fail_at:
            raise OperationalError("database or disk is full")
        seen.made.append(self.alias)
        real(self)

    monkeypatch.setattr(wrapper, "commit", commit)
    return seen


@pytest.fixture
def titles_enqueued() -> Iterator[None]:
    """New conversations' titles are enqueued from a thread: let it finish in the test."""
    yield
    services._enqueuer.submit(lambda: None).result(timeout=10)
