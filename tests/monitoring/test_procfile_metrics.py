"""The Procfile's `web` line, run twice on one machine (one uvicorn per CPU, docs/deploy.md).

Both share the machine's `PROMETHEUS_MULTIPROC_DIR`; a web process that starts
(or restarts after a crash) must not erase the metrics of the ones that run.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.e2e.conftest import REPO, free_port, server_env, started_servers
from tests.monitoring.helpers import TOKEN, parse, value

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")),
        reason="runs in the scaled pass: the Procfile serves production settings",
    ),
]

PROCFILE = REPO / "Procfile"
SECRET = secrets.token_urlsafe(64)


def _procfile_line(name: str) -> str:
    (line,) = [x for x in PROCFILE.read_text().splitlines() if x.startswith(f"{name}:")]
    return line.split(":", 1)[1].strip()


def _env(data_dir: Path, port: int, metrics_dir: Path) -> dict[str, str]:
    env = server_env(data_dir, port)
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings.production",
        DJANGO_SECRET_KEY=SECRET,
        DJANGO_ALLOWED_HOSTS="127.0.0.1",
        METRICS_TOKEN=TOKEN,
        PORT=str(port),
        WEB_CONCURRENCY="1",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    )
    return env


def release(data_dir: Path) -> None:
    """The Procfile's `release` line: migrate and collect the static files."""
    env = _env(data_dir, 0, data_dir)
    del env["PROMETHEUS_MULTIPROC_DIR"]  # the Procfile sets it for web and worker only
    done = subprocess.run(
        ["bash", "-c", _procfile_line("release")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]


class Web:
    """One machine's web process (all of a machine's processes share its data dir)."""

    def __init__(self, data_dir: Path, metrics_dir: Path) -> None:
        self.port = free_port()
        env = _env(data_dir, self.port, metrics_dir)
        self.process = subprocess.Popen(
            ["bash", "-c", _procfile_line("web")],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        started_servers.append(self.process)
        self.output: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        while True:  # the server's own word that it listens
            line = lines.get(timeout=60)
            if line is None:
                raise RuntimeError("web exited:\n" + "".join(self.output))
            if "Uvicorn running on" in line:
                return

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> float:
        response = httpx.get(
            f"{self.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )
        assert response.status_code == 200, response.text[:300]
        return value(parse(response.text), "ai_requests_total", model="demo:demo", outcome="stop")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def webs(tmp_path: Path, django_db_setup: None) -> Iterator[list[Web]]:
    started: list[Web] = []
    yield started
    for web in started:
        web.stop()


async def _chat(web: Web) -> None:
    """One anonymous reply over the balancer's HTTPS (X-Forwarded-Proto from 127.0.0.1)."""
    https = {"X-Forwarded-Proto": "https"}
    page = httpx.get(f"{web.url}/", headers=https, timeout=10)
    assert page.status_code == 200, page.status_code
    cookie = f"sessionid={page.cookies['sessionid']}"
    async with websockets.connect(
        f"ws://127.0.0.1:{web.port}/ws/chat/",
        additional_headers={**https, "Cookie": cookie, "Origin": "https://127.0.0.1"},
    ) as socket:
        await socket.send(
            json.dumps({"type": "chat.send", "content": "hi", "client_msg_id": str(uuid.uuid4())})
        )
        while True:
            frame = json.loads(await socket.recv())
            assert frame["type"] != "chat.error", frame
            if frame["type"] == "chat.done":
                assert frame["finish_reason"] == "stop", frame
                return


def _until(check: Callable[[], bool], *, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.05)


async def test_a_second_web_process_keeps_the_first_ones_metrics(
    webs: list[Web], tmp_path: Path
) -> None:
    release(tmp_path)
    metrics_dir = tmp_path / "prometheus"
    (metrics_dir / "stale_from_an_earlier_boot").mkdir(parents=True)
    first = Web(tmp_path, metrics_dir)
    webs.append(first)
    assert not (metrics_dir / "stale_from_an_earlier_boot").exists()  # a fresh start empties it
    await _chat(first)
    _until(lambda: first.requests() == 1)

    second = Web(tmp_path, metrics_dir)  # another CPU's uvicorn, or a restart
    webs.append(second)
    assert second.requests() == 1
    assert first.requests() == 1

    first.stop()  # the first one stops; its replies still count
    third = Web(tmp_path, metrics_dir)
    webs.append(third)
    await _chat(third)
    _until(lambda: third.requests() == 2)
    assert second.requests() == 2
