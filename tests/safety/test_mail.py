"""Password-reset mail: production sends it by SMTP, never to the logs; deploy checks say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

REPO = Path(__file__).resolve().parents[2]
SMTP = "django.core.mail.backends.smtp.EmailBackend"
CONSOLE = "django.core.mail.backends.console.EmailBackend"
MAIL_ENV = {
    "EMAIL_HOST": "smtp.example.com",
    "EMAIL_PORT": "2525",
    "EMAIL_HOST_USER": "mailer",
    "EMAIL_HOST_PASSWORD": "mail-secret",
    "EMAIL_USE_TLS": "true",
    "DEFAULT_FROM_EMAIL": "Chat <no-reply@chat.example.com>",
}


def run_production(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run Python code in a fresh process with the production settings, embedded services."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST", "EMAIL_", "DJANGO_"))
        and k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "DEFAULT_FROM_EMAIL")
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={
            **base,
            "DJANGO_SETTINGS_MODULE": "config.settings.production",
            "DJANGO_SECRET_KEY": "x" * 64,
            "CHAT_DATA_DIR": str(tmp_path),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_production_sends_mail_by_smtp_as_the_environment_says(tmp_path):
    code = (
        "import json, django; from django.conf import settings; django.setup();"
        "print(json.dumps({k: getattr(settings, k) for k in ("
        "'EMAIL_BACKEND','EMAIL_HOST','EMAIL_PORT','EMAIL_HOST_USER','EMAIL_HOST_PASSWORD',"
        "'EMAIL_USE_TLS','EMAIL_USE_SSL','DEFAULT_FROM_EMAIL','SERVER_EMAIL')}))"
    )
    out = run_production(code, tmp_path, **MAIL_ENV)
    assert out.returncode == 0, out.stderr
    prod = json.loads(out.stdout.strip().splitlines()[-1])
    assert prod == {
        "EMAIL_BACKEND": SMTP,
        "EMAIL_HOST": "smtp.example.com",
        "EMAIL_PORT": 2525,
        "EMAIL_HOST_USER": "mailer",
        "EMAIL_HOST_PASSWORD": "mail-secret",
        "EMAIL_USE_TLS": True,
        "EMAIL_USE_SSL": False,
        "DEFAULT_FROM_EMAIL": "Chat <no-reply@chat.example.com>",
        "SERVER_EMAIL": "Chat <no-reply@chat.example.com>",
    }
    # Without a mail server production still never falls back to the console.
    bare = run_production(code, tmp_path)
    assert json.loads(bare.stdout.strip().splitlines()[-1])["EMAIL_BACKEND"] == SMTP


def test_deploy_check_fails_while_production_has_no_mail_server(tmp_path):
    code = "import django; django.setup(); from django.core.management import call_command;"
    code += "call_command('check', '--deploy')"
    bare = run_production(code, tmp_path)
    assert bare.returncode != 0
    assert "chat.E001" in bare.stderr and "EMAIL_HOST" in bare.stderr
    assert "chat.W002" in bare.stderr  # mail from webmaster@localhost

    configured = run_production(code, tmp_path, **MAIL_ENV)
    assert configured.returncode == 0, configured.stderr
    assert "chat.E001" not in configured.stderr + configured.stdout
    assert "chat.W002" not in configured.stderr + configured.stdout


@pytest.mark.parametrize("backend", [CONSOLE, "django.core.mail.backends.filebased.EmailBackend"])
def test_deploy_check_refuses_mail_printed_or_filed_where_log_readers_see_it(settings, backend):
    settings.EMAIL_BACKEND = backend
    settings.EMAIL_HOST = "smtp.example.com"
    with pytest.raises(SystemCheckError, match=r"chat\.E001"):
        call_command("check", "--deploy", "--fail-level", "ERROR")


def test_embedded_mode_prints_mail_to_its_terminal_not_to_the_logs(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST", "EMAIL_", "DJANGO_"))
        and k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")
    }
    code = (
        "import django, logging; django.setup(); from django.conf import settings;"
        "print(settings.EMAIL_BACKEND);"
        "seen = [];"
        "logging.getLogger().addHandler(type('H', (logging.Handler,), {'emit': "
        "lambda self, r: seen.append(r.getMessage())})());"
        "from django.core.mail import send_mail;"
        "send_mail('Reset', 'https://chat.example.com/reset/abc/', None, ['a@example.com']);"
        "print('logged:', [m for m in seen if 'reset/abc' in m])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={
            **env,
            "DJANGO_SETTINGS_MODULE": "config.settings.embedded",
            "CHAT_DATA_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == CONSOLE
    assert "https://chat.example.com/reset/abc/" in out.stdout  # on the terminal of `make run`
    assert "logged: []" in out.stdout  # and not through logging, so not in shipped logs


def test_password_reset_in_production_goes_to_the_configured_mail_backend(tmp_path):
    code = """
import json, django
django.setup()
from django.contrib.auth import get_user_model
from django.core import mail
from django.core.management import call_command
from django.test import Client
call_command("migrate", verbosity=0)
get_user_model().objects.create_user("anna", "anna@example.com", "an-old-pass-phrase-42")
response = Client().post(
    "/accounts/password_reset/", {"email": "anna@example.com"}, secure=True,
    HTTP_HOST="chat.example.com",
)
sent = [
    {"to": m.to, "from": m.from_email, "link": "https://chat.example.com/accounts/reset/" in m.body}
    for m in mail.outbox
]
print(json.dumps({"status": response.status_code, "sent": sent}))
"""
    out = run_production(
        code,
        tmp_path,
        **MAIL_ENV,
        DJANGO_EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
        DJANGO_ALLOWED_HOSTS="chat.example.com",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == 302
    assert result["sent"] == [
        {"to": ["anna@example.com"], "from": "Chat <no-reply@chat.example.com>", "link": True}
    ]
    assert "/accounts/reset/" not in out.stdout + out.stderr  # nothing printed to the logs
