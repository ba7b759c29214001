"""Your data in Chromium, against the real server: download a conversation, delete the account."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.e2e import test_browser
from tests.e2e.test_browser import (
    PASSWORD,
    current_conversation,
    history,
    send,
    sign_up,
    wait_reply_done,
)

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

# The chat page tests' server, browser and per-test context, for this module.
app = test_browser.app
browser = test_browser.browser
ctx = test_browser.ctx


def test_download_a_conversation_then_delete_the_account(ctx, tmp_path: Path):
    page, watch = ctx
    username = sign_up(page)
    send(page, "Which cheese goes in a lasagne?")
    wait_reply_done(page)
    conversation = current_conversation(page)
    stored = history(page, conversation)

    item = page.locator(f'.conv-item[data-id="{conversation}"]')
    item.locator("summary.export").click()
    with page.expect_download() as info:
        item.locator("a.export-md").click()
    download = info.value
    assert download.suggested_filename == f"conversation-{conversation}.md"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    text = saved.read_text(encoding="utf-8")
    assert "Which cheese goes in a lasagne?" in text
    assert stored[-1]["content"] and stored[-1]["content"] in text

    page.click("text=Your data")
    expect(page.locator("h1")).to_have_text("Your data")
    page.fill("#id_password", "not-my-password")
    page.click("#delete-account")
    expect(page.locator("#delete-error")).to_have_text(
        "That password is not right. Your account has not been deleted."
    )
    assert page.request.get(f"/api/conversations/{conversation}/export/").ok

    page.fill("#id_password", PASSWORD)
    page.click("#delete-account")
    expect(page.locator("h1")).to_have_text("Your account has been deleted")
    assert page.request.get(f"/api/conversations/{conversation}/export/").status == 404

    page.goto("/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("didn't match")
    assert watch.foreign_requests == [] and watch.dialogs == []
