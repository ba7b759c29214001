"""/health/ready and /health/: one entry per dependency, 503 when one is down, bounded."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from django.db import connections
from django.test import Client, override_settings

from monitoring import tasks
from tests.conftest import SCALED
from tests.monitoring.helpers import TOKEN

pytestmark = pytest.mark.django_db(transaction=True)

DEPENDENCIES = {
    "database",
    "cache",
    "channel_layer",
    "broker",
    "worker_heartbeat",
    "migrations",
    "disk",
}


@pytest.fixture(autouse=True)
def _token(settings):
    settings.METRICS_TOKEN = TOKEN
    settings.HEALTH_CHECK_TIMEOUT_S = 1.5


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def ready(**headers: str):
    started = time.perf_counter()
    response = Client().get("/health/ready", **headers)
    return response, time.perf_counter() - started


def detailed():
    return ready(HTTP_AUTHORIZATION=f"Bearer {TOKEN}")


def test_ready_reports_each_dependency_with_status_and_latency():
    tasks.heartbeat.apply()
    response, _ = detailed()
    body = response.json()
    assert response.status_code == 200, body
    assert set(body["checks"]) == DEPENDENCIES
    for name, check in body["checks"].items():
        assert check["status"] == "ok", (name, check)
        assert check["latency_ms"] >= 0
    assert body["status"] == "ok"


def test_anonymous_load_balancer_sees_status_only():
    response, _ = ready()
    assert response.status_code in (200, 503)
    assert set(response.json()) == {"status"}
    wrong, _ = ready(HTTP_AUTHORIZATION="Bearer wrong")
    assert set(wrong.json()) == {"status"}


def test_missing_worker_heartbeat_degrades_but_stays_ready():
    response, _ = detailed()
    body = response.json()
    assert body["checks"]["worker_heartbeat"]["status"] == "fail"
    assert body["status"] == "degraded"
    assert response.status_code == 200


def test_broker_down_is_degraded_not_unready_and_recovers(settings, closed_port):
    # The chat does not need the broker; draining every web process for it would.
    tasks.heartbeat.apply()
    with override_settings(
        CELERY_BROKER_URL=f"redis://127.0.0.1:{closed_port}/0", CELERY_BROKER_TRANSPORT_OPTIONS={}
    ):
        response, elapsed = detailed()
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded" and body["checks"]["broker"]["status"] == "fail"
    assert elapsed < settings.HEALTH_CHECK_TIMEOUT_S + 1.5
    assert detailed()[0].json()["status"] == "ok"


def test_cache_redis_down_turns_ready_503_and_recovers(settings, closed_port):
    tasks.heartbeat.apply()
    settings.CACHES = {
        **settings.CACHES,
        "down": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{closed_port}/0",
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        },
    }
    settings.HEALTH_CACHE_ALIAS = "down"
    response, _ = detailed()
    assert response.status_code == 503
    assert response.json()["checks"]["cache"]["status"] == "fail"
    settings.HEALTH_CACHE_ALIAS = "default"
    assert detailed()[0].status_code == 200


def test_channel_layer_down_turns_ready_503(settings, closed_port):
    tasks.heartbeat.apply()
    settings.CHANNEL_LAYERS = {
        **settings.CHANNEL_LAYERS,
        "down": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{closed_port}/0"]},
        },
    }
    settings.HEALTH_CHANNEL_LAYER_ALIAS = "down"
    response, _ = detailed()
    assert response.status_code == 503
    assert response.json()["checks"]["channel_layer"]["status"] == "fail"
    settings.HEALTH_CHANNEL_LAYER_ALIAS = "default"
    assert detailed()[0].status_code == 200


@pytest.fixture
def database_down(tmp_path, closed_port) -> Iterator[str]:
    """A second database alias whose server is not there."""
    default = connections.settings["default"]
    if connections["default"].vendor == "sqlite":
        down = {**default, "NAME": str(tmp_path / "missing-dir" / "db.sqlite3"), "TEST": {}}
    else:
        down = {**default, "PORT": str(closed_port), "OPTIONS": {"connect_timeout": 1}}
    connections.settings["down"] = down
    try:
        yield "down"
    finally:
        connections["down"].close()
        del connections.settings["down"]
        connections._connections.__dict__.pop("down", None)  # type: ignore[attr-defined]


def test_database_down_turns_ready_503_and_recovers(settings, database_down):
    tasks.heartbeat.apply()
    settings.HEALTH_DATABASE_ALIAS = database_down
    response, _ = detailed()
    checks = response.json()["checks"]
    assert response.status_code == 503
    assert checks["database"]["status"] == "fail"
    assert checks["migrations"]["status"] == "fail"
    settings.HEALTH_DATABASE_ALIAS = "default"
    assert detailed()[0].status_code == 200


def test_a_hung_dependency_cannot_hang_the_check(settings, silent_port):
    """A server that accepts and never answers: the answer still comes in time."""
    settings.HEALTH_CHECK_TIMEOUT_S = 0.5
    settings.CACHES = {
        **settings.CACHES,
        "hung": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{silent_port}/0",
            "OPTIONS": {"socket_connect_timeout": 30, "socket_timeout": 30},
        },
    }
    settings.HEALTH_CACHE_ALIAS = "hung"
    response, elapsed = detailed()
    assert response.status_code == 503
    assert response.json()["checks"]["cache"]["detail"] == "timed out"
    assert elapsed < 2.0


def test_health_page_is_for_staff(make_user):
    anonymous = Client().get("/health/")
    assert anonymous.status_code == 302
    staff = Client()
    staff.force_login(make_user("ops", staff=True))
    tasks.heartbeat.apply()
    page = staff.get("/health/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'http-equiv="refresh"' in html
    for name in DEPENDENCIES:
        assert f"<td>{name}</td>" in html
    assert "Circuit breakers" in html and "Open alerts" in html and "Active streams" in html
    assert "<script" not in html


@pytest.mark.skipif(not SCALED, reason="the embedded pass has no Redis to point at")
def test_scaled_pass_checks_real_redis(settings):
    tasks.heartbeat.apply()
    body = detailed()[0].json()
    assert "Redis" in body["checks"]["cache"]["detail"]
    assert body["checks"]["channel_layer"]["detail"].endswith("RedisChannelLayer")
