"""With CHAT_REDACT_VENDOR_TEXT, personal data never reaches the model or moderation vendor."""

from __future__ import annotations

import json

import pytest

from chat.safety.moderation import redact_for_moderation
from tests.chat.callpath_support import *  # noqa: F403
from tests.chat.callpath_support import ask, cookie_for, reload
from tests.chat.helpers import delta_text, recv_until_done
from tests.fakevendor import Fault

pytestmark = pytest.mark.django_db(transaction=True)

SECRET_TEXT = "Email anna.k@example.com or call +44 20 7946 0958 about card 4111 1111 1111 1111"


def sent_to_vendor(vendor) -> str:
    return json.dumps([r.body for r in vendor.requests])


async def test_the_vendor_sees_placeholders_when_redaction_is_on(ws, make_user, wired, settings):
    settings.CHAT_REDACT_VENDOR_TEXT = True
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm, SECRET_TEXT)
    assert (await recv_until_done(comm))[-1]["finish_reason"] == "stop"
    body = sent_to_vendor(wired)
    for secret in ("anna.k@example.com", "7946", "4111"):
        assert secret not in body
    assert "[EMAIL]" in body and "[PHONE]" in body and "[CARD]" in body
    # What the user wrote is stored as written: redaction is for the vendor.
    stored = await reload(accepted["user_message"])
    assert stored.content == SECRET_TEXT


async def test_by_default_the_vendor_sees_what_the_user_wrote(ws, make_user, wired):
    comm = await ws(await cookie_for(make_user))
    await ask(comm, SECRET_TEXT)
    await recv_until_done(comm)
    assert "anna.k@example.com" in sent_to_vendor(wired)


async def test_the_moderation_endpoint_sees_placeholders_when_redaction_is_on(
    ws, make_user, wired, settings
):
    """The user's message and every output window go to /moderations redacted."""
    settings.CHAT_REDACT_VENDOR_TEXT = True
    settings.CHAT_MODERATION_OPENAI = True
    # The reply repeats the personal data, so the output windows hold it too.
    wired.script([Fault.ok(text=f"Noted. {SECRET_TEXT}. Anything else?")])
    comm = await ws(await cookie_for(make_user))
    await ask(comm, SECRET_TEXT)
    frames = await recv_until_done(comm)
    assert frames[-1]["finish_reason"] == "stop"
    # The user still sees the reply as the model wrote it.
    assert "anna.k@example.com" in delta_text(frames)
    inputs = wired.moderation_inputs
    assert len(inputs) >= 2  # the message, then the reply's windows
    sent = json.dumps(inputs)
    # Not even a piece of one: a window may end inside an address or a number.
    for piece in ("anna", "@exa", "7946", "4111", "1111", "0958"):
        assert piece not in sent, inputs
    assert inputs[0] == "Email [EMAIL] or call [PHONE] about card [CARD]"
    assert any("[EMAIL]" in text for text in inputs[1:])


async def test_by_default_the_moderation_endpoint_sees_the_text(ws, make_user, wired, settings):
    settings.CHAT_MODERATION_OPENAI = True
    comm = await ws(await cookie_for(make_user))
    await ask(comm, SECRET_TEXT)
    await recv_until_done(comm)
    assert wired.moderation_inputs[0] == SECRET_TEXT


def test_redaction_for_moderation_leaves_no_fragment_and_keeps_ages():
    assert redact_for_moderation("call +44 20") == "call [NUMBER]"
    assert redact_for_moderation("card 4111 1111") == "card [NUMBER]"
    assert redact_for_moderation("write to anna.k@exa") == "write to [EMAIL]"
    assert redact_for_moderation("a 12 year old, 3 kids") == "a 12 year old, 3 kids"
    assert redact_for_moderation("Email anna.k@example.com now") == "Email [EMAIL] now"
