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
