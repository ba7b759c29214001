"""With CHAT_REDACT_VENDOR_TEXT, personal data never reaches the model vendor."""

from __future__ import annotations

import json

import pytest

from tests.chat.callpath_support import *  # noqa: F403
from tests.chat.callpath_support import ask, cookie_for, reload
from tests.chat.helpers import recv_until_done

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
