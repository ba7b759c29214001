"""What replies cost: the price in force when they were made, from the admin's table."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from channels.db import database_sync_to_async
from django.test import Client
from django.utils import timezone

from chat.models import Price
from tests.chat.callpath_support import *  # noqa: F403
from tests.chat.callpath_support import PRIMARY, ask, cookie_for, reload
from tests.chat.helpers import delta_text, recv_until_done
from tests.fakevendor import prompt_tokens_for


@database_sync_to_async
def add_price(model: str, input_: str, output: str, effective_from: datetime) -> None:
    Price.objects.create(
        model=model,
        input_per_mtok=Decimal(input_),
        output_per_mtok=Decimal(output),
        effective_from=effective_from,
    )


def expected_cost(prompt: int, completion: int, input_: str, output: str) -> Decimal:
    return (prompt * Decimal(input_) + completion * Decimal(output)) / Decimal(1_000_000)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("model", [PRIMARY, f"{PRIMARY}-2024-07-18"], ids=["exact", "dated"])
async def test_reply_costs_the_price_in_force_when_it_was_made(
    ws, make_user, wired, settings, model
):
    settings.CHAT_MODEL = model
    now = timezone.now()
    await add_price(PRIMARY, "50", "50", now - timedelta(days=400))  # superseded
    await add_price(PRIMARY, "2.5", "10", now - timedelta(days=30))  # in force
    await add_price(PRIMARY, "99", "99", now + timedelta(days=1))  # not yet
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    done = (await recv_until_done(comm))[-1]

    prompt = prompt_tokens_for(wired.requests[0].body)
    cost = expected_cost(prompt, 20, "2.5", "10")
    assert done["cost_usd"] == pytest.approx(float(cost))
    reply = await reload(accepted["message"])
    assert reply.cost_usd == cost.quantize(Decimal("0.00000001"))
    assert reply.model == model


@pytest.mark.django_db(transaction=True)
async def test_a_model_without_a_price_costs_nothing_and_is_logged_once(
    ws, make_user, wired, settings, caplog
):
    settings.CHAT_MODEL = "openai:never-priced-model"
    comm = await ws(await cookie_for(make_user))
    with caplog.at_level(logging.WARNING, logger="chat.pricing"):
        for n in range(2):
            accepted = await ask(comm, f"question {n}")
            done = (await recv_until_done(comm))[-1]
            assert done["cost_usd"] == 0.0
            assert (await reload(accepted["message"])).cost_usd == 0
    warnings = [r for r in caplog.records if r.name == "chat.pricing"]
    assert len(warnings) == 1 and "openai:never-priced-model" in warnings[0].getMessage()


@pytest.mark.django_db
def test_popular_models_are_priced_out_of_the_box_and_staff_see_them(make_user):
    client = Client()
    client.force_login(make_user("boss", staff=True))
    page = client.get("/admin/chat/price/", {"q": "gpt-4o-mini"})
    assert page.status_code == 200
    assert b"openai:gpt-4o-mini" in page.content
    assert Price.objects.filter(model__startswith="anthropic:claude-").exists()
    mini = Price.objects.get(model="openai:gpt-4o-mini")
    assert (mini.input_per_mtok, mini.output_per_mtok) == (Decimal("0.15"), Decimal("0.60"))


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("model", "priced_as"),
    [
        ("openai:gpt-5-2025-08-07", "openai:gpt-5"),
        ("openai:gpt-3.5-turbo-0125", "openai:gpt-3.5-turbo"),
        ("anthropic:claude-sonnet-4-5-20250929", "anthropic:claude-sonnet-4-5"),
        ("anthropic:claude-3-5-haiku-latest", "anthropic:claude-3-5-haiku"),
        ("openai:gpt-4o-mini", "openai:gpt-4o-mini"),
        # Another model, not a snapshot: about ten times the price of the name it extends.
        ("openai:gpt-5-pro", None),
        ("openai:o3-pro", None),
    ],
)
def test_a_snapshot_takes_its_model_s_price_and_another_model_does_not(model, priced_as):
    from chat.pricing import price_at

    price = price_at(model=model, at=timezone.now())
    assert (price.model if price else None) == priced_as


@pytest.mark.django_db
def test_staff_add_a_new_price_from_a_date_without_touching_the_old_one(make_user):
    client = Client()
    client.force_login(make_user("boss", staff=True))
    before = Price.objects.filter(model="openai:gpt-4o-mini").count()
    response = client.post(
        "/admin/chat/price/add/",
        {
            "model": "openai:gpt-4o-mini",
            "input_per_mtok": "0.10",
            "output_per_mtok": "0.50",
            "cached_input_per_mtok": "",
            "effective_from_0": "2030-01-01",
            "effective_from_1": "00:00:00",
        },
    )
    assert response.status_code == 302, response.content[:2000]
    assert Price.objects.filter(model="openai:gpt-4o-mini").count() == before + 1
    newest = Price.objects.filter(model="openai:gpt-4o-mini").latest("effective_from")
    assert newest.effective_from == datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
async def priced():
    await add_price(PRIMARY, "2.5", "10", timezone.now() - timedelta(days=1))


@pytest.mark.django_db(transaction=True)
async def test_a_stopped_reply_costs_what_the_vendor_sent_before_the_stop(
    ws, make_user, wired, priced
):
    from tests.chat.helpers import recv, send
    from tests.fakevendor import Fault

    wired.script([Fault.stall(after=30, tokens=100)])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm, "a question " * 200)
    text = ""
    while len(text.split()) < 30:  # every token the vendor sent is shown
        frame = await recv(comm)
        text += frame.get("text", "")
    await send(comm, {"type": "chat.stop", "message": accepted["message"]})
    done = (await recv_until_done(comm))[-1]

    assert done["finish_reason"] == "cancelled"
    # The vendor billed the prompt and what it sent; both are estimated, as it never said.
    sent_prompt = sum(-(-len(m["content"]) // 4) for m in wired.requests[0].body["messages"])
    usage = done["usage"]
    assert usage["prompt_tokens"] == pytest.approx(sent_prompt, rel=0.1)
    assert usage["completion_tokens"] >= len(text) // 4 > 0
    cost = expected_cost(usage["prompt_tokens"], usage["completion_tokens"], "2.5", "10")
    assert done["cost_usd"] == pytest.approx(float(cost))
    reply = await reload(accepted["message"])
    assert reply.usage_estimated and reply.cost_usd == cost.quantize(Decimal("0.00000001"))


@pytest.mark.django_db(transaction=True)
async def test_a_reply_cut_by_moderation_costs_what_the_vendor_sent(ws, make_user, wired, priced):
    from tests.fakevendor import Fault

    text = "Here is a simple bread recipe for you. To build a pipe bomb, pack the pipe."
    wired.script([Fault.ok(text=text + " More text follows." * 30, tps=200)])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm, "Tell me something")
    frames = await recv_until_done(comm)
    done = frames[-1]

    shown = delta_text(frames)
    assert done["finish_reason"] == "moderated" and "bomb" not in shown
    # Held back and never shown, the flagged words were still sent, and billed.
    assert done["usage"]["completion_tokens"] > -(-len(shown) // 4)
    assert done["cost_usd"] > 0
    reply = await reload(accepted["message"])
    assert reply.usage_estimated and reply.cost_usd > 0


@pytest.mark.django_db(transaction=True)
async def test_cached_answers_spend_no_tokens_of_the_budget(ws, make_user, wired, settings):
    comm = await ws(await cookie_for(make_user, "alice"))
    await ask(comm, "What is a circuit breaker?")
    first = (await recv_until_done(comm))[-1]
    used = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert used > 0 and first["cached"] is False
    # Room for one such reply a day, not two.
    settings.CHAT_DAILY_BUDGET_TOKENS = used + used // 2
    settings.CHAT_BUDGET_RESERVE_TOKENS = 1

    other = await ws(await cookie_for(make_user, "bob"))
    for _ in range(3):
        await ask(other, "What is a circuit breaker?")
        done = (await recv_until_done(other))[-1]
        assert done["cached"] is True and done["cost_usd"] == 0.0
        assert done["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}
    assert len(wired.requests) == 1
