"""Fixtures the feedback tests share."""

from __future__ import annotations

import pytest
from django.test import Client


@pytest.fixture
def staff_client(make_user) -> Client:
    """A signed-in staff member's browser."""
    client = Client()
    client.force_login(make_user("staffer", staff=True))
    return client
