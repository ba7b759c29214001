"""Admin pages are styled by stylesheets only: the CSP (style-src 'self') ignores inline styles."""

from __future__ import annotations

import re

import pytest
from django.contrib import admin
from django.urls import NoReverseMatch, reverse

from chat.owners import Owner
from feedback import services
from tests.feedback import factories
from tests.feedback.test_versions import add_version

pytestmark = pytest.mark.django_db

INLINE_STYLE = re.compile(r"<[^>]*\sstyle\s*=|<style[\s>]", re.IGNORECASE)


@pytest.fixture
def everything(make_user, staff_client, settings) -> None:
    """A rated multi-line reply, two versions with a prompt diff, a split and an export job."""
    alice = make_user("alice")
    conv = factories.conversation(user=alice)
    _, reply = factories.exchange(conv, question="Two lines?", answer="First line.\nSecond line.")
    services.feedback_submit(
        owner=Owner(user_id=alice.pk),
        client_ip="127.0.0.1",
        message_id=reply.pk,
        rating=-1,
        reasons=["inaccurate"],
        comment="Wrong.",
    )
    settings.FEEDBACK_EXPORT_STREAM_MAX = 0  # so the export is a job, with its own pages
    add_version(staff_client, system_prompt="Be brief.", activate="on")
    add_version(staff_client, system_prompt="Be brief.\nCite sources.", note="try it")
    staff_client.get("/admin/feedback/feedback/export/", {"format": "jsonl"})


def admin_pages() -> list[str]:
    """Every admin page a staff member can open without arguments, and each object's page."""
    pages = [reverse("admin:index"), "/health/", "/", "/accounts/login/"]
    for model in admin.site._registry:
        info = (model._meta.app_label, model._meta.model_name)
        pages.append(reverse("admin:{}_{}_changelist".format(*info)))
        pages.append(reverse("admin:{}_{}_add".format(*info)))
        if not model._meta.managed:
            continue  # a page, not a table
        for obj in model._default_manager.all()[:2]:
            pages.append(reverse("admin:{}_{}_change".format(*info), args=[obj.pk]))
            pages.append(reverse("admin:{}_{}_history".format(*info), args=[obj.pk]))
    for pattern in admin.site.get_urls():
        for sub in getattr(pattern, "url_patterns", []):
            name = getattr(sub, "name", None)
            if not name or name.endswith(("_export", "_download", "_delete")):
                continue
            try:
                pages.append(reverse(f"admin:{name}"))
            except NoReverseMatch:
                continue  # needs an argument; the object pages above cover those
    return sorted(set(pages))


def test_no_admin_page_has_an_inline_style(staff_client, everything):
    pages = admin_pages()
    assert any("/feedback/feedback/" in p and p.endswith("/change/") for p in pages)
    assert "/admin/feedback/modelversion/scorecards/" in pages
    offenders: dict[str, list[str]] = {}
    checked: list[str] = []
    for page in pages:
        response = staff_client.get(page)
        if response.status_code in (403, 405):
            continue  # a POST-only action, or a model nobody adds to by hand
        assert response.status_code == 200, (page, response.status_code)
        checked.append(page)
        html = response.content.decode()
        if found := [m.group(0)[:120] for m in INLINE_STYLE.finditer(html)]:
            offenders[page] = found
    assert offenders == {}
    assert len(checked) > 30 and "/admin/feedback/modelversion/split/" in checked


def test_admin_pages_load_the_admin_stylesheet(staff_client, everything):
    html = staff_client.get("/admin/feedback/modelversion/scorecards/").content.decode()
    assert "feedback/admin.css" in html
    css = b"".join(staff_client.get("/static/feedback/admin.css").streaming_content).decode()
    assert ".turn-text" in css and "pre-wrap" in css and ".turn-rated" in css
