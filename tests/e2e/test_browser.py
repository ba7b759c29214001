"""The chat page in Debian's Chromium, against the real server started by `make run`.

One browser and one server for the whole module; each test gets a fresh
browser context (its own cookies, so its own anonymous session or account).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.e2e.conftest import REPO, RunningServer, server_env, start_server, stop_server

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
AXE = Path(__file__).parent / "vendor" / "axe-core-4.14.1" / "axe.min.js"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PASSWORD = "a-long-pass-phrase-42"
FAST_DEMO = {"CHAT_DEMO_TPS": "50"}  # 200 tokens in 4 s: still streams, keeps the suite quick
LOOSE_LIMITS = {
    "CHAT_RATELIMIT_USER": "1000/m",
    "CHAT_RATELIMIT_ANON": "1000/m",
    "CHAT_RATELIMIT_SIGNUP": "1000/h",
    "CHAT_RATELIMIT_LOGIN": "1000/m",
    "CHAT_ABUSE_THRESHOLD": "1000",
}


@pytest.fixture(scope="module")
def app(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None, django_db_blocker: object
) -> Iterator[RunningServer]:
    """The real server with the slow demo model and limits loose enough for a suite."""
    server = start_server(tmp_path_factory.mktemp("browser"), **LOOSE_LIMITS, **FAST_DEMO)
    yield server
    stop_server(server.process)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@dataclass
class Watch:
    """What a page did that it must not: run a payload, open a dialog, fetch elsewhere."""

    foreign_requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)


def open_context(
    browser: Browser, app: RunningServer, **options: Any
) -> tuple[BrowserContext, Page, Watch]:
    context = browser.new_context(base_url=app.url, **options)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=app.url)
    page = context.new_page()
    watch = Watch()
    host = f"127.0.0.1:{app.port}"

    def on_request(request: Any) -> None:
        url = request.url
        own = url.startswith((f"http://{host}/", f"ws://{host}/"))
        if not own and not url.startswith(("data:", "blob:", "about:")):
            watch.foreign_requests.append(url)

    def on_dialog(dialog: Any) -> None:
        watch.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("request", on_request)
    page.on("dialog", on_dialog)
    page.on("pageerror", lambda exc: watch.page_errors.append(str(exc)))
    return context, page, watch


@pytest.fixture
def ctx(browser: Browser, app: RunningServer) -> Iterator[tuple[Page, Watch]]:
    context, page, watch = open_context(browser, app, viewport={"width": 1280, "height": 800})
    yield page, watch
    context.close()
    assert watch.page_errors == [], watch.page_errors


def sign_up(page: Page, username: str | None = None) -> str:
    username = username or f"u{uuid.uuid4().hex[:10]}"
    page.goto("/accounts/signup/")
    page.fill("#id_username", username)
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("#input")).to_be_visible()
    return username


def wait_connected(page: Page) -> None:
    expect(page.locator("#app")).to_have_attribute("data-connected", "true")


def send(page: Page, text: str) -> None:
    """Type and send a message; return once its reply has been accepted."""
    wait_connected(page)
    replies = page.locator(".message.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    expect(page.locator(".message.assistant")).to_have_count(replies + 1)


def last_reply(page: Page) -> Any:
    return page.locator(".message.assistant").last


def wait_reply_done(page: Page, finish: str = "stop", timeout: float = 30_000) -> Any:
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-finish", finish, timeout=timeout)
    return reply


def reply_text_length(page: Page) -> int:
    return int(
        page.evaluate(
            "() => { const r = [...document.querySelectorAll('.message.assistant')].pop();"
            " return r ? r.querySelector('.content').textContent.length : 0; }"
        )
    )


def wait_longer_than(page: Page, length: int) -> int:
    page.wait_for_function(
        "n => { const r = [...document.querySelectorAll('.message.assistant')].pop();"
        " return r && r.querySelector('.content').textContent.length > n; }",
        arg=length,
    )
    return reply_text_length(page)


def history(page: Page, conversation: int) -> list[dict[str, Any]]:
    response = page.request.get(f"/api/conversations/{conversation}/messages/")
    assert response.ok, response.text()
    return list(response.json()["messages"])


def current_conversation(page: Page) -> int:
    match = re.search(r"[?&]c=(\d+)", page.url)
    assert match, page.url
    return int(match.group(1))


# --------------------------------------------------------------------------- issue 2


def test_reply_grows_while_streaming_stops_and_survives_a_reload(ctx):
    """Send, watch the reply grow, Stop halfway, reload: the partial reply is there, stopped."""
    page, _ = ctx
    page.goto("/")
    expect(page.locator("#input")).to_be_focused()
    send(page, "Tell me how streaming replies work")
    expect(page.locator("#stop")).to_be_visible()
    first = wait_longer_than(page, 30)
    expect(page.locator("#stop")).to_be_visible()
    second = wait_longer_than(page, first)
    expect(page.locator("#stop")).to_be_visible()
    assert second > first
    page.click("#stop")

    reply = wait_reply_done(page, "cancelled")
    expect(reply.locator(".tag.finish")).to_have_text("Stopped")
    expect(page.locator("#stop")).to_be_hidden()
    shown = reply.get_attribute("data-source") or ""
    conversation = current_conversation(page)
    stored = history(page, conversation)[-1]
    assert stored["finish_reason"] == "cancelled"
    assert stored["content"] == shown
    # Stopped halfway: 200 tokens at 50 tok/s take 4 s; this is a part of it.
    assert len(shown) > 0 and len(shown.split()) < 190

    page.reload()
    item = page.locator(f'.conv-item[data-id="{conversation}"]')
    expect(item).to_be_visible()
    item.locator(".conversation").click()
    reply = wait_reply_done(page, "cancelled")
    expect(reply.locator(".tag.finish")).to_have_text("Stopped")
    assert reply.get_attribute("data-source") == shown
    assert reply.locator(".content").inner_text().strip() == shown.strip()


# --------------------------------------------------------------------------- safe rendering

# Each payload's first six words come back in the demo model's reply
# ("Demo reply to “<first six words>”: ..."), so each is tried both as the
# user's text and as model output, while streaming and at the end.
XSS_PAYLOADS = [
    "<img src=x onerror=window.__xss=1;alert(1)> <script>window.__xss=2</script>",
    "[click](javascript:window.__xss=3) ![t](https://evil.example/p.png)"
    " <svg/onload=window.__xss=4>",
    '<a href="javascript:alert(5)">x</a> <iframe src=https://evil.example/f></iframe>',
    "![px](http://127.0.0.2/track.png) <img src=https://evil.example/a.png> www.evil-site.com",
    "[d](data:text/html,<script>alert(6)</script>) [v](vbscript:alert(7)) <style>*{}</style>",
    "<details open ontoggle=window.__xss=8> <javascript:alert(9)> [m](mailto:a@b.example)",
]
LINK_OK = re.compile(r"^(https?://|mailto:)")


def assert_page_is_clean(page: Page, watch: Watch) -> None:
    assert page.evaluate("() => window.__xss") is None
    assert watch.dialogs == []
    assert watch.foreign_requests == []
    found = page.evaluate(
        """() => {
          const root = document.getElementById('messages');
          const bad = [...root.querySelectorAll('script,iframe,object,embed,style,svg,'
            + 'img,details,form:not(.feedback-panel),input')]
            .filter((n) => !n.closest('.thumb')).map((n) => n.outerHTML);
          const handlers = [...root.querySelectorAll('*')].flatMap((n) =>
            [...n.attributes].filter((a) => a.name.startsWith('on') || a.name === 'style')
              .map((a) => n.tagName + ' ' + a.name));
          const links = [...root.querySelectorAll('a')].map((a) => ({
            href: a.getAttribute('href'), rel: a.getAttribute('rel'),
            target: a.getAttribute('target')}));
          return {bad, handlers, links};
        }"""
    )
    assert found["bad"] == []
    assert found["handlers"] == []
    for link in found["links"]:
        if link["href"] is None:
            continue
        assert LINK_OK.match(link["href"]), link
        assert link["rel"] == "noopener noreferrer nofollow" and link["target"] == "_blank", link


def test_hostile_text_from_the_user_and_the_model_never_runs_or_loads(ctx):
    """XSS payloads as user text and as (streaming, then final) model output stay inert."""
    page, watch = ctx
    page.goto("/")
    for payload in XSS_PAYLOADS:
        send(page, payload)
        reply = last_reply(page)
        # The echo of the payload is in the first tokens; stop there to keep it quick.
        expect(reply.locator(".content")).to_contain_text(re.compile(r"Demo reply to “.*”"))
        assert_page_is_clean(page, watch)
        page.click("#stop")
        wait_reply_done(page, "cancelled")
        source = reply.get_attribute("data-source") or ""
        if "Demo reply to" not in source:
            Path("/tmp/xss-debug.html").write_text(page.inner_html("#messages"))
        assert "Demo reply to" in source, payload
        assert_page_is_clean(page, watch)
    # The echoed model text is shown as text, not markup.
    replies = page.locator(".message.assistant .content")
    expect(replies.first).to_contain_text("<img src=x onerror=")
    expect(replies.nth(1)).to_contain_text("<svg/onload=")
    # Unsafe links are text; a mailto link and a linkified https URL are real links.
    expect(page.locator('.message a[href^="mailto:a@b.example"]').first).to_be_visible()
    expect(page.locator('.message a[href="https://evil.example/a.png"]').first).to_be_visible()
    # An image from a host not on the allow-list became a link, never fetched.
    expect(page.locator(".message a.image-link").first).to_have_text("Image: t")
    page.reload()
    wait_reply_done(page, "cancelled")
    assert_page_is_clean(page, watch)


def render_in_page(page: Page, source: str, image_hosts: list[str] | None = None) -> str:
    return str(
        page.evaluate(
            """([source, hosts]) => {
              const r = window.ChatMarkdown.createRenderer({imageHosts: hosts});
              const box = document.createElement('div');
              box.id = 'probe';
              box.className = 'markdown';
              document.getElementById('messages').appendChild(box);
              window.ChatMarkdown.renderAll(box, r, source);
              return box.innerHTML;
            }""",
            [source, image_hosts or []],
        )
    )


def test_markdown_code_blocks_are_highlighted_and_copyable(ctx):
    """Fenced code keeps its text, gets a language label, colours and a Copy button."""
    page, watch = ctx
    page.goto("/")
    code = 'def greet(name):\n    return f"hi {name} <b>"\n'
    html = render_in_page(page, f"# Title\n\nSome **bold** text.\n\n```python\n{code}```\n")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html
    block = page.locator("#probe .code-block")
    expect(block.locator(".code-head span")).to_have_text("python")
    # The highlighter is loaded on first use, from this origin.
    expect(block.locator("code .hljs-keyword").first).to_have_text("def")
    assert block.locator("code").text_content() == code
    block.locator(".copy-code").click()
    expect(block.locator(".copy-code")).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == code
    assert watch.foreign_requests == []


def test_images_load_only_from_allowed_hosts(ctx):
    """An operator-allowed image host renders an <img>; any other host stays a link."""
    page, watch = ctx
    page.goto("/")
    html = render_in_page(
        page,
        "![ok](https://img.example/a.png) ![no](https://evil.example/b.png)",
        image_hosts=["img.example"],
    )
    assert html.count("<img") == 1 and 'src="https://img.example/a.png"' in html
    assert 'class="image-link"' in html and "evil.example/b.png" in html
    page.wait_for_function("() => document.querySelector('#probe img').complete")
    # Only the allowed image was asked for (this server's CSP still refuses it,
    # as CHAT_IMAGE_HOSTS is empty here: two locks, one key).
    assert watch.foreign_requests == ["https://img.example/a.png"]


def test_streaming_render_keeps_finished_blocks_and_stays_cheap(ctx):
    """A 5,000-token reply: finished blocks keep their DOM; each frame renders only the tail."""
    page, _ = ctx
    page.goto("/")
    result = page.evaluate(
        r"""async () => {
          const words = ['alpha', 'beta', 'gamma', 'delta', 'stream', 'render', 'block'];
          const parts = [];
          let n = 0;
          while (n < 5300) {
            const kind = parts.length % 4;
            if (kind === 1) {
              parts.push('```js\nconst x = ' + n + ';\nconsole.log(x);\n```'); n += 12;
            } else if (kind === 2) {
              parts.push('- item ' + n + '\n- item **two**\n- item `three`'); n += 12;
            }
            else { const s = []; for (let i = 0; i < 60; i++) s.push(words[(n + i) % 7]);
                   parts.push(s.join(' ') + '.'); n += 60; }
          }
          const text = parts.join('\n\n');
          const tokens = text.match(/\s*\S+/g);
          const M = window.ChatMarkdown;
          const box = document.createElement('div');
          box.className = 'content markdown';
          document.getElementById('messages').appendChild(box);
          const view = new M.StreamView(box, M.createRenderer({}));
          Object.assign(M.stats, {renders: 0, totalMs: 0, maxMs: 0, fullRenders: 0, fullMs: 0});
          let firstBlock = null, kept = true;
          const t0 = performance.now();
          // About 4 tokens per delta, 8 deltas per frame: a fast vendor.
          for (let i = 0; i < tokens.length; i += 4) {
            view.append(tokens.slice(i, i + 4).join(''));
            if (i % 32 === 28) {
              await new Promise(requestAnimationFrame);
              const b = box.querySelector('.md-block');
              if (b && !firstBlock) firstBlock = b;
              if (firstBlock && !firstBlock.isConnected) kept = false;
            }
          }
          await new Promise(requestAnimationFrame);
          const streamed = {...M.stats};
          view.finish();
          // For comparison: re-rendering the whole reply at every 10th of those frames.
          const r = M.createRenderer({});
          const scratch = document.createElement('div');
          let naiveMs = 0, samples = 0;
          const step = Math.floor(text.length / 16);
          for (let end = step; end <= text.length; end += step) {
            const s0 = performance.now();
            scratch.replaceChildren(r.render(text.slice(0, end)));
            naiveMs += performance.now() - s0;
            samples += 1;
          }
          return {tokens: tokens.length, chars: text.length, streamed, final: {...M.stats},
                  kept, blocks: box.querySelectorAll('.md-block').length,
                  codeBlocks: box.querySelectorAll('.code-block').length,
                  wall: performance.now() - t0,
                  naivePerFrameMs: naiveMs / samples};
        }"""
    )
    print("\nrender cost:", json.dumps(result))
    assert result["tokens"] >= 5000
    assert result["kept"], "a finished block was rendered again while streaming"
    streamed = result["streamed"]
    assert streamed["renders"] >= 100
    # A frame lasts 16 ms; the renderer stays well inside it on average.
    assert streamed["totalMs"] / streamed["renders"] < 8, streamed
    assert result["codeBlocks"] > 30


# --------------------------------------------------------------------------- conversations


def quick_exchange(page: Page, text: str) -> Any:
    """Send a message, stop the reply at its first words, return the reply."""
    send(page, text)
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-seq", re.compile(r"^[1-9]\d*$"))
    page.click("#stop")
    return wait_reply_done(page, "cancelled")


def csrf_headers(page: Page) -> dict[str, str]:
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    return {"X-CSRFToken": token, "Content-Type": "application/json"}


def test_conversations_search_rename_delete_and_new_chat(ctx, browser, app):
    """The list updates with the generated title, filters, renames and deletes (confirmed)."""
    page, _ = ctx
    page.goto("/")
    word = f"zebra{uuid.uuid4().hex[:6]}"
    quick_exchange(page, f"Plan a {word} safari for the weekend")
    first = current_conversation(page)
    # The title comes from the Celery worker; the list picks it up by itself.
    item = page.locator(f'.conv-item[data-id="{first}"] .conversation')
    expect(item).to_have_text(f"Plan a {word} safari for the weekend", timeout=15_000)

    page.click("#new-chat")
    expect(page.locator("#empty-state")).to_be_visible()
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#input")).to_be_focused()
    quick_exchange(page, "Something else entirely for the list")
    second = current_conversation(page)
    assert second != first
    expect(page.locator(".conv-item")).to_have_count(2)

    # Search finds the conversation by its words.
    page.fill("#search", word)
    expect(page.locator(".conv-item")).to_have_count(1)
    expect(page.locator(".conv-item").first).to_have_attribute("data-id", str(first))
    page.fill("#search", "no-such-words-anywhere")
    expect(page.locator(".conv-item")).to_have_count(0)
    expect(page.locator("#list-empty")).to_have_text("No conversations match.")
    page.fill("#search", "")
    expect(page.locator(".conv-item")).to_have_count(2)

    # Rename, and it stays renamed after a reload.
    page.locator(f'.conv-item[data-id="{first}"] .rename').click()
    page.fill(".rename-input", "Our safari")
    page.press(".rename-input", "Enter")
    expect(item).to_have_text("Our safari")
    page.reload()
    expect(page.locator(f'.conv-item[data-id="{first}"] .conversation')).to_have_text("Our safari")

    # Delete asks first; Cancel keeps it, Delete removes it.
    page.locator(f'.conv-item[data-id="{second}"] .delete').click()
    expect(page.locator("#confirm-delete")).to_be_visible()
    page.click("#confirm-delete button[value=cancel]")
    expect(page.locator("#confirm-delete")).to_be_hidden()
    expect(page.locator(".conv-item")).to_have_count(2)
    page.locator(f'.conv-item[data-id="{second}"] .delete').click()
    page.click("#confirm-delete-button")
    expect(page.locator(".conv-item")).to_have_count(1)
    assert page.request.get(f"/api/conversations/{second}/messages/").status == 404

    # Someone else cannot rename, delete or read it: the id looks absent.
    other, other_page, _ = open_context(browser, app)
    try:
        other_page.goto("/")
        headers = csrf_headers(other_page)
        url = f"/api/conversations/{first}/"
        patch = other_page.request.patch(url, data=json.dumps({"title": "mine"}), headers=headers)
        assert patch.status == 404
        assert other_page.request.delete(url, headers=headers).status == 404
        assert other_page.request.get(f"{url}messages/").status == 404
        # And without the CSRF header even the owner is refused.
        assert page.request.delete(url).status == 403
    finally:
        other.close()
    expect(page.locator(f'.conv-item[data-id="{first}"] .conversation')).to_have_text("Our safari")


def seed_conversations(app: RunningServer, username: str, titles: list[str]) -> None:
    """Give the user conversations in the server's own database, older than any made here."""
    code = (
        "from datetime import timedelta\n"
        "from django.contrib.auth import get_user_model\n"
        "from django.utils import timezone\n"
        "from chat.models import Conversation\n"
        f"user = get_user_model().objects.get(username={username!r})\n"
        f"made = [Conversation(user=user, title=t) for t in {titles!r}]\n"
        "made = Conversation.objects.bulk_create(made)\n"
        "for i, c in enumerate(made):\n"
        "    Conversation.objects.filter(pk=c.pk).update(\n"
        "        updated_at=timezone.now() - timedelta(days=1, minutes=i))\n"
    )
    subprocess.run(
        [".venv/bin/python", "manage.py", "shell", "-c", code],
        cwd=REPO,
        env=server_env(app.data_dir, app.port),
        check=True,
        timeout=120,
        capture_output=True,
    )


def test_show_more_loads_the_conversations_past_the_first_hundred(ctx, app):
    """A list longer than a page ends with a labelled "Show more" that the keyboard can
    press; it brings the older conversations, once each, and a search pages the same way."""
    page, _ = ctx
    username = sign_up(page)
    seed_conversations(app, username, [f"Older {i:03}" for i in range(130)])
    page.goto("/")
    items = page.locator(".conv-item .conversation")
    expect(items).to_have_count(100)
    more = page.get_by_role("button", name="Show more conversations")
    expect(more).to_be_visible()
    more.focus()
    page.keyboard.press("Enter")
    expect(items).to_have_count(130)
    expect(more).to_be_hidden()
    expect(items.nth(100)).to_be_focused()
    titles = items.all_inner_texts()
    assert titles == [f"Older {i:03}" for i in range(130)]

    page.fill("#search", "older 0")  # exactly a page: nothing more to show
    expect(items).to_have_count(100)
    expect(more).to_be_hidden()
    page.fill("#search", "older 1")
    expect(items).to_have_count(30)
    page.fill("#search", "older")
    expect(items).to_have_count(100)
    more.click()
    expect(items).to_have_count(130)
    expect(more).to_be_hidden()


def test_regenerate_replaces_the_last_reply(ctx):
    """Regenerate answers the same message again; the old reply leaves the history."""
    page, _ = ctx
    page.goto("/")
    old = quick_exchange(page, f"Regenerate me {uuid.uuid4().hex[:6]}")
    old_id = int(old.get_attribute("data-id") or 0)
    old.locator(".regenerate").click()
    reply = last_reply(page)
    expect(reply).not_to_have_attribute("data-id", str(old_id))
    expect(page.locator(".message.assistant")).to_have_count(1)
    page.click("#stop")
    wait_reply_done(page, "cancelled")
    messages = history(page, current_conversation(page))
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["id"] == int(reply.get_attribute("data-id") or 0) != old_id


def test_edit_replaces_the_message_and_everything_after_it(ctx):
    """Editing a sent message hides it and what followed, then answers the new text."""
    page, _ = ctx
    page.goto("/")
    quick_exchange(page, f"First question {uuid.uuid4().hex[:6]}")
    quick_exchange(page, "Second question")
    first_user = page.locator(".message.user").first
    first_user.locator(".edit-message").click()
    page.fill(".edit-input", "Edited first question")
    page.press(".edit-input", "Enter")
    expect(page.locator(".message")).to_have_count(2)
    expect(page.locator(".message.user .content")).to_have_text("Edited first question")
    page.click("#stop")
    wait_reply_done(page, "cancelled")
    messages = history(page, current_conversation(page))
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "Edited first question"
    page.reload()
    expect(page.locator(".message")).to_have_count(2)


def test_copy_message_puts_the_markdown_source_on_the_clipboard(ctx):
    page, _ = ctx
    page.goto("/")
    reply = quick_exchange(page, "Copy **this** reply please")
    reply.locator(".copy-message").click()
    expect(reply.locator(".copy-message")).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == reply.get_attribute(
        "data-source"
    )
    user = page.locator(".message.user").last
    user.locator(".copy-message").click()
    assert page.evaluate("() => navigator.clipboard.readText()") == "Copy **this** reply please"


# --------------------------------------------------------------------------- feedback


def test_rating_with_reasons_can_be_changed_and_withdrawn_and_survives_reload(ctx):
    """Thumbs down opens reason chips and a comment; the state shows after a reload."""
    page, _ = ctx
    sign_up(page)
    reply = quick_exchange(page, f"Rate this reply {uuid.uuid4().hex[:6]}")
    reply_id = reply.get_attribute("data-id")
    reply.locator(".thumb.down").click()
    panel = reply.locator(".feedback-panel")
    reasons = page.evaluate(
        "() => JSON.parse(document.getElementById('chat-config').textContent).reasons_down"
    )
    assert "inaccurate" in reasons
    expect(panel.locator(".chip")).to_have_text([r.replace("_", " ") for r in reasons])
    panel.locator(".chip", has_text="inaccurate").click()
    panel.locator("textarea").fill("Not what I asked")
    panel.locator("button[type=submit]").click()
    expect(reply).to_have_attribute("data-saved", "-1")
    expect(panel).to_have_count(0)

    page.reload()
    reply = page.locator(f'.message.assistant[data-id="{reply_id}"]')
    expect(reply.locator(".thumb.down")).to_have_attribute("aria-pressed", "true")
    expect(reply.locator(".thumb.up")).to_have_attribute("aria-pressed", "false")

    # Change to thumbs up, then withdraw it.
    reply.locator(".thumb.up").click()
    expect(reply).to_have_attribute("data-saved", "1")
    reply.locator(".thumb.up").click()
    expect(reply).to_have_attribute("data-saved", "0")
    page.reload()
    reply = page.locator(f'.message.assistant[data-id="{reply_id}"]')
    expect(reply.locator(".thumb[aria-pressed=true]")).to_have_count(0)


def test_a_rating_from_the_page_reaches_the_staff_desk_and_the_export(ctx, browser, app):
    """User rates in Chromium → staff finds it with its context → the export has it."""
    page, _ = ctx
    sign_up(page)
    question = f"Feedback trail {uuid.uuid4().hex[:6]}"
    reply = quick_exchange(page, question)
    reply.locator(".thumb.down").click()
    panel = reply.locator(".feedback-panel")
    panel.locator(".chip", has_text="inaccurate").click()
    comment = f"wrong on purpose {uuid.uuid4().hex[:8]}"
    panel.locator("textarea").fill(comment)
    panel.locator("button[type=submit]").click()
    expect(reply).to_have_attribute("data-saved", "-1")
    reply_text = reply.get_attribute("data-source")

    context, staff, _ = open_context(browser, app)
    try:
        staff.goto("/admin/login/?next=/admin/")
        staff.fill("#id_username", "admin")
        staff.fill("#id_password", "admin-pw-for-e2e")
        staff.click("input[type=submit]")
        staff.goto(f"/admin/feedback/feedback/?q={comment}")
        row = staff.locator("#result_list tbody tr")
        expect(row).to_have_count(1)
        row.locator("th a, td a").first.click()
        expect(staff.locator("body")).to_contain_text(question)
        expect(staff.locator("body")).to_contain_text(comment)

        export = staff.request.get(f"/admin/feedback/feedback/export/?format=jsonl&q={comment}")
        assert export.ok, export.status
        lines = [json.loads(line) for line in export.text().splitlines() if line.strip()]
        assert len(lines) == 1
        assert lines[0]["comment"] == comment and lines[0]["rating"] == -1
        assert lines[0]["reasons"] == ["inaccurate"]
        assert lines[0]["reply"] == reply_text
        assert lines[0]["context"][-1] == {"role": "user", "content": question}
    finally:
        context.close()


def test_the_desk_shows_line_breaks_and_marks_the_rated_reply_under_the_csp(ctx, browser, app):
    """The review desk's conversation keeps a message's lines and marks the rated reply,
    styled by the admin stylesheet: the page's CSP refuses inline styles, and none is tried."""
    page, _ = ctx
    sign_up(page)
    tag = uuid.uuid4().hex[:8]
    reply = quick_exchange(page, f"first line {tag}\nsecond line")
    reply.locator(".thumb.down").click()
    panel = reply.locator(".feedback-panel")
    panel.locator("textarea").fill(f"desk style {tag}")
    panel.locator("button[type=submit]").click()
    expect(reply).to_have_attribute("data-saved", "-1")

    context, staff, watch = open_context(browser, app, viewport={"width": 1280, "height": 900})
    console: list[str] = []
    staff.on("console", lambda message: console.append(message.text))
    staff.add_init_script(
        "window.__csp = []; document.addEventListener('securitypolicyviolation',"
        " (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    try:
        staff.goto("/admin/login/?next=/admin/")
        staff.fill("#id_username", "admin")
        staff.fill("#id_password", "admin-pw-for-e2e")
        staff.click("input[type=submit]")
        staff.goto(f"/admin/feedback/feedback/?q=desk+style+{tag}")
        row = staff.locator("#result_list tbody tr")
        expect(row).to_have_count(1)
        row.locator("th a, td a").first.click()
        asked = staff.locator(".turn-user", has_text=tag)
        expect(asked).to_have_count(1)
        text = asked.locator(".turn-text")
        assert text.evaluate("(e) => getComputedStyle(e).whiteSpace") == "pre-wrap"
        assert text.inner_text() == f"first line {tag}\nsecond line"
        rated = staff.locator(".turn-rated")
        expect(rated).to_have_count(1)
        border = rated.evaluate(
            "(e) => [getComputedStyle(e).borderLeftStyle, getComputedStyle(e).borderLeftColor]"
        )
        assert border == ["solid", "rgb(204, 51, 51)"]  # the rated reply's red mark
        plain = asked.evaluate("(e) => getComputedStyle(e).borderLeftColor")
        assert plain == "rgb(136, 136, 136)"
        assert staff.evaluate("() => window.__csp") == []
        assert [m for m in console if "Content Security Policy" in m] == []
        assert watch.page_errors == []
    finally:
        context.close()


# --------------------------------------------------------------------------- reconnect


def test_dropped_connection_mid_reply_resumes_without_gaps_or_repeats(ctx):
    """The socket drops mid-reply; the page shows it, reconnects, resumes, and the text
    matches the stored reply exactly."""
    page, _ = ctx
    sockets: list[Any] = []
    refuse = {"on": False}

    def route(ws: Any) -> None:
        if refuse["on"]:
            ws.close()
            return
        ws.connect_to_server()
        sockets.append(ws)

    page.route_web_socket(re.compile(r"/ws/chat/$"), route)
    page.goto("/")
    send(page, f"Keep going after a drop {uuid.uuid4().hex[:6]}")
    wait_longer_than(page, 80)
    refuse["on"] = True
    sockets[-1].close()
    expect(page.locator("#connection")).to_have_text("Connection lost. Reconnecting…")
    expect(page.locator("#app")).to_have_attribute("data-connected", "false")
    refuse["on"] = False
    expect(page.locator("#connection")).to_have_text("", timeout=15_000)
    reply = wait_reply_done(page, "stop")
    assert len(sockets) >= 2
    stored = history(page, current_conversation(page))[-1]
    assert stored["finish_reason"] == "stop"
    assert reply.get_attribute("data-source") == stored["content"]
    assert reply.locator(".content").inner_text().strip() == stored["content"].strip()


def test_stop_pressed_while_reconnecting_is_sent_once_the_socket_is_back(ctx):
    """Stop during "Reconnecting…" is not lost: the page says it will stop, resumes,
    sends the stop, and the reply ends stopped with the text shown stored."""
    page, _ = ctx
    sockets: list[Any] = []
    refuse = {"on": False}
    sent_after_refusal: list[dict[str, Any]] = []

    def route(ws: Any) -> None:
        if refuse["on"]:
            ws.close()
            return
        server = ws.connect_to_server()
        if sockets:  # the reconnect: note what the page says, and pass it on

            def relay(message: str | bytes) -> None:
                sent_after_refusal.append(json.loads(message))
                server.send(message)

            ws.on_message(relay)
        sockets.append(ws)

    page.route_web_socket(re.compile(r"/ws/chat/$"), route)
    page.goto("/")
    send(page, f"Stop me while offline {uuid.uuid4().hex[:6]}")
    wait_longer_than(page, 40)
    refuse["on"] = True
    sockets[-1].close()
    expect(page.locator("#connection")).to_have_text("Connection lost. Reconnecting…")
    page.click("#stop")
    reply = last_reply(page)
    expect(reply.locator(".meta")).to_have_text("Will stop when the connection is back…")
    expect(page.locator("#stop")).to_be_visible()
    refuse["on"] = False
    reply = wait_reply_done(page, "cancelled")
    types = [f["type"] for f in sent_after_refusal]
    assert types[:2] == ["chat.resume", "chat.stop"], sent_after_refusal
    stored = history(page, current_conversation(page))[-1]
    assert stored["finish_reason"] == "cancelled"
    assert reply.get_attribute("data-source") == stored["content"]
    expect(page.locator("#send")).to_be_enabled()


def test_a_resume_answered_with_an_error_ends_the_reply_and_frees_the_composer(ctx):
    """When the server cannot go on with a resumed reply (its process died and it
    says so with chat.error), the page keeps the text shown, marks the reply
    failed and lets the user send again, instead of streaming forever."""
    page, _ = ctx
    sockets: list[Any] = []
    mode = {"fake": False}

    def route(ws: Any) -> None:
        sockets.append(ws)
        if not mode["fake"]:
            ws.connect_to_server()
            return

        # A server that lost the reply: the answer older releases gave.
        def answer(message: str | bytes) -> None:
            if json.loads(message)["type"] == "chat.resume":
                ws.send(
                    json.dumps(
                        {
                            "type": "chat.error",
                            "code": "not_found",
                            "message": "That reply was interrupted and is being recovered.",
                        }
                    )
                )

        ws.on_message(answer)

    page.route_web_socket(re.compile(r"/ws/chat/$"), route)
    page.goto("/")
    send(page, f"Interrupted {uuid.uuid4().hex[:6]}")
    wait_longer_than(page, 40)
    shown = last_reply(page).locator(".content").inner_text().rstrip("▍").strip()
    mode["fake"] = True
    sockets[-1].close()
    reply = wait_reply_done(page, "error")
    assert reply.get_attribute("data-source").startswith(shown)
    assert reply.locator(".content").inner_text().startswith(shown)
    expect(page.locator("#error")).to_contain_text("interrupted")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#app")).to_have_attribute("data-streaming", "false")

    mode["fake"] = False
    sockets[-1].close()  # back to the real server
    expect(page.locator("#connection")).to_have_text("", timeout=15_000)
    send(page, "And another question")
    wait_reply_done(page, "stop")


def test_a_tab_on_a_conversation_deleted_in_another_tab_moves_to_a_new_chat(ctx):
    """Sending in a conversation deleted elsewhere says so in plain words and leaves the
    tab in a new chat with the text in the box; sending it there works."""
    page, _ = ctx
    page.goto("/")
    quick_exchange(page, f"Soon deleted elsewhere {uuid.uuid4().hex[:6]}")
    gone = current_conversation(page)
    other = page.context.new_page()
    try:
        other.goto(f"/?c={gone}")
        other.locator(f'.conv-item[data-id="{gone}"] .delete').click()
        other.click("#confirm-delete-button")
        expect(other.locator(f'.conv-item[data-id="{gone}"]')).to_have_count(0)
    finally:
        other.close()

    page.fill("#input", "Are you still there?")
    page.press("#input", "Enter")
    expect(page.locator("#error")).to_contain_text("This conversation was deleted")
    expect(page.locator("#error")).to_contain_text("sending it starts a new chat")
    expect(page.locator("#retry")).to_be_hidden()
    expect(page.locator("#input")).to_have_value("Are you still there?")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#empty-state")).to_be_visible()
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.locator(f'.conv-item[data-id="{gone}"]')).to_have_count(0)

    page.press("#input", "Enter")
    wait_reply_done(page, "stop")
    expect(page.locator("#error")).to_be_hidden()
    fresh = current_conversation(page)
    assert fresh != gone
    assert history(page, fresh)[0]["content"] == "Are you still there?"


def test_reload_mid_reply_resumes_the_reply(ctx):
    """Reloading while a reply streams picks it up again and shows it whole."""
    page, _ = ctx
    page.goto("/")
    send(page, f"Survive a reload {uuid.uuid4().hex[:6]}")
    wait_longer_than(page, 60)
    page.reload()
    reply = last_reply(page)
    expect(reply).to_have_class(re.compile("streaming"))
    expect(page.locator("#stop")).to_be_visible()
    reply = wait_reply_done(page, "stop")
    stored = history(page, current_conversation(page))[-1]
    assert reply.get_attribute("data-source") == stored["content"]


def test_a_second_tab_on_the_same_conversation_follows_a_new_reply(ctx):
    """A reply sent from one tab streams into the user's other tab too."""
    page, _ = ctx
    page.goto("/")
    send(page, f"Two tabs {uuid.uuid4().hex[:6]}")
    wait_reply_done(page, "stop")
    conversation = current_conversation(page)
    other = page.context.new_page()
    other.goto(f"/?c={conversation}")
    wait_connected(other)
    expect(other.locator(".message.assistant")).to_have_count(1)

    send(page, "And a follow-up")
    expect(other.locator(".message.assistant")).to_have_count(2)
    done_here = wait_reply_done(page, "stop")
    done_there = wait_reply_done(other, "stop")
    assert done_there.get_attribute("data-source") == done_here.get_attribute("data-source")
    other.close()


def test_signing_out_in_one_tab_ends_the_chat_in_the_other(ctx):
    """A tab left open after signing out in another one can no longer chat as the user."""
    page, _ = ctx
    sign_up(page)
    wait_connected(page)
    other = page.context.new_page()
    try:
        other.goto("/")
        wait_connected(other)
        other.click(".account button[type=submit]")  # Sign out
        expect(page.locator("#app")).to_have_attribute("data-connected", "false")
        expect(page.locator("#connection")).to_have_text("Signed out")
        expect(page.locator("#error")).to_contain_text("You signed out")
    finally:
        other.close()


# --------------------------------------------------------------------------- keyboard


def test_keyboard_enter_shift_enter_escape_and_tab_order(ctx):
    """Focus starts in the box; Shift+Enter adds a line, Enter sends, Escape stops;
    every control is reachable with Tab and shows where focus is."""
    page, _ = ctx
    page.goto("/")
    wait_connected(page)
    box = page.locator("#input")
    expect(box).to_be_focused()
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type(f"line two {uuid.uuid4().hex[:6]}")
    assert "\n" in box.input_value()
    expect(page.locator(".message")).to_have_count(0)
    page.keyboard.press("Enter")
    expect(page.locator(".message.user .content")).to_contain_text("line one\nline two")
    expect(box).to_have_value("")
    expect(last_reply(page)).to_have_attribute("data-seq", re.compile(r"^[1-9]\d*$"))
    page.keyboard.press("Escape")
    reply = wait_reply_done(page, "cancelled")

    # Tab from the top of the page reaches every control, each with a visible outline.
    wanted = {"new-chat", "search", "input", "send"}
    reached: set[str] = set()
    actions = 0
    page.locator("body").focus()
    for _ in range(40):
        page.keyboard.press("Tab")
        info = page.evaluate(
            """() => { const a = document.activeElement; const s = getComputedStyle(a);
              return {id: a.id, cls: a.className.baseVal ?? a.className,
                      outline: s.outlineStyle, width: s.outlineWidth}; }"""
        )
        reached.add(info["id"])
        if "action" in str(info["cls"]):
            actions += 1
        if info["id"] or "action" in str(info["cls"]):
            assert info["outline"] != "none" and info["width"] != "0px", info
    assert wanted <= reached, reached
    assert actions >= 4  # copy/edit on the message, copy/regenerate/thumbs on the reply
    assert reply.locator(".thumb.up").get_attribute("aria-label") == "Good reply"


def test_escape_in_the_search_box_or_a_comment_does_not_stop_the_reply(ctx):
    """Escape clears the search box or leaves a feedback comment; only pressed
    elsewhere does it stop the reply that is streaming."""
    page, _ = ctx
    page.goto("/")
    first = quick_exchange(page, f"Rate me first {uuid.uuid4().hex[:6]}")
    rated = page.locator(f'.message.assistant[data-id="{first.get_attribute("data-id")}"]')
    rated.locator(".thumb.up").click()
    comment = rated.locator(".feedback-comment")
    expect(comment).to_be_visible()

    send(page, "Now a long reply, please")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-seq", re.compile(r"^[1-9]\d*$"))
    page.fill("#search", "something")
    page.press("#search", "Escape")
    expect(page.locator("#search")).to_have_value("")
    comment.fill("It was fine")
    page.press(".feedback-comment", "Escape")

    expect(reply).to_have_attribute("data-finish", re.compile("."), timeout=30_000)
    assert reply.get_attribute("data-finish") == "stop"
    assert history(page, current_conversation(page))[-1]["finish_reason"] == "stop"


# --------------------------------------------------------------------------- fallback and queue


@pytest.fixture(scope="module")
def fallback_app(
    tmp_path_factory: pytest.TempPathFactory, django_db_setup: None, django_db_blocker: object
) -> Iterator[RunningServer]:
    """A primary model that cannot be reached, the demo model as fallback, one slot."""
    from tests.e2e.conftest import free_port

    server = start_server(
        tmp_path_factory.mktemp("fallback"),
        **LOOSE_LIMITS,
        **FAST_DEMO,
        CHAT_MODEL="openai:gpt-unreachable",
        OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
        CHAT_FALLBACK_MODELS="demo:demo",
        CHAT_RETRY_MAX_ATTEMPTS="1",
        CHAT_QUEUE_LIMITS=json.dumps({"demo:demo": {"max_in_flight": 1}}),
    )
    yield server
    stop_server(server.process)


def test_fallback_answer_is_marked_and_the_queue_position_shows(browser, fallback_app):
    """A reply from a fallback model says so; a second user waiting for the only slot
    sees their place in line, then gets their reply."""
    first_ctx, first, _ = open_context(browser, fallback_app)
    second_ctx, second, _ = open_context(browser, fallback_app)
    try:
        first.goto("/")
        expect(first.locator("#model-label")).to_have_text("openai:gpt-unreachable")
        second.goto("/")
        send(first, f"Hold the slot {uuid.uuid4().hex[:6]}")
        expect(last_reply(first)).to_have_attribute("data-seq", re.compile(r"^[1-9]\d*$"))
        send(second, f"Wait for the slot {uuid.uuid4().hex[:6]}")
        expect(last_reply(second).locator(".meta")).to_have_text(
            re.compile(r"Waiting in line: position \d+")
        )
        # Let it finish: a stopped reply does not yet learn which model answered
        # (the call path's outcome arrives with the last token).
        reply = wait_reply_done(first, "stop")
        expect(reply.locator(".model-badge")).to_have_text("Demo model")
        expect(reply.locator(".tag.fallback")).to_have_text("Fallback answer")
        expect(last_reply(second)).to_have_attribute("data-seq", re.compile(r"^[1-9]\d*$"))
        second.click("#stop")
        wait_reply_done(second, "cancelled")
        # After a reload the mark is still there.
        first.reload()
        expect(last_reply(first).locator(".tag.fallback")).to_have_text("Fallback answer")
    finally:
        first_ctx.close()
        second_ctx.close()


# --------------------------------------------------------------------------- accessibility


def axe_violations(page: Page) -> list[dict[str, Any]]:
    page.add_script_tag(path=str(AXE))
    result = page.evaluate(
        """async () => {
          const r = await axe.run(document, {resultTypes: ['violations']});
          return r.violations.map((v) => ({id: v.id, impact: v.impact,
            nodes: v.nodes.map((n) => n.target.join(' ')).slice(0, 5)}));
        }"""
    )
    return [v for v in result if v["impact"] in ("serious", "critical")]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_no_serious_violations(browser, app, scheme):
    """axe-core: zero serious or critical violations on the login page, the empty chat
    page and a conversation with a reply and the feedback panel open."""
    # bypass_csp only lets the test inject axe; the page itself runs under its CSP.
    context, page, watch = open_context(
        browser, app, bypass_csp=True, color_scheme=scheme, viewport={"width": 1280, "height": 800}
    )
    try:
        found = {}
        page.goto("/accounts/login/")
        found["login"] = axe_violations(page)
        page.goto("/accounts/signup/")
        found["signup"] = axe_violations(page)
        page.goto("/")
        wait_connected(page)
        found["empty"] = axe_violations(page)
        reply = quick_exchange(page, f"Check **accessibility** {uuid.uuid4().hex[:6]}")
        reply.locator(".thumb.down").click()
        expect(reply.locator(".feedback-panel")).to_be_visible()
        found["chat"] = axe_violations(page)
        page.set_viewport_size({"width": 360, "height": 740})
        page.click("#toggle-sidebar")
        found["phone"] = axe_violations(page)
    finally:
        context.close()
    assert found == {"login": [], "signup": [], "empty": [], "chat": [], "phone": []}
    assert watch.page_errors == []


# --------------------------------------------------------------------------- performance


def test_first_load_js_and_css_stay_under_100_kb_compressed(ctx):
    """What the chat page loads first, gzip-compressed as whitenoise serves it."""
    import gzip

    page, _ = ctx
    bodies: dict[str, bytes] = {}

    def on_response(response: Any) -> None:
        if response.request.resource_type in ("script", "stylesheet"):
            bodies[response.url] = response.body()

    page.on("response", on_response)
    page.goto("/")
    wait_connected(page)
    page.wait_for_load_state("load")
    sizes = {url.rsplit("/", 1)[-1]: len(gzip.compress(b, 9)) for url, b in bodies.items()}
    total = sum(sizes.values())
    print(f"\nfirst load: {total / 1024:.1f} KB gzip", json.dumps(sizes))
    assert any(name.startswith("chat.") and name.endswith(".js") for name in sizes)
    assert not any("highlight" in name for name in sizes)  # loaded on first code block
    assert total < 100 * 1024


# --------------------------------------------------------------------------- screenshots

SCREENSHOT_PROMPT = "Show me **Markdown** with `code` please"


def test_screenshots_light_dark_desktop_phone(browser, app, tmp_path):
    """The page in both colour schemes at desktop and phone width, without sideways
    scrolling. The pictures go to a temporary folder; with CHAT_UPDATE_SCREENSHOTS=1
    they replace the README's in docs/screenshots/."""
    context, page, _ = open_context(browser, app, viewport={"width": 1280, "height": 800})
    page.goto("/")
    send(page, SCREENSHOT_PROMPT)
    wait_reply_done(page)
    conversation = current_conversation(page)
    state = tmp_path / "state.json"
    context.storage_state(path=str(state))
    context.close()
    shots = SCREENSHOTS if os.environ.get("CHAT_UPDATE_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    for scheme in ("light", "dark"):
        for width, height in ((1280, 800), (360, 740)):
            context, page, watch = open_context(
                browser,
                app,
                storage_state=str(state),
                viewport={"width": width, "height": height},
                color_scheme=scheme,
                reduced_motion="reduce",  # no slide-in caught halfway
            )
            try:
                page.goto(f"/?c={conversation}")
                wait_reply_done(page)
                wait_connected(page)
                page.locator("#input").blur()
                overflow = page.evaluate("() => document.documentElement.scrollWidth - innerWidth")
                assert overflow <= 0, (scheme, width)
                bg = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
                assert (bg == "rgb(255, 255, 255)") == (scheme == "light")
                page.screenshot(path=str(shots / f"chat-{scheme}-{width}.png"))
                if width == 360 and scheme == "light":
                    page.click("#toggle-sidebar")
                    expect(page.locator("#sidebar")).to_be_visible()
                    expect(page.locator("#new-chat")).to_be_focused()
                    page.screenshot(path=str(shots / "chat-light-360-menu.png"))
                    page.keyboard.press("Escape")
                    expect(page.locator("#sidebar")).to_be_hidden()
            finally:
                context.close()
            assert watch.page_errors == []


def test_a_failed_reply_says_so_in_plain_words_and_retry_answers_it(browser, tmp_path):
    """The vendor fails once: the user reads why, presses Retry, and gets the reply."""
    from tests.fakevendor import FakeVendor, Fault

    with FakeVendor(tokens=30) as vendor:
        vendor.script([Fault.server_error(503)])
        server = start_server(
            tmp_path / "data",
            **LOOSE_LIMITS,
            CHAT_MODEL="openai:gpt-flaky",
            OPENAI_API_KEY="sk-test",
            OPENAI_BASE_URL=vendor.openai_base_url,
            CHAT_RETRY_MAX_ATTEMPTS="1",
        )
        context, page, watch = open_context(browser, server)
        try:
            page.goto("/")
            send(page, f"Will fail once {uuid.uuid4().hex[:6]}")
            wait_reply_done(page, "error")
            expect(page.locator("#error")).to_contain_text("unavailable")
            expect(page.locator("#error")).not_to_contain_text("503")
            expect(page.locator("#retry")).to_be_visible()
            page.click("#retry")
            reply = wait_reply_done(page, "stop")
            expect(reply.locator(".content")).not_to_be_empty()
            expect(page.locator("#retry")).to_be_hidden()
            assert len(vendor.requests) == 2
            assert watch.page_errors == []
        finally:
            context.close()
            stop_server(server.process)


def test_retry_after_rate_limited_is_enabled_only_once_the_wait_is_over(browser, tmp_path):
    """The notice says to wait N s; Retry counts down, disabled, and works when enabled."""
    tight = {"CHAT_RATELIMIT_ANON": "1/5s", "CHAT_RATELIMIT_USER": "1/5s"}
    server = start_server(
        tmp_path / "data",
        **{**LOOSE_LIMITS, **tight},
        CHAT_DEMO_TPS="0",
        CHAT_DEMO_REPLY_TOKENS="3",
    )
    context, page, watch = open_context(browser, server)
    try:
        page.goto("/")
        wait_connected(page)
        retry = page.locator("#retry")
        # Windows are fixed, so a send may open a new one: send until one is refused.
        for attempt in range(4):
            page.fill("#input", f"Quick one {attempt}")
            page.press("#input", "Enter")
            expect(page.locator("#app")).to_have_attribute("data-streaming", "false")
            if retry.is_visible():
                break
        expect(page.locator("#error")).to_contain_text("try again in")
        replies = page.locator(".message.assistant").count()
        expect(retry).to_be_disabled()
        expect(retry).to_have_text(re.compile(r"^Retry in [1-5] s$"))

        expect(retry).to_be_enabled(timeout=10_000)
        expect(retry).to_have_text("Retry")
        retry.click()
        expect(page.locator(".message.assistant")).to_have_count(replies + 1)
        wait_reply_done(page, "stop")
        expect(page.locator("#error")).to_be_hidden()
        assert watch.page_errors == []
    finally:
        context.close()
        stop_server(server.process)


def test_a_conversation_opened_while_another_tab_starts_a_reply_still_opens(ctx):
    """Following another tab's reply must not swallow the conversation the user just clicked."""
    page, _ = ctx
    page.goto("/")
    quick_exchange(page, f"The one to open {uuid.uuid4().hex[:6]}")
    target = current_conversation(page)
    page.click("#new-chat")
    quick_exchange(page, f"The one on screen {uuid.uuid4().hex[:6]}")
    on_screen = current_conversation(page)
    other = page.context.new_page()
    held: list[Any] = []
    try:
        other.goto(f"/?c={on_screen}")
        wait_connected(other)
        expect(other.locator(".message")).to_have_count(2)
        # The click's request is held until the other tab's reply has begun
        # and this page has refreshed the conversation on screen for it.
        page.route(f"**/api/conversations/{target}/messages/", lambda route: held.append(route))
        with page.expect_request(f"**/api/conversations/{target}/messages/"):
            page.click(f'.conv-item[data-id="{target}"] .conversation')
        page.evaluate("1")  # one more round trip: the route's handler has run
        assert len(held) == 1
        with page.expect_response(f"**/api/conversations/{on_screen}/messages/"):
            send(other, "A reply begun in the other tab")
        held.pop().continue_()
        page.wait_for_url(re.compile(rf"[?&]c={target}\b"))
        expect(page.locator(".message.user .content")).to_have_text([re.compile("The one to open")])
        other.click("#stop")
        wait_reply_done(other, "cancelled")
    finally:
        page.unroute(f"**/api/conversations/{target}/messages/")
        for route in held:
            route.continue_()
        other.close()


def test_a_second_tab_shows_the_question_and_drops_what_an_edit_replaced(ctx):
    """The other tab follows a reply with the question it answers, and an edit made
    in one tab replaces the edited message and what followed in the other too."""
    page, _ = ctx
    page.goto("/")
    quick_exchange(page, f"First in two tabs {uuid.uuid4().hex[:6]}")
    conversation = current_conversation(page)
    other = page.context.new_page()
    try:
        other.goto(f"/?c={conversation}")
        wait_connected(other)
        expect(other.locator(".message")).to_have_count(2)

        send(page, "A follow-up from the first tab")
        expect(other.locator(".message.assistant")).to_have_count(2)
        expect(other.locator(".message.user .content")).to_have_text(
            [re.compile("First in two tabs"), "A follow-up from the first tab"]
        )
        page.click("#stop")
        wait_reply_done(page, "cancelled")
        wait_reply_done(other, "cancelled")

        page.locator(".message.user").first.locator(".edit-message").click()
        page.fill(".edit-input", "The edited first question")
        page.press(".edit-input", "Enter")
        expect(page.locator(".message")).to_have_count(2)
        expect(other.locator(".message.user .content")).to_have_text(["The edited first question"])
        expect(other.locator(".message")).to_have_count(2)
        page.click("#stop")
        wait_reply_done(page, "cancelled")
        done_there = wait_reply_done(other, "cancelled")
        stored = history(page, conversation)
        assert [m["id"] for m in stored] == [
            int(other.locator(".message").nth(i).get_attribute("data-id") or 0) for i in range(2)
        ]
        assert done_there.get_attribute("data-source") == stored[-1]["content"]
    finally:
        other.close()
