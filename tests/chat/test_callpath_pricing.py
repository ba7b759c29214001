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
from tests.chat.helpers import recv_until_done
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
