"""The real server (`make run`): metrics summed across processes, and the reaper after a SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid

import httpx
import pytest
import websockets

from tests.e2e.conftest import (
    REPO,
    kill_server,
    server_env,
    server_pids,
    start_server,
    stop_server,
)
from tests.monitoring.helpers import TOKEN, parse, value

pytestmark = pytest.mark.e2e


def _in_server_env(server, code: str, **extra: str) -> str:
    """Run Python with the server's settings and data (another process on its machine)."""
    env = server_env(server.data_dir, server.port, **extra)
    env["DJANGO_SETTINGS_MODULE"] = "config.settings.embedded"
    env["PROMETHEUS_MULTIPROC_DIR"] = str(server.data_dir / "prometheus")
    done = subprocess.run(
        [sys.executable, "-c", "import django, json; django.setup()\n" + code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


async def _open_socket(server):
    client = httpx.Client(base_url=server.url, timeout=10)
    client.get("/")
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    return await websockets.connect(
        f"ws://127.0.0.1:{server.port}/ws/chat/",
        additional_headers={"Cookie": cookie, "Origin": server.url},
    )


async def _send(socket, content: str) -> dict:
    await socket.send(
        json.dumps({"type": "chat.send", "content": content, "client_msg_id": str(uuid.uuid4())})
    )
    accepted = json.loads(await socket.recv())
    assert accepted["type"] == "chat.accepted", accepted
    return accepted


def _wait_for_checkpoint(server, reply_id: int, prefix: str, timeout: float = 15) -> None:
    """Wait (bounded) until the server's shared cache holds a checkpoint starting with prefix."""
    import pickle
    import sqlite3
    import time

    deadline = time.monotonic() + timeout
    key = f":1:chat:partial:{reply_id}"
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(server.data_dir / "cache.sqlite3")) as db:
            row = db.execute("SELECT value FROM cache WHERE key = ?", (key,)).fetchone()
        if row is not None and pickle.loads(row[0]).startswith(prefix):
            return
        time.sleep(0.05)
    raise AssertionError("no checkpoint of the running reply reached the shared cache")


async def test_metrics_sum_processes_and_reaper_finishes_a_killed_reply(tmp_path, django_db_setup):
    server = start_server(
        tmp_path,
        METRICS_TOKEN=TOKEN,
        CHAT_DEMO_TTFT_MS="0",
        CHAT_DEMO_TPS="50",
        CHAT_DEMO_REPLY_TOKENS="200",
        CHAT_PARTIAL_CHECKPOINT_S="0.2",
    )
    killed = False
    try:
        socket = await _open_socket(server)
        await _send(socket, "first question")
        while json.loads(await asyncio.wait_for(socket.recv(), 20))["type"] != "chat.done":
            pass
        # A second process on the same machine records into the same directory.
        _in_server_env(
            server,
            "from monitoring import metrics\n"
            "for _ in range(2):\n"
            "    metrics.reply_observed(model='demo:demo', outcome='stop', ttft_s=0.1,"
            " duration_s=0.2, prompt_tokens=1, completion_tokens=1, cost_usd=0.0, error_code='')\n"
            "print('ok')",
        )
        scraped = httpx.get(
            f"{server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )
        assert scraped.status_code == 200
        samples = parse(scraped.text)
        assert value(samples, "ai_requests_total", model="demo:demo", outcome="stop") == 3
        assert value(samples, "ai_process_resident_memory_bytes") > 0
        assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 401

        # A slow reply, cut by killing every process of the server.
        accepted = await _send(socket, "second question, a long one")
        received, frames = [], []
        while len(received) < 8:
            frame = json.loads(await asyncio.wait_for(socket.recv(), 20))
            frames.append(frame)
            assert frame["type"] != "chat.done", frames
            if frame["type"] == "chat.delta":
                received.append(frame["text"])
        if not os.environ.get("REDIS_URL"):
            # Embedded: the text lives in the server process and is copied to
            # the shared cache every 0.2 s; wait until a copy holds what we saw.
            _wait_for_checkpoint(server, accepted["message"], "".join(received[:4]))
        kill_server(server)
        killed = True
        row = json.loads(
            _in_server_env(
                server,
                "from monitoring.services import replies_reap\n"
                "from chat.models import Message\n"
                f"reaped = replies_reap()\n"
                f"m = Message.objects.get(pk={accepted['message']})\n"
                "print(json.dumps({'reaped': reaped, 'status': m.status,"
                " 'finish_reason': m.finish_reason, 'error_code': m.error_code,"
                " 'content': m.content}))",
                MONITORING_REAP_AFTER_S="0",
            )
        )
        assert accepted["message"] in row["reaped"], row
        assert (row["status"], row["finish_reason"], row["error_code"]) == (
            "finished",
            "error",
            "unavailable",
        )
        # The text the user saw is read back: from the replay stream when
        # scaled, from the embedded server's last checkpoint otherwise.
        assert row["content"].startswith("".join(received[:4]))
    finally:
        if not killed:
            stop_server(server.process)
        for pid in server_pids(server):  # never leave a process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
