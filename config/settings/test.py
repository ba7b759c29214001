"""The test suite: embedded by default, scaled when the env says so.

`make test` runs the suite twice: once as is (SQLite, in-process layer, file
broker) and once with `DATABASE_URL`, `REDIS_URL` and `CELERY_BROKER_URL`
pointing at PostgreSQL and Redis.
"""

import os
import tempfile

# Each run gets its own data dir unless the caller chose one.
os.environ.setdefault("CHAT_DATA_DIR", tempfile.mkdtemp(prefix="chat-test-"))

from .base import *  # noqa: F403
from .base import DATA_DIR, DATABASES, env

SECRET_KEY = "test-secret-key-not-for-production"  # noqa: S105 - test only
DEBUG = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
if DATABASES["default"]["ENGINE"] in ("config.sqlite_db", "django.db.backends.sqlite3"):
    # A real file, so the suite exercises WAL and IMMEDIATE like production.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}

# Tests run against the real demo model, fast unless a test slows it down.
CHAT_DEMO_TTFT_MS = env.int("CHAT_DEMO_TTFT_MS", default=0)
CHAT_DEMO_TPS = env.float("CHAT_DEMO_TPS", default=0.0)
CHAT_DEMO_REPLY_TOKENS = env.int("CHAT_DEMO_REPLY_TOKENS", default=12)
# The test process starts servers and browsers, which would inherit a pinned
# CPU (config/cpu_pin.py); the servers it starts pin themselves.
CHAT_WEB_CPU = env.str("CHAT_WEB_CPU", default="off")
# Serve static files straight from static/ without collectstatic.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = True
(DATA_DIR / "staticfiles").mkdir(exist_ok=True)
