"""Content-Security-Policy and the production security headers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parents[2]


def directives(header: str) -> dict[str, list[str]]:
    parsed = {}
    for part in header.split(";"):
        name, *values = part.split()
        parsed[name] = values
    return parsed


def test_chat_page_has_a_strict_policy():
    response = Client().get("/")
    assert response.status_code == 200
    csp = directives(response["Content-Security-Policy"])
    assert csp["default-src"] == ["'self'"]
    assert csp["script-src"] == ["'self'"]
    assert csp["object-src"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["base-uri"] == ["'self'"] and csp["form-action"] == ["'self'"]
    assert csp["img-src"] == ["'self'", "data:"]
    assert csp["connect-src"] == ["'self'", "ws://testserver"]
    assert "unsafe-inline" not in response["Content-Security-Policy"]
    assert "unsafe-eval" not in response["Content-Security-Policy"]


def test_https_page_connects_only_over_wss_to_its_own_host():
    response = Client().get("/", secure=True, HTTP_HOST="localhost")
    csp = directives(response["Content-Security-Policy"])
    assert csp["connect-src"] == ["'self'", "wss://localhost"]


def test_operator_allowed_image_hosts(settings):
    settings.CONTENT_SECURITY_POLICY = {
        "DIRECTIVES": {
            **settings.CONTENT_SECURITY_POLICY["DIRECTIVES"],
            "img-src": ["'self'", "data:", "https://images.example.com"],
        }
    }
    csp = directives(Client().get("/")["Content-Security-Policy"])
    assert csp["img-src"] == ["'self'", "data:", "https://images.example.com"]


@pytest.mark.parametrize(
    "path",
    [
        "/admin/",
        "/admin/chat/message/",
        "/admin/chat/abuseblock/",
        "/admin/chat/abuseblock/add/",
        "/admin/auth/user/",
    ],
)
def test_admin_works_under_the_policy(make_user, path):
    """The admin has no inline script in Django 5.2: its pages load and are covered."""
    client = Client()
    client.force_login(make_user("staff", staff=True))
    response = client.get(path)
    assert response.status_code == 200
    assert "script-src 'self'" in response["Content-Security-Policy"]
    html = response.content.decode()
    # Every <script> loads a file (or is inert JSON data), none runs inline code.
    for chunk in html.split("<script")[1:]:
        tag = chunk.split(">", 1)[0]
        assert "src=" in tag or 'type="application/json"' in tag, tag
    assert " onclick=" not in html and " onload=" not in html


def test_login_and_signup_pages_are_covered():
    for path in ("/accounts/login/", "/accounts/signup/", "/accounts/password_reset/"):
        response = Client().get(path)
        assert response.status_code == 200
        assert "frame-ancestors 'none'" in response["Content-Security-Policy"]


def test_production_settings_turn_on_the_security_middleware_settings():
    code = (
        "import json, django; from django.conf import settings; django.setup();"
        "print(json.dumps({k: getattr(settings, k) for k in ("
        "'SECURE_SSL_REDIRECT','SECURE_HSTS_SECONDS','SESSION_COOKIE_SECURE',"
        "'CSRF_COOKIE_SECURE','SECURE_CONTENT_TYPE_NOSNIFF','X_FRAME_OPTIONS',"
        "'SECURE_REFERRER_POLICY','SECURE_PROXY_SSL_HEADER')} | "
        "{'csp': settings.CONTENT_SECURITY_POLICY, 'mw': settings.MIDDLEWARE}))"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "DJANGO_SECRET_KEY": "x" * 64,
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    prod = json.loads(out.stdout.strip().splitlines()[-1])
    assert prod["SECURE_SSL_REDIRECT"] is True and prod["SECURE_HSTS_SECONDS"] >= 31536000
    assert prod["SESSION_COOKIE_SECURE"] and prod["CSRF_COOKIE_SECURE"]
    assert prod["SECURE_CONTENT_TYPE_NOSNIFF"] and prod["X_FRAME_OPTIONS"] == "DENY"
    assert prod["csp"]["DIRECTIVES"]["upgrade-insecure-requests"] is True
    assert prod["csp"]["DIRECTIVES"]["frame-ancestors"] == ["'none'"]
    assert "chat.safety.headers.ContentSecurityPolicyMiddleware" in prod["mw"]
