"""What the web process does once at start-up, so that its first messages do not.

Each case runs in a child process, which imports the ASGI application as a
server does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# After start-up: the first reply's provider and the first title task
# enqueued; which modules did they import?
_CHILD = """
import json, sys
import config.asgi
from django.conf import settings
from chat import tasks
from chat.providers import provider_for
before = set(sys.modules)
provider_for(settings.CHAT_MODEL)
tasks.conversation_titles.delay([])
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.mark.parametrize("model", ["demo:demo", "openai:gpt-4o-mini"])
def test_a_first_message_imports_nothing_the_start_up_could(tmp_path, model):
    # An import on the event loop stalls every open stream (the demo's took
    # ~4 ms in the middle of a burst of 1,000 messages; a vendor SDK far
    # longer), and one in the enqueue thread holds the GIL as long.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "DJANGO_", "PYTEST"))}
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings.embedded",
        CHAT_DATA_DIR=str(tmp_path),
        CHAT_MODEL=model,
        CHAT_WEB_CPU="off",
        DATABASE_URL="",
        REDIS_URL="",
        CELERY_BROKER_URL="",
        SENTRY_DSN="",
    )
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def run_embedded(tmp_path, args: list[str], **env_vars: str) -> subprocess.CompletedProcess[str]:
    """Run `python ARGS` in a child process with the embedded settings and these variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "DJANGO_", "PYTEST"))}
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings.embedded", CHAT_DATA_DIR=str(tmp_path), **env_vars
    )
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def settings_of(tmp_path, names: str, **env_vars: str) -> list[object]:
    """Return the values of these settings (comma-separated names) as a child process reads them."""
    code = (
        "import django, json; django.setup(); from django.conf import settings; "
        f"print(json.dumps([getattr(settings, n) for n in {names.split(',')!r}]))"
    )
    done = run_embedded(tmp_path, ["-c", code], **env_vars)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    ("redis_url", "named", "reported"),
    [
        ("", "", "embedded"),
        ("redis://127.0.0.1:6379/0", "", "scaled"),
        ("redis://127.0.0.1:6379/0", "staging", "staging"),
    ],
)
def test_sentry_and_the_health_page_name_the_run_mode_unless_told(
    tmp_path, redis_url, named, reported
):
    values = settings_of(
        tmp_path, "MONITORING_ENVIRONMENT", REDIS_URL=redis_url, SENTRY_ENVIRONMENT=named
    )
    assert values == [reported]


def test_a_retention_mode_nobody_knows_stops_the_start(tmp_path):
    """A typo must not quietly delete the conversations `anonymise` was meant to keep."""
    done = run_embedded(tmp_path, ["manage.py", "check"], MONITORING_RETENTION_MODE="anonymize")
    assert done.returncode != 0
    assert "MONITORING_RETENTION_MODE must be 'delete' or 'anonymise', not 'anonymize'" in (
        done.stderr
    )


def test_list_settings_read_items_as_written_with_spaces_after_commas(tmp_path):
    """`CHAT_FALLBACK_MODELS=a, b` names model "b", not " b" (which no provider knows)."""
    values = settings_of(
        tmp_path,
        "CHAT_FALLBACK_MODELS,CHAT_IMAGE_HOSTS",
        CHAT_FALLBACK_MODELS="openai:gpt-4o-mini, anthropic:claude-haiku-4-5 ,",
        CHAT_IMAGE_HOSTS=" images.example.com,  cdn.example.com",
    )
    assert values == [
        ["openai:gpt-4o-mini", "anthropic:claude-haiku-4-5"],
        ["images.example.com", "cdn.example.com"],
    ]
