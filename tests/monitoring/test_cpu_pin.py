"""The web process keeps its threads on one CPU (CHAT_WEB_CPU, config/cpu_pin.py).

Each case runs in a child process: pinning this one would pin every server and
browser the suite starts after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

ALLOWED = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

pytestmark = pytest.mark.skipif(
    len(ALLOWED) < 2,
    reason="pinning shows only where a process may run on at least two CPUs (Linux)",
)

# Starts a thread, runs the code under test, starts another thread, then
# reports what the code returned and each thread's CPUs.
_CHILD = """
import json, logging, os, sys, threading
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
stop = threading.Event()
threading.Thread(target=stop.wait, daemon=True).start()
{setup}
result = {call}
threading.Thread(target=stop.wait, daemon=True).start()
threads = {{tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}}
print(json.dumps({{"result": result, "threads": threads}}))
"""


def run_child(call: str, setup: str = "", **env: str) -> tuple[object, dict[str, list[int]], str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "DJANGO_"))}
    child_env.update(env)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD.format(setup=setup, call=call)],
        cwd=REPO,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["result"], report["threads"], done.stderr


def test_auto_moves_every_thread_to_the_cpu_it_runs_on():
    cpu, threads, log = run_child("cpu_pin.pin('auto')", setup="from config import cpu_pin")
    assert cpu in ALLOWED
    # The main thread, the one started before and the one started after.
    assert len(threads) == 3
    assert all(cpus == [cpu] for cpus in threads.values()), threads
    assert f"web process pinned to CPU {cpu}" in log


def test_a_number_pins_to_that_cpu():
    wanted = ALLOWED[-1]
    cpu, threads, _ = run_child(f"cpu_pin.pin('{wanted}')", setup="from config import cpu_pin")
    assert cpu == wanted
    assert all(cpus == [wanted] for cpus in threads.values()), threads


@pytest.mark.parametrize(
    ("setting", "warning"),
    [
        ("off", None),
        ("", None),
        ("4096", "is not one of this process's CPUs"),
        ("fast", "is not auto, off or a CPU number"),
    ],
)
def test_off_or_a_setting_it_cannot_follow_leaves_the_threads_free(setting, warning):
    cpu, threads, log = run_child(f"cpu_pin.pin({setting!r})", setup="from config import cpu_pin")
    assert cpu is None
    assert all(cpus == ALLOWED for cpus in threads.values()), threads
    if warning is not None:
        assert "WARNING CHAT_WEB_CPU=" in log
        assert warning in log


def test_the_embedded_server_pins_itself_and_the_scaled_one_does_not(tmp_path):
    load_app = "import config.asgi"
    report_setting = "__import__('django.conf').conf.settings.CHAT_WEB_CPU"
    embedded = {
        "DJANGO_SETTINGS_MODULE": "config.settings.embedded",
        "CHAT_DATA_DIR": str(tmp_path / "embedded"),
        "REDIS_URL": "",
        "DATABASE_URL": "",
        "CELERY_BROKER_URL": "",
    }
    setting, threads, _ = run_child(report_setting, setup=load_app, **embedded)
    assert setting == "auto"
    pinned = {tuple(cpus) for cpus in threads.values()}
    assert len(pinned) == 1 and len(next(iter(pinned))) == 1, threads

    # Only the setting's default is read here: nothing connects to Redis.
    scaled = {
        **embedded,
        "CHAT_DATA_DIR": str(tmp_path / "scaled"),
        "REDIS_URL": "redis://127.0.0.1:6379/15",
    }
    setting, _, _ = run_child(report_setting, setup="import django; django.setup()", **scaled)
    assert setting == "off"
