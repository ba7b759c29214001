"""Per-IP limits behind a load balancer, with the Procfile's own uvicorn flags.

A client may send any `X-Forwarded-For` it likes; the balancer appends the
address it saw. Only a proxy the operator names (`FORWARDED_ALLOW_IPS`) is
believed, so a visitor cannot pick an address per message to escape the
anonymous limit, or pin a victim's address to get it blocked.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
from uvicorn.config import Config
from uvicorn.main import main as uvicorn_command
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from tests.asgi_ws import WebsocketCommunicator
from tests.chat.helpers import recv, recv_until_done, send, send_frame
from tests.safety.helpers import cookie_for

pytestmark = pytest.mark.django_db(transaction=True)

PROCFILE = Path(__file__).resolve().parents[2] / "Procfile"


def procfile_app(monkeypatch: pytest.MonkeyPatch, forwarded_allow_ips: str | None):
    """Return the ASGI app as the Procfile's `web` line serves it (its proxy settings)."""
    (line,) = [x for x in PROCFILE.read_text().splitlines() if x.startswith("web:")]
    command = line.split("exec uvicorn ", 1)[1]
    args = shlex.split(os.path.expandvars(command.replace("${PORT:-8000}", "8000")))
    args = [a.replace("${WEB_CONCURRENCY:-2}", "2") for a in args]
    params = uvicorn_command.make_context("uvicorn", args).params
    if forwarded_allow_ips is None:
        monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    else:
        monkeypatch.setenv("FORWARDED_ALLOW_IPS", forwarded_allow_ips)
    config = Config(
        app=params["app"],
        proxy_headers=params["proxy_headers"],
        forwarded_allow_ips=params["forwarded_allow_ips"],
    )
    from config.asgi import application

    assert config.proxy_headers, "the Procfile should read the balancer's X-Forwarded-For"
    return ProxyHeadersMiddleware(application, trusted_hosts=config.forwarded_allow_ips)


async def ask_through(app, cookie: str, forwarded_for: str) -> str:
    """Send one message from 127.0.0.1 (the balancer here); return the first answer's type."""
    headers = [(b"origin", b"http://testserver"), (b"cookie", cookie.encode())]
    headers.append((b"x-forwarded-for", forwarded_for.encode()))
    comm = WebsocketCommunicator(app, "/ws/chat/", headers=headers)
    connected, _ = await comm.connect()
    assert connected
    try:
        await send(comm, send_frame("hi"))
        frame = await recv(comm)
        if frame["type"] == "chat.accepted":
            await recv_until_done(comm)
            return "accepted"
        return frame["code"]
    finally:
        await comm.disconnect()


@pytest.mark.parametrize("balancer", ["127.0.0.1", None])
async def test_a_forged_forwarded_for_does_not_escape_the_anonymous_limit(
    settings, monkeypatch, balancer
):
    settings.CHAT_RATELIMIT_ANON = "2/m"
    app = procfile_app(monkeypatch, balancer)
    cookie = await cookie_for(None, None)
    # The visitor forges the first address each time; the balancer appends theirs.
    answers = [await ask_through(app, cookie, f"203.0.113.{n}, 198.51.100.7") for n in range(4)]
    assert answers == ["accepted", "accepted", "rate_limited", "rate_limited"]
    # Another visitor, behind the same balancer, is counted apart.
    assert await ask_through(app, cookie, "203.0.113.1, 198.51.100.8") == "accepted"
