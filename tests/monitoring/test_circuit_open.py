"""ai_circuit_open on /metrics follows the breaker every process shares, not one process's word."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from chat import breaker
from tests.monitoring.helpers import TOKEN, scrape

REPO = Path(__file__).resolve().parents[2]

# Another server process: it sees the model fail until its breaker opens,
# then keeps serving (its metrics files stay live) until the test says so.
_OPENER = textwrap.dedent(
    """
    import sys, time
    from django.conf import settings
    from chat import breaker
    model = sys.argv[1]
    for _ in range(settings.CHAT_BREAKER_FAILURES):
        breaker.record_result(model=model, ok=False, now=time.time())
    print(breaker.state_of(model=model, now=time.time()), flush=True)
    sys.stdin.readline()
    """
)


@pytest.fixture(autouse=True)
def _token(settings):
    settings.METRICS_TOKEN = TOKEN


@pytest.fixture
def opener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Open a model's breaker from another live process; /metrics then reads its files too."""
    started: list[subprocess.Popen[str]] = []
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
    }

    def open_breaker(model: str) -> None:
        process = subprocess.Popen(
            [sys.executable, "-c", "import django; django.setup()\n" + _OPENER, model],
            cwd=REPO,
            env=env,  # the same CHAT_DATA_DIR or REDIS_URL: the same shared cache
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        assert process.stdout is not None and process.stdout.readline().strip() == "open"

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    yield open_breaker
    for process in started:
        if process.poll() is None:
            process.communicate("\n", timeout=30)


def _close_with_a_probe(model: str) -> None:
    """This process's probe, after the cooldown, succeeds and closes the breaker."""
    later = time.time() + django_settings.CHAT_BREAKER_COOLDOWN_S + 1
    assert breaker.check_allowed(model=model, now=later) == (True, breaker.HALF_OPEN)
    assert breaker.record_result(model=model, ok=True, now=later) == breaker.CLOSED


def _circuit(samples: dict, model: str) -> float:
    """Return the model's ai_circuit_open value; its series must be there."""
    return samples[("ai_circuit_open", (("model", model),))]


def test_a_breaker_opened_in_one_process_and_closed_in_another_reads_closed(opener, db):
    opener("demo:demo")
    assert _circuit(scrape(), "demo:demo") == 1

    _close_with_a_probe("demo:demo")  # while the process that opened it still serves
    assert _circuit(scrape(), "demo:demo") == 0


def test_a_breaker_opened_in_another_process_reads_open_here(opener, db):
    """The scraped process never called the model: the shared state says open."""
    assert _circuit(scrape(), "demo:demo") == 0
    opener("demo:demo")
    assert _circuit(scrape(), "demo:demo") == 1


def test_a_model_nobody_configured_is_listed_once_its_breaker_opened_anywhere(opener, db):
    model = "openai:made-by-staff"
    assert ("ai_circuit_open", (("model", model),)) not in scrape()
    opener(model)
    assert _circuit(scrape(), model) == 1
    _close_with_a_probe(model)
    assert _circuit(scrape(), model) == 0  # the series stays, at 0
    assert _circuit(scrape(), "demo:demo") == 0


def test_metrics_are_served_while_the_cache_is_down(settings, db):
    """No ai_circuit_open sample is guessed; every other metric is served."""
    settings.CACHES = {
        **settings.CACHES,
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",  # nothing listens there
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        },
    }
    samples = scrape()
    assert not [key for key in samples if key[0] == "ai_circuit_open"]
    assert [key for key in samples if key[0] == "ai_process_open_fds"]
