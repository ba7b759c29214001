"""A reply sends chat.accepted once its model call has begun, before any other frame."""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from typing import Any

import pytest
from channels.db import database_sync_to_async

from chat import breaker, pipeline
from chat.batching import Call
from chat.models import Message
from chat.owners import Owner
from chat.providers.demo import DemoProvider
from chat.replay import hub

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("titles_enqueued")]


@database_sync_to_async
def _accept(owners: list[Owner], texts: list[str]) -> list[Any]:
    """Store these sends in one trip, as a burst's sends are."""
    calls = [
        Call(
            contextvars.copy_context(),
            {
                "owner": owner,
                "client_ip": "10.0.0.7",
                "request": pipeline.SendRequest(
                    content=text, client_msg_id=uuid.uuid4(), conversation_id=None
                ),
                "content": text,
                "injection": None,
                "screen": None,
            },
        )
        for owner, text in zip(owners, texts, strict=True)
    ]
    outcomes = pipeline._admit_all(calls)
    assert all(ok for ok, _ in outcomes)
    return [value for _, value in outcomes]


def _start(accepted: Any, prepared: Any, emit: Any) -> asyncio.Task[None]:
    """Start a reply the way the consumer does."""
    buffer = hub.open(reply_id=accepted.reply_id, owner_key=accepted.owner_key, task=None)
    task = asyncio.create_task(
        pipeline.reply_run(
            accepted=accepted,
            emit=emit,
            started_at=asyncio.get_running_loop().time(),
            buffer=buffer,
            prepared=prepared,
        )
    )
    buffer.task = task
    return task


@pytest.fixture
def model_calls(monkeypatch) -> list[str]:
    """The prompts the demo model was called with, in call order."""
    called: list[str] = []
    real = DemoProvider.stream

    def stream(self: DemoProvider, messages: Any, options: Any) -> Any:
        called.append(messages[-1].content)
        return real(self, messages, options)

    monkeypatch.setattr(DemoProvider, "stream", stream)
    return called


async def test_replies_started_together_call_their_models_before_acknowledging(
    make_user, model_calls
):
    # The breaker's state is fresh in this process, as it is while replies
    # stream (otherwise each call first asks the shared cache).
    assert await breaker.acheck_allowed(model="demo:demo", now=time.time()) == (
        True,
        breaker.CLOSED,
    )
    owners = [Owner(user_id=(await database_sync_to_async(make_user)(n)).pk) for n in "abc"]
    texts = ["one", "two", "three"]
    events: list[str] = []

    def emitter(text: str) -> Any:
        async def emit(frame: dict[str, Any]) -> None:
            if frame["type"] == "chat.accepted":
                # What the models had been asked when this acknowledgement went out.
                events.append(f"accepted {text} after {','.join(model_calls)}")
            elif frame["type"] == "chat.done":
                events.append(f"done {text}")

        return emit

    sends = await _accept(owners, texts)
    tasks = [
        _start(accepted, prepared, emitter(text))
        for (accepted, prepared), text in zip(sends, texts, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    acknowledged = [e for e in events if e.startswith("accepted")]
    assert acknowledged == [f"accepted {t} after one,two,three" for t in texts]


async def test_the_acknowledgement_comes_before_every_other_frame(make_user, settings):
    settings.CHAT_DEMO_TTFT_MS = 0
    settings.CHAT_DEMO_TPS = 0  # the first token is there at once
    owner = Owner(user_id=(await database_sync_to_async(make_user)("alice")).pk)
    frames: list[dict[str, Any]] = []

    async def emit(frame: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # a socket write that yields, as a real one may
        frames.append(frame)

    [(accepted, prepared)] = await _accept([owner], ["hello"])
    await asyncio.wait_for(_start(accepted, prepared, emit), timeout=10)
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "chat.accepted" and kinds[-1] == "chat.done"
    assert kinds.count("chat.accepted") == 1 and "chat.delta" in kinds
    assert frames[0]["message"] == accepted.reply_id


async def test_a_reply_whose_acknowledgement_fails_still_runs_and_is_stored(make_user, settings):
    settings.CHAT_CANCEL_ON_DISCONNECT = False
    owner = Owner(user_id=(await database_sync_to_async(make_user)("bob")).pk)
    tried: list[str] = []

    async def gone(frame: dict[str, Any]) -> None:
        tried.append(frame["type"])
        raise ConnectionResetError("the socket closed")

    [(accepted, prepared)] = await _accept([owner], ["are you there?"])
    await asyncio.wait_for(_start(accepted, prepared, gone), timeout=10)
    # Once the acknowledgement failed, nothing more was written to that socket.
    assert tried == ["chat.accepted"]
    reply = await database_sync_to_async(Message.objects.get)(pk=accepted.reply_id)
    assert (reply.status, reply.finish_reason) == ("finished", "stop")
    assert reply.content.startswith("Demo reply to")
