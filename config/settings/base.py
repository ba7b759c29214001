"""Settings shared by every run mode; everything comes from the environment.

Each run mode (embedded, production, test) is a module that imports this one.
`DATABASE_URL`, `REDIS_URL` and `CELERY_BROKER_URL` switch the backing services
from the embedded defaults to the scaled ones; unset means embedded.
"""

from __future__ import annotations

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

# Where the embedded mode keeps its SQLite files, broker queue and beat schedule.
DATA_DIR = Path(env.str("CHAT_DATA_DIR", default=str(BASE_DIR / "var")))
DATA_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="dev-insecure-key-for-the-embedded-mode-only")
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "django_ratelimit",
    "chat",
    "feedback",
    "monitoring",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------
if env.str("DATABASE_URL", default=""):
    DATABASES = {"default": env.db("DATABASE_URL")}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # Under ASGI every ORM call runs on one thread per process
        # (thread-sensitive sync_to_async), and Celery workers are separate
        # processes: a small psycopg pool per process beats persistent
        # per-thread connections (CONN_MAX_AGE), which leak with thread churn.
        # See docs/decisions/0003-database-connections.md.
        DATABASES["default"]["CONN_MAX_AGE"] = 0
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": env.int("DB_POOL_MIN", default=1),
            "max_size": env.int("DB_POOL_MAX", default=8),
            "timeout": env.float("DB_POOL_TIMEOUT", default=10.0),
        }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "db.sqlite3",
            # WAL lets readers run beside the one writer; IMMEDIATE takes the
            # write lock at BEGIN so two writers queue on the busy timeout
            # instead of failing with "database is locked" on lock upgrade.
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": (
                    "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL;PRAGMA busy_timeout=20000;"
                ),
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, channel layer, stream buffers ------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "chat",
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": "chat:layer"},
        }
    }
else:
    CACHES = {
        "default": {
            # Shared by the server and the Celery processes, with atomic incr,
            # so rate limits hold across them (django-ratelimit refuses
            # per-process caches).
            "BACKEND": "config.sqlite_cache.SQLiteCache",
            "LOCATION": str(DATA_DIR / "cache.sqlite3"),
        }
    }
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# django-ratelimit knows Django's built-in Redis cache works; our SQLite cache
# is atomic too (see config/sqlite_cache.py), so its check is satisfied here.
SILENCED_SYSTEM_CHECKS = ["django_ratelimit.W001"]

# --- Celery -------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="") or (
    REDIS_URL if REDIS_URL else "filesystem://"
)
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue_dir = DATA_DIR / "broker"
    (_queue_dir / "processed").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "processed_folder": str(_queue_dir / "processed"),
        "store_processed": False,
    }
elif CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # Redelivery of a task whose worker died waits this long (default 1 h).
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 600}
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
CELERY_TASK_ALWAYS_EAGER = False

# --- Auth -----------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:index"
LOGOUT_REDIRECT_URL = "chat:index"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# --- The chat product ---------------------------------------------------------
CHAT_MODEL = env.str("CHAT_MODEL", default="demo:demo")
CHAT_FALLBACK_MODELS = env.list("CHAT_FALLBACK_MODELS", default=[])
CHAT_DEMO_TTFT_MS = env.int("CHAT_DEMO_TTFT_MS", default=300)
CHAT_DEMO_TPS = env.float("CHAT_DEMO_TPS", default=30.0)
CHAT_DEMO_REPLY_TOKENS = env.int("CHAT_DEMO_REPLY_TOKENS", default=120)
CHAT_ALLOW_ANONYMOUS = env.bool("CHAT_ALLOW_ANONYMOUS", default=True)
CHAT_RATELIMIT_USER = env.str("CHAT_RATELIMIT_USER", default="20/m")
CHAT_RATELIMIT_ANON = env.str("CHAT_RATELIMIT_ANON", default="10/m")
CHAT_MAX_INPUT_CHARS = env.int("CHAT_MAX_INPUT_CHARS", default=8000)
# A WebSocket frame larger than this gets `invalid_input`; the ASGI server's
# own hard limit (uvicorn --ws-max-size) is set well above it.
CHAT_MAX_FRAME_BYTES = env.int("CHAT_MAX_FRAME_BYTES", default=64 * 1024)
CHAT_DAILY_BUDGET_USD = env.str("CHAT_DAILY_BUDGET_USD", default="")
# The history sent to the model is trimmed, oldest first, to this many tokens.
CHAT_CONTEXT_TOKENS = env.int("CHAT_CONTEXT_TOKENS", default=4000)
CHAT_SYSTEM_PROMPT = env.str(
    "CHAT_SYSTEM_PROMPT", default="You are a helpful assistant. Answer clearly and concisely."
)
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "uvicorn.access": {"level": "WARNING"},
    },
}

# Tokens arriving within this many ms of the last frame join the next frame
# (docs/decisions/0002-delta-coalescing.md).
CHAT_COALESCE_MS = env.int("CHAT_COALESCE_MS", default=25)
CHAT_COALESCE_MAX_CHARS = env.int("CHAT_COALESCE_MAX_CHARS", default=4096)
# Prompt-injection heuristics score every user message (stored, counted,
# shown to staff); messages scoring at least this are refused. Empty = never.
CHAT_BLOCK_INJECTION_SCORE = env.float("CHAT_BLOCK_INJECTION_SCORE", default=None)

# Resumable streams (docs/decisions/0005-resumable-streams.md).
CHAT_REPLAY_TTL_SECONDS = env.int("CHAT_REPLAY_TTL_SECONDS", default=600)
CHAT_REPLAY_FLUSH_MS = env.int("CHAT_REPLAY_FLUSH_MS", default=50)
# No reply may run longer than this; also bounds how long its stream is kept.
CHAT_REPLY_MAX_SECONDS = env.int("CHAT_REPLY_MAX_SECONDS", default=600)
# A dropped socket does not stop the reply (it is saved and can be resumed)
# unless this is set; Stop always does.
CHAT_CANCEL_ON_DISCONNECT = env.bool("CHAT_CANCEL_ON_DISCONNECT", default=False)

# Exact-match response cache (chat/response_cache.py); staff can also switch
# it off at runtime from the admin.
CHAT_RESPONSE_CACHE = env.bool("CHAT_RESPONSE_CACHE", default=True)
CHAT_RESPONSE_CACHE_TTL_SECONDS = env.int("CHAT_RESPONSE_CACHE_TTL_SECONDS", default=24 * 3600)
# Cached replies stream in chunks of this many characters.
CHAT_RESPONSE_CACHE_CHUNK_CHARS = env.int("CHAT_RESPONSE_CACHE_CHUNK_CHARS", default=64)
