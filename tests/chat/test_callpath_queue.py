"""Fair queueing per provider:model: caps, FIFO positions, bounds, cancellation."""

from __future__ import annotations

import pytest

from tests.chat.callpath_support import *  # noqa: F403
from tests.chat.callpath_support import PRIMARY, ask, cookie_for, reload
from tests.chat.helpers import delta_text, recv, recv_until_done, send
from tests.fakevendor import Fault, reply_text

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def one_slot(settings, wired):
    settings.CHAT_QUEUE_LIMITS = {
        PRIMARY: {
            "max_in_flight": 1,
            "max_in_flight_per_user": 1,
            "max_waiting": 3,
            "max_waiting_per_user": 1,
            "retry_after": 7,
        }
    }
    return wired


async def next_frame(comm, kind):
    frame = await recv(comm)
    assert frame["type"] == kind, frame
    return frame


async def test_more_users_than_slots_wait_in_order_and_see_their_position(ws, make_user, one_slot):
    one_slot.script([Fault.stall(after=1)])  # alice's reply holds the only slot
    names = ["alice", "bob", "carol", "dave", "erin"]
    comms = {name: await ws(await cookie_for(make_user, name)) for name in names}
    alice, bob, carol, dave, erin = (comms[n] for n in names)

    alice_msg = await ask(alice, "alice asks")
    await next_frame(alice, "chat.delta")

    bob_msg = await ask(bob, "bob asks")
    assert (await next_frame(bob, "chat.queued")) == {
        "type": "chat.queued",
        "message": bob_msg["message"],
        "position": 1,
    }
    # One user cannot hold more than their share of the queue.
    bob_again = await ask(bob, "bob asks again")
    frames = await recv_until_done(bob)
    [error] = [f for f in frames if f["type"] == "chat.error"]
    assert error["code"] == "unavailable" and error["retry_after"] == 7
    assert (await reload(bob_again["message"])).call_path == [
        {"model": PRIMARY, "outcome": "queue_full"}
    ]

    carol_msg = await ask(carol, "carol asks")
    assert (await next_frame(carol, "chat.queued"))["position"] == 2
    await ask(dave, "dave asks")
    assert (await next_frame(dave, "chat.queued"))["position"] == 3

    # The queue is full: the next user is told to come back.
    await ask(erin, "erin asks")
    frames = await recv_until_done(erin)
    assert [(f["code"], f["retry_after"]) for f in frames if f["type"] == "chat.error"] == [
        ("unavailable", 7)
    ]
    assert len(one_slot.requests) == 1

    # Carol gives up while waiting: her place is released and dave moves up.
    await send(carol, {"type": "chat.stop", "message": carol_msg["message"]})
    assert (await recv_until_done(carol))[-1]["finish_reason"] == "cancelled"
    assert (await next_frame(dave, "chat.queued"))["position"] == 2

    # Alice stops: bob gets the slot, dave moves to the front, then runs.
    await send(alice, {"type": "chat.stop", "message": alice_msg["message"]})
    await recv_until_done(alice)
    bob_frames = await recv_until_done(bob)
    assert bob_frames[-1]["finish_reason"] == "stop"
    assert delta_text(bob_frames) == reply_text(20)
    dave_frames = await recv_until_done(dave)
    assert [f["position"] for f in dave_frames if f["type"] == "chat.queued"] == [1]
    assert dave_frames[-1]["finish_reason"] == "stop"
    assert len(one_slot.requests) == 3  # alice, bob, dave; never carol or erin

    bob_reply = await reload(bob_msg["message"])
    assert bob_reply.call_path == [{"model": PRIMARY, "outcome": "ok", "queued": True}]


async def test_a_user_over_their_own_cap_does_not_hold_up_others(ws, make_user, settings, wired):
    settings.CHAT_QUEUE_LIMITS = {
        PRIMARY: {"max_in_flight": 5, "max_in_flight_per_user": 1, "max_waiting_per_user": 1}
    }
    wired.script([Fault.stall(after=1)])
    alice = await ws(await cookie_for(make_user, "alice"))
    bob = await ws(await cookie_for(make_user, "bob"))

    first = await ask(alice, "one")
    await next_frame(alice, "chat.delta")
    second = await ask(alice, "two")
    assert (await next_frame(alice, "chat.queued"))["message"] == second["message"]
    await ask(bob, "three")
    bob_frames = await recv_until_done(bob)  # runs at once, past alice's waiting reply
    assert not [f for f in bob_frames if f["type"] == "chat.queued"]
    assert bob_frames[-1]["finish_reason"] == "stop"

    await send(alice, {"type": "chat.stop", "message": first["message"]})
    assert (await recv_until_done(alice))[-1]["message"] == first["message"]
    done = (await recv_until_done(alice))[-1]
    assert (done["message"], done["finish_reason"]) == (second["message"], "stop")
