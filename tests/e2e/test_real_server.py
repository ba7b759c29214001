"""`make run` as a newcomer would use it: a real process, real sockets, a real worker."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest
import websockets

from tests.e2e.conftest import RunningServer, start_server, stop_server

pytestmark = pytest.mark.e2e


def signed_up_client(server: RunningServer, username: str) -> httpx.Client:
    client = httpx.Client(base_url=server.url, timeout=10)
    page = client.get("/accounts/signup/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token, page.text[:500]
    response = client.post(
        "/accounts/signup/",
        data={
            "csrfmiddlewaretoken": token.group(1),
            "username": username,
            "password1": "a-long-pass-phrase-42",
            "password2": "a-long-pass-phrase-42",
        },
    )
    assert response.status_code == 302, response.text[:500]
    return client


def cookie_header(client: httpx.Client) -> str:
    return "; ".join(f"{k}={v}" for k, v in client.cookies.items())


async def test_chat_streams_over_a_real_socket_and_a_real_worker_titles_it(live_app):
    client = signed_up_client(live_app, f"newcomer-{uuid.uuid4().hex[:6]}")
    async with websockets.connect(
        f"ws://127.0.0.1:{live_app.port}/ws/chat/",
        additional_headers={"Cookie": cookie_header(client), "Origin": live_app.url},
    ) as socket:
        await socket.send(
            json.dumps(
                {
                    "type": "chat.send",
                    "content": "Plan a picnic for a rainy afternoon",
                    "client_msg_id": str(uuid.uuid4()),
                }
            )
        )
        accepted = json.loads(await socket.recv())
        assert accepted["type"] == "chat.accepted"
        frames = []
        while True:
            frame = json.loads(await socket.recv())
            frames.append(frame)
            if frame["type"] == "chat.done":
                break
    deltas = [f for f in frames if f["type"] == "chat.delta"]
    assert len(deltas) > 10  # it streamed, it did not arrive in one piece
    assert frames[-1]["finish_reason"] == "stop"

    history = client.get(f"/api/conversations/{accepted['conversation']}/messages/").json()
    assert history["messages"][1]["content"] == "".join(d["text"] for d in deltas)

    # The Celery worker started by `make run` titles the conversation.
    for _ in range(100):
        listing = client.get("/api/conversations/").json()["conversations"]
        if listing and listing[0]["title"] != "New chat":
            break
        import time

        time.sleep(0.1)
    assert listing[0]["title"] == "Plan a picnic for a rainy afternoon"


def test_staff_sees_conversations_in_the_admin(live_app):
    client = httpx.Client(base_url=live_app.url, timeout=10)
    page = client.get("/admin/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token
    response = client.post(
        "/admin/login/?next=/admin/",
        data={
            "csrfmiddlewaretoken": token.group(1),
            "username": "admin",
            "password": "admin-pw-for-e2e",
            "next": "/admin/",
        },
    )
    assert response.status_code == 302
    listing = client.get("/admin/chat/conversation/")
    assert listing.status_code == 200
    assert "Conversations" in listing.text


def test_health_live_answers(live_app):
    response = httpx.get(f"{live_app.url}/health/live", timeout=5)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_ctrl_c_stops_server_worker_and_beat(tmp_path):
    # Once the worker has started too: Ctrl-C while Celery forks its pool makes
    # Celery itself print a traceback ("Could not start worker processes").
    server = start_server(tmp_path, ready=("Uvicorn running on", "celery@", " ready."))
    assert httpx.get(f"{server.url}/health/live", timeout=5).status_code == 200
    stop_server(server.process)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health/live", timeout=2)
    output = "".join(server.output)
    assert "web.1" in output and "worker.1" in output
    assert "Traceback" not in output
