"""The real server, started with the real command (`make run`), on a free port."""

from __future__ import annotations

import os
import queue
import select
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 120


@dataclass
class RunningServer:
    url: str
    host: str
    port: int
    data_dir: Path
    process: subprocess.Popen[str]
    output: list[str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("DJANGO_SETTINGS_MODULE", "PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER"):
        env.pop(name, None)
    env.update(
        HOST="127.0.0.1",
        PORT=str(port),
        CHAT_DATA_DIR=str(data_dir),
        DJANGO_SUPERUSER_USERNAME="admin",
        DJANGO_SUPERUSER_PASSWORD="admin-pw-for-e2e",
        CHAT_DEMO_TTFT_MS="100",
        CHAT_DEMO_TPS="25",
        CHAT_DEMO_REPLY_TOKENS="200",
        PYTHONUNBUFFERED="1",
    )
    if env.get("DATABASE_URL"):
        # The scaled pass: share pytest's throwaway database, never the real one.
        db = settings.DATABASES["default"]
        env["DATABASE_URL"] = (
            f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        )
    env.update(extra)
    return env


# Every server started, so that tests/conftest.py can empty pytest's database
# after a module whose servers wrote to it (the scaled pass shares it).
started_servers: list[subprocess.Popen[str]] = []


def start_server(
    data_dir: Path, *, ready: tuple[str, ...] = ("Uvicorn running on",), **extra: str
) -> RunningServer:
    """Start `make run`; return once its output has said each of `ready`."""
    port = free_port()
    process = subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=REPO,
        env=server_env(data_dir, port, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so Ctrl-C reaches all of it
    )
    started_servers.append(process)
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    # Wait for the server's own word that it listens, not for a fixed time.
    waiting = set(ready)
    while waiting:
        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            stop_server(process)
            raise RuntimeError("server did not start:\n" + "".join(output)) from None
        if line is None:
            stop_server(process)
            raise RuntimeError("server exited:\n" + "".join(output))
        waiting = {marker for marker in waiting if marker not in line}
    return RunningServer(
        url=f"http://127.0.0.1:{port}",
        host="127.0.0.1",
        port=port,
        data_dir=data_dir,
        process=process,
        output=output,
    )


def stop_server(process: subprocess.Popen[str]) -> int:
    """Press Ctrl-C on the whole process group; return the exit code."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    return process.returncode


def server_pids(server: RunningServer) -> list[int]:
    """Every process of this server: honcho starts each in its own session."""
    marker = f"CHAT_DATA_DIR={server.data_dir}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def kill_server(server: RunningServer) -> None:
    """SIGKILL every process of the server, as a power cut would, and wait until they are gone."""
    pids = server_pids(server)
    assert pids
    handles = []
    for pid in pids:
        try:
            handles.append(os.pidfd_open(pid))
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    for handle in handles:
        select.select([handle], [], [], 30)  # readable once the process has exited
        os.close(handle)
    server.process.wait(timeout=30)


@pytest.fixture(scope="module")
def live_app(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None, django_db_blocker: object
) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp("live"))
    yield server
    stop_server(server.process)
