"""In Chromium, against the real server: chat anonymously, sign up, the chat is still there."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.e2e import test_browser
from tests.e2e.test_browser import (
    current_conversation,
    send,
    sign_up,
    wait_connected,
    wait_reply_done,
)

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

# The chat page tests' server, browser and per-test context, for this module.
app = test_browser.app
browser = test_browser.browser
ctx = test_browser.ctx


def test_an_anonymous_chat_is_kept_after_signing_up_and_other_tabs_reconnect(ctx):
    page, watch = ctx
    page.goto("/")
    send(page, "What goes in a ratatouille?")
    wait_reply_done(page)
    conversation = current_conversation(page)
    other = page.context.new_page()
    try:
        other.goto("/")
        wait_connected(other)

        # The other tab's anonymous socket is closed by the sign-up: it reconnects, as the account.
        with other.expect_websocket(timeout=15_000):
            sign_up(page)
        item = page.locator(f'.conv-item[data-id="{conversation}"]')
        expect(item).to_have_count(1)
        item.locator(".conversation").click()
        expect(page.locator(".message.user .content")).to_have_text(["What goes in a ratatouille?"])
        expect(page.locator(".message.assistant")).to_have_count(1)

        wait_connected(other)
        expect(other.locator("#connection")).to_have_text("")
        send(other, "And a piperade?")
        wait_reply_done(other)
        mine = page.request.get("/api/conversations/").json()["conversations"]
        assert {conversation, current_conversation(other)} == {c["id"] for c in mine}
    finally:
        other.close()
    assert watch.foreign_requests == [] and watch.dialogs == []
