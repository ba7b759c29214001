"""Sign-in, sign-up and password reset are rate-limited (chat/account_urls.py)."""

from __future__ import annotations

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    scopes: list[str] = []
    monkeypatch.setattr("chat.account_urls.metrics.ratelimited", scopes.append)
    return scopes


def test_login_attempts_are_limited_per_ip(make_user, settings, counted):
    settings.CHAT_RATELIMIT_LOGIN = "3/m"
    make_user("alice")
    client = Client()
    for i in range(3):
        response = client.post("/accounts/login/", {"username": f"u{i}", "password": "nope"})
        assert response.status_code == 200  # the form again, with its error
    response = client.post("/accounts/login/", {"username": "alice", "password": "pw-123456!"})
    assert response.status_code == 429
    assert response["Retry-After"] == "60"
    assert b"Too many attempts" in response.content
    assert counted == ["login"]
    # Reading the form is not an attempt.
    assert client.get("/accounts/login/").status_code == 200


def test_login_attempts_are_limited_per_username_across_ips(make_user, settings):
    settings.CHAT_RATELIMIT_LOGIN = "3/m"
    make_user("alice")
    for i in range(3):
        client = Client(REMOTE_ADDR=f"10.0.0.{i + 1}")
        assert (
            client.post("/accounts/login/", {"username": "alice", "password": "x"}).status_code
            == 200
        )
    other_ip = Client(REMOTE_ADDR="10.0.0.99")
    assert (
        other_ip.post(
            "/accounts/login/", {"username": "alice", "password": "pw-123456!"}
        ).status_code
        == 429
    )
    # A different account from that address is not affected.
    make_user("bob")
    assert (
        other_ip.post("/accounts/login/", {"username": "bob", "password": "pw-123456!"}).status_code
        == 302
    )


def test_signups_are_limited_per_ip(settings, counted):
    settings.CHAT_RATELIMIT_SIGNUP = "2/h"
    client = Client()
    for i in range(2):
        response = client.post(
            "/accounts/signup/",
            {"username": f"new{i}", "password1": "a-Good-pw-123", "password2": "a-Good-pw-123"},
        )
        assert response.status_code == 302
        Client().logout()
    response = Client().post(
        "/accounts/signup/",
        {"username": "new9", "password1": "a-Good-pw-123", "password2": "a-Good-pw-123"},
    )
    assert response.status_code == 429 and response["Retry-After"] == "3600"
    assert counted == ["signup"]


def test_password_resets_are_limited(settings, counted, mailoutbox):
    settings.CHAT_RATELIMIT_PASSWORD_RESET = "2/h"
    client = Client()
    assert client.get("/accounts/password_reset/").status_code == 200
    for _ in range(2):
        response = client.post("/accounts/password_reset/", {"email": "a@example.com"})
        assert response.status_code == 302
    response = client.post("/accounts/password_reset/", {"email": "b@example.com"})
    assert response.status_code == 429
    assert counted == ["password_reset"]
