"""Staff replay a reply against a version from the admin; the prompt is checked like any input."""

from __future__ import annotations

import pytest

from chat.models import Conversation, Message
from feedback.models import ModelVersion

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def reply(make_user) -> Message:
    conversation = Conversation.objects.create(user=make_user("alice"))
    question = Message.objects.create(
        conversation=conversation, role="user", content="What is a circuit breaker?"
    )
    return Message.objects.create(
        conversation=conversation,
        role="assistant",
        content="An old answer.",
        reply_to=question,
        status="finished",
        finish_reason="stop",
        model="demo:demo",
    )


@pytest.fixture
def staff_client(client, make_user):
    client.force_login(make_user("admin", staff=True))
    return client


def test_staff_replay_an_edited_question_with_a_chosen_version(staff_client, reply, settings):
    version = ModelVersion.objects.create(number=7, model="demo:demo", system_prompt="Be brief.")
    url = f"/admin/chat/message/{reply.pk}/replay/"
    page = staff_client.get(url)
    assert page.status_code == 200
    assert b"What is a circuit breaker?" in page.content and b"An old answer." in page.content

    response = staff_client.post(url, {"version": str(version.pk), "prompt": "Explain breakers"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "Demo reply to “Explain breakers”" in html
    assert "Replayed (demo:demo, stop," in html
    # Nothing was stored: the conversation still has its two messages.
    assert Message.objects.filter(conversation=reply.conversation).count() == 2


def test_the_replayed_prompt_goes_through_the_input_checker(staff_client, reply):
    response = staff_client.post(
        f"/admin/chat/message/{reply.pk}/replay/", {"version": "", "prompt": "bad\u202eorder"}
    )
    html = response.content.decode()
    assert 'id="refusal"' in html and 'id="replayed"' not in html


def test_only_staff_can_replay(client, make_user, reply):
    client.force_login(make_user("bob"))
    response = client.post(f"/admin/chat/message/{reply.pk}/replay/", {"prompt": "hi"})
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
