"""Starting, measuring and always stopping the servers under test.

Every server runs the `web:` command of config/Procfile.embedded (uvicorn with
the flags production uses), in its own process group, with its own temporary
CHAT_DATA_DIR; the floor runs the same command with the floor app. The app's
Celery worker is not started: no part of a chat reply runs in it, and its
start-up and periodic jobs would only add noise to the numbers.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
APP_ASGI = "config.asgi:application"
FLOOR_ASGI = "tests.bench.floor:application"
START_TIMEOUT_S = 90.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Started by this run: stopped at exit whatever happens.
_running: list[subprocess.Popen[bytes]] = []


def procfile_command(name: str) -> str:
    for line in (REPO / "config" / "Procfile.embedded").read_text().splitlines():
        key, sep, command = line.partition(":")
        if sep and key.strip() == name:
            return command.strip()
    raise RuntimeError(f"config/Procfile.embedded has no {name!r} line")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a server: embedded unless extra says otherwise."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHAT_", "PYTEST", "DJANGO_")) and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        DJANGO_SETTINGS_MODULE="config.settings.embedded",
        CHAT_DATA_DIR=str(data_dir),
        PROMETHEUS_MULTIPROC_DIR=str(data_dir / "prometheus"),
        # Set empty rather than unset, so a .env file cannot switch the mode.
        DATABASE_URL="",
        REDIS_URL="",
        CELERY_BROKER_URL="",
        SENTRY_DSN="",
        # Every message reaches the model: no limit, no cache hit.
        CHAT_RATELIMIT_USER="1000000/m",
        CHAT_RATELIMIT_ANON="1000000/m",
        CHAT_RESPONSE_CACHE="false",
    )
    env.update(extra)
    return env


def manage(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


_SEED = """
import json
from django.core.management import call_command
call_command("migrate", interactive=False, verbosity=0)
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.auth.hashers import make_password
from django.contrib.sessions.backends.db import SessionStore
User = get_user_model()
unusable = make_password(None)
users = User.objects.bulk_create(
    [User(username=f"bench{i:05d}", password=unusable) for i in range(COUNT)]
)
users = list(User.objects.filter(username__startswith="bench").order_by("username")[:COUNT])
keys = []
for user in users:
    s = SessionStore()
    s[SESSION_KEY] = str(user.pk)
    s[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    s[HASH_SESSION_KEY] = user.get_session_auth_hash()
    s.set_expiry(7 * 24 * 3600)
    s.create()
    keys.append(s.session_key)
print("BENCH-SEED " + json.dumps({"cookie": settings.SESSION_COOKIE_NAME, "keys": keys}))
"""


def prepare_app_data(env: dict[str, str], users: int) -> list[str]:
    """Migrate, create `users` signed-in users; return their Cookie headers."""
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
    out = manage(env, "shell", "-c", _SEED.replace("COUNT", str(users)))
    for line in out.splitlines():
        if line.startswith("BENCH-SEED "):
            seed = json.loads(line.removeprefix("BENCH-SEED "))
            return [f"{seed['cookie']}={key}" for key in seed["keys"]]
    raise RuntimeError(f"seeding users printed nothing usable:\n{out}")


@dataclass
class Server:
    name: str
    ports: list[int]
    web: list[subprocess.Popen[bytes]]
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.web]

    def rss_kb(self) -> int:
        return sum(rss_kb(pid) for pid in self.pids)

    def cpu_s(self) -> float:
        return sum(cpu_s(pid) for pid in self.pids)

    def check_alive(self) -> None:
        for proc in self.web:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name}: server process {proc.pid} exited")

    def stop(self) -> None:
        procs = [*self.web, *self.others]
        for proc in procs:  # all at once: they shut down in parallel
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            stop(proc)


def spawn(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["bash", "-c", command],  # the Procfile line `exec`s, so pid = the server
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
        )
    _running.append(proc)
    return proc


def start_web(
    name: str, asgi: str, env: dict[str, str], data_dir: Path, ports: int = 1, worker: bool = False
) -> Server:
    command = procfile_command("web")
    if APP_ASGI not in command:
        raise RuntimeError(f"the Procfile's web line does not serve {APP_ASGI}: {command}")
    command = command.replace(APP_ASGI, asgi)
    prom = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    if prom.exists():
        for item in prom.iterdir():
            item.unlink()
    prom.mkdir(parents=True, exist_ok=True)
    log = data_dir / f"{name}.log"
    server = Server(name=name, ports=[], web=[])
    try:
        for _ in range(ports):
            port = free_port()
            server.ports.append(port)
            server.web.append(
                spawn(command, dict(env, CHAT_HOST="127.0.0.1", CHAT_PORT=str(port)), log)
            )
        if worker:
            server.others.append(spawn(procfile_command("worker"), env, log))
        for proc, port in zip(server.web, server.ports, strict=True):
            wait_listening(proc, port, log)
    except BaseException:
        server.stop()
        raise
    return server


def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"server did not listen on {port} within {START_TIMEOUT_S:.0f} s:\n{tail(log)}"
    )


def tail(log: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it after `grace` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # Whatever the leader did, nothing of its group may outlive the bench.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    if proc in _running:
        _running.remove(proc)


def stop_all() -> None:
    for proc in list(_running):
        stop(proc, grace=3.0)


atexit.register(stop_all)


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return 0.0


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}"


# --- The scaled mode's services ----------------------------------------------------


@dataclass
class Services:
    database_url: str
    redis_url: str
    admin_url: str
    db_name: str


def services_create(admin_url: str, redis_url: str) -> Services:
    """Create a fresh PostgreSQL database and empty the bench's Redis database."""
    import psycopg
    import redis

    name = f"bench_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    redis.Redis.from_url(redis_url, socket_timeout=3).flushdb()
    return Services(
        database_url=f"{base}/{name}", redis_url=redis_url, admin_url=admin_url, db_name=name
    )


def services_drop(services: Services) -> None:
    import psycopg
    import redis

    with contextlib.suppress(Exception):
        redis.Redis.from_url(services.redis_url, socket_timeout=3).flushdb()
    with psycopg.connect(services.admin_url, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{services.db_name}" WITH (FORCE)')
