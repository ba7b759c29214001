"""Settings shared by every run mode; everything comes from the environment.

Each run mode (embedded, production, test) is a module that imports this one.
`DATABASE_URL`, `REDIS_URL` and `CELERY_BROKER_URL` switch the backing services
from the embedded defaults to the scaled ones; unset means embedded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import environ

BASE_DIR = Path(__file__).resolve().parent.parent.parent


class _Env(environ.Env):
    """django-environ, with list items stripped: "a, b" is ["a", "b"], not ["a", " b"]."""

    def list(self, var: str, cast: Any = None, default: Any = environ.Env.NOTSET) -> list[Any]:
        items = super().list(var, cast=cast, default=default)
        return [i.strip() if isinstance(i, str) else i for i in items if str(i).strip()]


env = _Env()
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
    "chat.safety.headers.ContentSecurityPolicyMiddleware",
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
            # Django's SQLite backend, converting each statement's
            # placeholders once instead of on every execute.
            "ENGINE": "config.sqlite_db",
            "NAME": DATA_DIR / "db.sqlite3",
            # Keep each thread's connection: under ASGI all ORM calls share
            # one thread, and closing the last connection to a WAL database
            # checkpoints and fsyncs (measured: 8 fsyncs per message).
            "CONN_MAX_AGE": None,
            # WAL lets readers run beside the one writer; IMMEDIATE takes the
            # write lock at BEGIN so two writers queue on the busy timeout
            # instead of failing with "database is locked" on lock upgrade.
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                # The web process checkpoints the WAL from its own thread
                # (config/sqlite_wal.py); commits only do it as a backstop.
                "init_command": (
                    "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL;PRAGMA busy_timeout=20000;"
                    "PRAGMA wal_autocheckpoint=20000;"
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
            "BACKEND": "config.redis_cache.SharedRedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "chat",
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            # Waits out a Redis outage rather than closing every socket.
            "BACKEND": "config.channel_layer.SteadyRedisChannelLayer",
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
# The web process's CPU (config/cpu_pin.py): the embedded mode has one web
# process, which stays on the CPU it starts on; with Redis several may share
# a machine, so it is left to the scheduler unless set.
CHAT_WEB_CPU = env.str("CHAT_WEB_CPU", default="off" if REDIS_URL else "auto")
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
        # kombu's default is ./control, which would land in the working tree.
        "control_folder": str(_queue_dir / "control"),
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
SESSION_ENGINE = "config.sessions"  # database sessions whose keys are checked
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
        "plain": {
            "()": "monitoring.logs.PlainFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
        },
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "filters": {"as_warning": {"()": "monitoring.logs.AsWarning"}},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "uvicorn.access": {"level": "WARNING"},
        "django.security.DisallowedHost": {"filters": ["as_warning"]},
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
# How long a finished reply's deltas stay replayable. Each process holds its
# replies' text this long, so it bounds memory (at 100 replies/s of 2 KB,
# 120 s is ~24 MB); a later resume is answered from the database.
CHAT_REPLAY_TTL_SECONDS = env.int("CHAT_REPLAY_TTL_SECONDS", default=120)
CHAT_REPLAY_FLUSH_MS = env.int("CHAT_REPLAY_FLUSH_MS", default=50)
# Scaled mode: a process with running replies refreshes a key saying it lives
# (every fifth of this), which lapses this long after it dies. A resume on
# another process whose stream is quiet for half this long checks the key, and
# fails the reply at once when its writer is gone. Longer tolerates longer
# event-loop stalls (seconds in a 1,000-send burst); shorter ends a dead
# writer's replies sooner.
CHAT_WRITER_ALIVE_S = env.float("CHAT_WRITER_ALIVE_S", default=5.0)
# No reply may run longer than this; also bounds how long its stream is kept.
CHAT_REPLY_MAX_SECONDS = env.int("CHAT_REPLY_MAX_SECONDS", default=600)
# Embedded mode: how often a running reply's text is copied to the shared
# cache, where the reaper finds it if this process dies.
CHAT_PARTIAL_CHECKPOINT_S = env.float("CHAT_PARTIAL_CHECKPOINT_S", default=2.0)
# A dropped socket does not stop the reply (it is saved and can be resumed)
# unless this is set; Stop always does.
CHAT_CANCEL_ON_DISCONNECT = env.bool("CHAT_CANCEL_ON_DISCONNECT", default=False)

# --- Model vendors and the call path (chat/callpath.py, docs/vendors.md) -------
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
# Any OpenAI-compatible server: vLLM, Ollama's /v1, llama.cpp, LM Studio.
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default="") or None
ANTHROPIC_API_KEY = env.str("ANTHROPIC_API_KEY", default="")
ANTHROPIC_BASE_URL = env.str("ANTHROPIC_BASE_URL", default="") or None
# Deadlines per attempt, in seconds: opening the connection, the first token,
# the gap between two tokens, the whole reply. CHAT_TIMEOUTS overrides them per
# model, e.g. {"openai:o3": {"first_token": 120, "total": 600}}.
CHAT_TIMEOUT_CONNECT_S = env.float("CHAT_TIMEOUT_CONNECT_S", default=5.0)
CHAT_TIMEOUT_FIRST_TOKEN_S = env.float("CHAT_TIMEOUT_FIRST_TOKEN_S", default=30.0)
CHAT_TIMEOUT_IDLE_S = env.float("CHAT_TIMEOUT_IDLE_S", default=30.0)
CHAT_TIMEOUT_TOTAL_S = env.float("CHAT_TIMEOUT_TOTAL_S", default=300.0)
CHAT_TIMEOUTS = env.json("CHAT_TIMEOUTS", default={})
# Retries happen only before the first token reaches the user.
CHAT_RETRY_MAX_ATTEMPTS = env.int("CHAT_RETRY_MAX_ATTEMPTS", default=3)
CHAT_RETRY_BASE_S = env.float("CHAT_RETRY_BASE_S", default=0.5)
CHAT_RETRY_MAX_BACKOFF_S = env.float("CHAT_RETRY_MAX_BACKOFF_S", default=8.0)
# A Retry-After longer than this sends the request to the fallbacks instead.
CHAT_RETRY_AFTER_MAX_S = env.float("CHAT_RETRY_AFTER_MAX_S", default=10.0)
CHAT_RETRY_TOTAL_WAIT_S = env.float("CHAT_RETRY_TOTAL_WAIT_S", default=15.0)
# Circuit breaker per provider:model, shared through the cache (Redis when scaled).
CHAT_BREAKER_FAILURES = env.int("CHAT_BREAKER_FAILURES", default=5)
CHAT_BREAKER_WINDOW_S = env.int("CHAT_BREAKER_WINDOW_S", default=60)
CHAT_BREAKER_MIN_VOLUME = env.int("CHAT_BREAKER_MIN_VOLUME", default=20)
CHAT_BREAKER_FAILURE_RATE = env.float("CHAT_BREAKER_FAILURE_RATE", default=0.5)
CHAT_BREAKER_COOLDOWN_S = env.float("CHAT_BREAKER_COOLDOWN_S", default=30.0)
CHAT_BREAKER_PROBES = env.int("CHAT_BREAKER_PROBES", default=1)
# Fair queueing per process: in-flight caps per provider:model (0 = none) and
# per user; beyond them a bounded FIFO. CHAT_QUEUE_LIMITS overrides per model.
CHAT_QUEUE_MAX_IN_FLIGHT = env.int("CHAT_QUEUE_MAX_IN_FLIGHT", default=32)
CHAT_QUEUE_MAX_IN_FLIGHT_PER_USER = env.int("CHAT_QUEUE_MAX_IN_FLIGHT_PER_USER", default=2)
CHAT_QUEUE_MAX_WAITING = env.int("CHAT_QUEUE_MAX_WAITING", default=100)
CHAT_QUEUE_MAX_WAITING_PER_USER = env.int("CHAT_QUEUE_MAX_WAITING_PER_USER", default=2)
CHAT_QUEUE_RETRY_AFTER_S = env.float("CHAT_QUEUE_RETRY_AFTER_S", default=10.0)
CHAT_QUEUE_LIMITS = env.json("CHAT_QUEUE_LIMITS", default={"demo:demo": {"max_in_flight": 0}})

# --- Feedback, review desk, versions (feedback/) ------------------------------
# Reason chips offered per direction; slugs are stored, so only ever append.
FEEDBACK_REASONS_UP = env.list(
    "FEEDBACK_REASONS_UP", default=["accurate", "helpful", "well_written", "fast", "other"]
)
FEEDBACK_REASONS_DOWN = env.list(
    "FEEDBACK_REASONS_DOWN",
    default=["inaccurate", "unhelpful", "unsafe", "too_slow", "badly_formatted", "other"],
)
FEEDBACK_MAX_COMMENT_CHARS = env.int("FEEDBACK_MAX_COMMENT_CHARS", default=1000)
FEEDBACK_RATELIMIT = env.str("FEEDBACK_RATELIMIT", default="60/m")
# Exports of at most this many rows stream from the request; larger ones run
# as a Celery job with progress and a download link.
FEEDBACK_EXPORT_STREAM_MAX = env.int("FEEDBACK_EXPORT_STREAM_MAX", default=2000)
FEEDBACK_EXPORT_DIR = Path(env.str("FEEDBACK_EXPORT_DIR", default=str(DATA_DIR / "exports")))
# At most this many messages before a rated reply go into its export context.
FEEDBACK_EXPORT_CONTEXT_MESSAGES = env.int("FEEDBACK_EXPORT_CONTEXT_MESSAGES", default=100)
# A running export job silent this long has lost its worker and is taken over
# by the next delivery; a live worker stamps its job every fifth of this.
FEEDBACK_EXPORT_STALE_SECONDS = env.int("FEEDBACK_EXPORT_STALE_SECONDS", default=300)
FEEDBACK_ROLLUP_SECONDS = env.int("FEEDBACK_ROLLUP_SECONDS", default=60)
CELERY_BEAT_SCHEDULE = {
    **globals().get("CELERY_BEAT_SCHEDULE", {}),
    "feedback-rollup-refresh": {
        "task": "feedback.rollup_refresh",
        "schedule": float(FEEDBACK_ROLLUP_SECONDS),
    },
    # Catches what the incremental pass cannot see (deleted conversations).
    "feedback-rollup-rebuild": {"task": "feedback.rollup_rebuild", "schedule": 24 * 3600.0},
}

# Exact-match response cache (chat/response_cache.py); staff can also switch
# it off at runtime from the admin.
CHAT_RESPONSE_CACHE = env.bool("CHAT_RESPONSE_CACHE", default=True)
CHAT_RESPONSE_CACHE_TTL_SECONDS = env.int("CHAT_RESPONSE_CACHE_TTL_SECONDS", default=24 * 3600)
# Cached replies stream in chunks of this many characters.
CHAT_RESPONSE_CACHE_CHUNK_CHARS = env.int("CHAT_RESPONSE_CACHE_CHUNK_CHARS", default=64)
# Semantic cache (chat/semantic_cache.py, docs/semantic-cache.md): off by
# default. On a miss of the exact cache, an earlier answer in the same context
# whose question embeds within CHAT_SEMANTIC_CACHE_THRESHOLD (cosine) of this
# one is served instead. Needs requirements-semantic.lock; the staff switch
# of the exact cache turns it off too.
CHAT_SEMANTIC_CACHE = env.bool("CHAT_SEMANTIC_CACHE", default=False)
CHAT_SEMANTIC_CACHE_THRESHOLD = env.float("CHAT_SEMANTIC_CACHE_THRESHOLD", default=0.95)
# A sentence-transformers model directory; empty = the bundled all-MiniLM-L6-v2.
CHAT_SEMANTIC_CACHE_MODEL = env.str("CHAT_SEMANTIC_CACHE_MODEL", default="")
# The longest a question waits for its lookup before the model answers it.
CHAT_SEMANTIC_CACHE_WAIT_MS = env.int("CHAT_SEMANTIC_CACHE_WAIT_MS", default=50)
# Answers kept per model version and context (the newest stay).
CHAT_SEMANTIC_CACHE_ENTRIES = env.int("CHAT_SEMANTIC_CACHE_ENTRIES", default=500)

# --- Monitoring (monitoring/): metrics, health, Sentry, logs, rollups, jobs ----
# Health checks run at once, each given this long; the whole check is bounded by it.
HEALTH_CHECK_TIMEOUT_S = env.float("HEALTH_CHECK_TIMEOUT_S", default=2.0)
HEALTH_HEARTBEAT_MAX_AGE_S = env.int("HEALTH_HEARTBEAT_MAX_AGE_S", default=180)
HEALTH_MIN_FREE_DISK_MB = env.int("HEALTH_MIN_FREE_DISK_MB", default=500)
HEALTH_DATABASE_ALIAS = "default"
HEALTH_CACHE_ALIAS = "default"
HEALTH_CHANNEL_LAYER_ALIAS = "default"
MONITORING_HEALTH_REFRESH_S = env.int("MONITORING_HEALTH_REFRESH_S", default=15)
MONITORING_RELEASE = env.str("SENTRY_RELEASE", default="") or env.str("APP_VERSION", default="")
# The run mode unless named: a scaled deployment must not report itself as "embedded".
MONITORING_ENVIRONMENT = env.str("SENTRY_ENVIRONMENT", default="") or (
    "scaled" if REDIS_URL else "embedded"
)
# A reply still pending this long after it started has lost its process:
# longer than the longest reply the pipeline allows, plus queueing slack.
MONITORING_REAP_AFTER_S = env.int(
    "MONITORING_REAP_AFTER_S", default=globals().get("CHAT_REPLY_MAX_SECONDS", 600) + 120
)
MONITORING_DAILY_SPEND_ALERT_USD = env.float("MONITORING_DAILY_SPEND_ALERT_USD", default=None)
MONITORING_DRIFT_ALPHA = env.float("MONITORING_DRIFT_ALPHA", default=0.001)
MONITORING_DRIFT_MIN_RECENT = env.int("MONITORING_DRIFT_MIN_RECENT", default=200)
MONITORING_DRIFT_MIN_BASELINE = env.int("MONITORING_DRIFT_MIN_BASELINE", default=500)
# Conversations idle this many days are deleted or anonymised (0 = kept forever).
MONITORING_RETENTION_DAYS = env.int("MONITORING_RETENTION_DAYS", default=0)
MONITORING_RETENTION_MODE = env.str("MONITORING_RETENTION_MODE", default="delete")
if MONITORING_RETENTION_MODE not in ("delete", "anonymise"):
    # A typo ("anonymize") must not quietly delete what was meant to be kept.
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        f"MONITORING_RETENTION_MODE must be 'delete' or 'anonymise', "
        f"not {MONITORING_RETENTION_MODE!r}."
    )
CELERY_BEAT_SCHEDULE = {
    **globals().get("CELERY_BEAT_SCHEDULE", {}),
    "monitoring-heartbeat": {"task": "monitoring.tasks.heartbeat", "schedule": 30.0},
    "monitoring-rollups": {"task": "monitoring.tasks.rollups_refresh", "schedule": 60.0},
    "monitoring-reaper": {"task": "monitoring.tasks.replies_reap", "schedule": 60.0},
    "monitoring-spend": {"task": "monitoring.tasks.spend_check", "schedule": 600.0},
    "monitoring-drift": {"task": "monitoring.tasks.drift_check", "schedule": 3600.0},
    "monitoring-retention": {"task": "monitoring.tasks.conversations_expire", "schedule": 86400.0},
}
# A down Redis or PostgreSQL must fail a request (and /health/ready) in
# seconds, not hang it on the OS's TCP timeouts.
if REDIS_URL:
    CACHES["default"].setdefault("OPTIONS", {})
    CACHES["default"]["OPTIONS"].setdefault("socket_connect_timeout", 2)
    CACHES["default"]["OPTIONS"].setdefault("socket_timeout", 5)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 3)
MIDDLEWARE = ["monitoring.logs.request_id_middleware", *MIDDLEWARE]
# LOG_FORMAT=json writes one JSON object a line; every record is redacted, in
# either format, as rendered (tracebacks too). The Celery worker and beat use
# this configuration as well (config/celery.py).
LOG_FORMAT = env.str("LOG_FORMAT", default="plain")
LOGGING["formatters"]["json"] = {"()": "monitoring.logs.JsonFormatter"}  # type: ignore[index]
LOGGING["filters"]["redact"] = {"()": "monitoring.logs.RedactFilter"}  # type: ignore[index]
LOGGING["handlers"]["console"]["formatter"] = "json" if LOG_FORMAT == "json" else "plain"  # type: ignore[index]
LOGGING["handlers"]["console"]["filters"] = ["redact"]  # type: ignore[index]
SENTRY_DSN = env.str("SENTRY_DSN", default="")
if SENTRY_DSN:
    from monitoring.sentry import init_sentry

    init_sentry(
        dsn=SENTRY_DSN,
        environment=MONITORING_ENVIRONMENT,
        release=MONITORING_RELEASE,
        traces_sample_rate=env.float("SENTRY_TRACES_SAMPLE_RATE", default=0.0),
    )

# --- Safety: limits, blocks, moderation, headers (chat/safety/) ----------------
# Rate-limit counters, budgets and violation counts. With Redis this cache
# answers a Redis outage like a miss, so limits fail open to a per-process
# fallback instead of failing every request
# (docs/decisions/0004-ratelimit-when-redis-is-down.md).
if REDIS_URL:
    CACHES["ratelimit"] = {
        "BACKEND": "chat.safety.cache.FailSoftRedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "chat",
        "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
    }
else:
    CACHES["ratelimit"] = dict(CACHES["default"])
RATELIMIT_USE_CACHE = "ratelimit"
RATELIMIT_FAIL_OPEN = env.bool("CHAT_RATELIMIT_FAIL_OPEN", default=True)
# django-ratelimit's own defaults, spelled out: it reads these on every send
# with getattr(settings, name, default), and reading a setting that does not
# exist costs Django an AttributeError each time (never cached): a limit
# check took 32 us instead of 25 (make bench (c) sends 1,000 at once).
RATELIMIT_ENABLE = True
RATELIMIT_CACHE_PREFIX = "rl:"
RATELIMIT_HASH_ALGORITHM = hashlib.sha256
RATELIMIT_IP_META_KEY = None
RATELIMIT_IPV4_MASK = 32
RATELIMIT_IPV6_MASK = 64
# Sign-in, sign-up and password reset, per IP (sign-in also per username).
CHAT_RATELIMIT_LOGIN = env.str("CHAT_RATELIMIT_LOGIN", default="10/m")
CHAT_RATELIMIT_SIGNUP = env.str("CHAT_RATELIMIT_SIGNUP", default="5/h")
CHAT_RATELIMIT_PASSWORD_RESET = env.str("CHAT_RATELIMIT_PASSWORD_RESET", default="5/h")
# Deleting one's account asks for the password: attempts per account and per IP.
CHAT_RATELIMIT_ACCOUNT_DELETE = env.str("CHAT_RATELIMIT_ACCOUNT_DELETE", default="5/h")
# Daily budget per user (anonymous visitors: per IP), reset at UTC midnight.
# Each send reserves this much before the model is called; the reply's real
# cost replaces the reservation when it ends. Empty budget = none.
CHAT_DAILY_BUDGET_TOKENS = env.int("CHAT_DAILY_BUDGET_TOKENS", default=None)
CHAT_BUDGET_RESERVE_USD = env.str("CHAT_BUDGET_RESERVE_USD", default="0.01")
CHAT_BUDGET_RESERVE_TOKENS = env.int("CHAT_BUDGET_RESERVE_TOKENS", default=2000)
# This many violations (rate-limit hits, blocked inputs) within the window
# block the user (anonymous: the IP) for CHAT_ABUSE_BLOCK_SECONDS.
CHAT_ABUSE_THRESHOLD = env.int("CHAT_ABUSE_THRESHOLD", default=10)
CHAT_ABUSE_WINDOW_SECONDS = env.int("CHAT_ABUSE_WINDOW_SECONDS", default=600)
CHAT_ABUSE_BLOCK_SECONDS = env.int("CHAT_ABUSE_BLOCK_SECONDS", default=900)
# Output moderation holds the reply back until a sentence ends or this many
# tokens / characters are waiting, whichever comes first
# (docs/decisions/0007-moderation-window.md).
CHAT_MODERATION_WINDOW_TOKENS = env.int("CHAT_MODERATION_WINDOW_TOKENS", default=8)
CHAT_MODERATION_WINDOW_CHARS = env.int("CHAT_MODERATION_WINDOW_CHARS", default=120)
# ... or once the oldest held text has waited this long, so a slow stream is
# held back at most this long (plus one token's gap); and a reply's first
# window is this many tokens, so its first words show at once.
CHAT_MODERATION_MAX_HOLD_MS = env.int("CHAT_MODERATION_MAX_HOLD_MS", default=100)
CHAT_MODERATION_FIRST_WINDOW_TOKENS = env.int("CHAT_MODERATION_FIRST_WINDOW_TOKENS", default=1)
# Each window is judged together with the last words of the released text,
# as many as the longest rule match can span (moderation.CONTEXT_WORDS, 18),
# so a phrase split across windows is still seen whole; this caps them in
# characters, so a window's check stays bounded whatever the model writes.
CHAT_MODERATION_CONTEXT_CHARS = env.int("CHAT_MODERATION_CONTEXT_CHARS", default=400)
CHAT_MODERATION_THRESHOLD = env.float("CHAT_MODERATION_THRESHOLD", default=0.5)
# The OpenAI moderation endpoint, in addition to the built-in rules.
CHAT_MODERATION_OPENAI = env.bool("CHAT_MODERATION_OPENAI", default=False)
CHAT_MODERATION_OPENAI_MODEL = env.str(
    "CHAT_MODERATION_OPENAI_MODEL", default="omni-moderation-latest"
)
CHAT_MODERATION_OPENAI_TIMEOUT_S = env.float("CHAT_MODERATION_OPENAI_TIMEOUT_S", default=5.0)
# Hosts the page may load images from besides itself (a Markdown image is an
# exfiltration channel, so none by default).
CHAT_IMAGE_HOSTS = env.list("CHAT_IMAGE_HOSTS", default=[])
# No inline script anywhere (the admin in Django 5.2 has none either);
# connect-src gets the page's own ws:/wss: origin added per request.
CONTENT_SECURITY_POLICY: dict[str, dict[str, object]] = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:", *CHAT_IMAGE_HOSTS],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}
# Password-reset mail goes to the SMTP server in EMAIL_HOST. Without one the
# embedded mode (a local demo) prints each mail to its terminal's stdout, never
# through logging; production always uses SMTP, and `check --deploy` refuses
# it without a server (chat.E001).
EMAIL_HOST = env.str("EMAIL_HOST", default="")
EMAIL_PORT = env.int("EMAIL_PORT", default=587)
EMAIL_HOST_USER = env.str("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env.str("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=True)
EMAIL_USE_SSL = env.bool("EMAIL_USE_SSL", default=False)
# A reset request waits on the mail server; it must not hang a worker.
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="webmaster@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
EMAIL_BACKEND = env.str(
    "DJANGO_EMAIL_BACKEND",
    default="django.core.mail.backends.smtp.EmailBackend"
    if EMAIL_HOST
    else "django.core.mail.backends.console.EmailBackend",
)

# Send the model PII-redacted text ("[EMAIL]", "[PHONE]" …) instead of what the
# user wrote. Off by default: users often share their own details on purpose
# ("write to anna@example.com"), and vendors are bound as data processors;
# turn it on where policy forbids personal data leaving the service.
CHAT_REDACT_VENDOR_TEXT = env.bool("CHAT_REDACT_VENDOR_TEXT", default=False)
