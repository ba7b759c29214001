"""The semantic cache (off by default): paraphrases served, look-alikes not, failures harmless.

The false-hit rate is measured with the real embedding model on five labelled
sets of question pairs (tests/chat/data/semantic_pairs*.tsv) and reported in
docs/semantic-cache.md; the test fails if it gets worse than reported.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from channels.db import database_sync_to_async

from chat import semantic_cache
from chat.response_cache import CachedReply, cache_switch, normalise
from tests.chat.helpers import delta_text
from tests.chat.test_response_cache import ask, reload, user_cookie
from tests.conftest import IN_CI
from tests.monitoring.helpers import TOKEN, scrape, value

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def model() -> Iterator[semantic_cache.Embedder]:
    """The bundled embedding model, loaded once (seconds) for the module."""
    found = semantic_cache.Embedder(semantic_cache.BUNDLED_MODEL)
    try:
        found.load()
    except semantic_cache.Unavailable as exc:
        reason = f"the semantic cache needs requirements-semantic.lock installed ({exc})"
        if IN_CI:
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)
    yield found
    found.close()


@pytest.fixture
def semantic_on(settings, model, monkeypatch):
    """The semantic cache on, with the model loaded (as a server loads it before serving)."""
    settings.CHAT_SEMANTIC_CACHE = True
    settings.CHAT_SEMANTIC_CACHE_MODEL = ""
    # Long enough for a loaded CI machine; the bound itself has its own test.
    settings.CHAT_SEMANTIC_CACHE_WAIT_MS = 30_000
    monkeypatch.setitem(semantic_cache._embedders, semantic_cache.BUNDLED_MODEL, model)
    settings.METRICS_TOKEN = TOKEN


def pairs(name: str) -> list[tuple[bool, str, str]]:
    rows = []
    for line in (DATA / name).read_text(encoding="utf-8").splitlines():
        label, a, b = line.split("\t")
        assert label in ("same", "different"), line
        rows.append((label == "same", normalise(a), normalise(b)))
    return rows


def scored(model, rows) -> list[tuple[bool, float, bool]]:
    """Return each pair's label, its cosine similarity and whether the marks allow it."""
    a = model.encode([r[1] for r in rows])
    b = model.encode([r[2] for r in rows])
    return [
        (
            same,
            float(score),
            semantic_cache.compatible(semantic_cache.marks(x), semantic_cache.marks(y)),
        )
        for score, (same, x, y) in zip((a * b).sum(axis=1), rows, strict=True)
    ]


def rates(pairs: list[tuple[bool, float, bool]], threshold: float, *, marks: bool = True):
    """Return the false-hit rate (over different pairs) and the true-hit rate (over same)."""
    hit = [score >= threshold and (ok or not marks) for _, score, ok in pairs]
    same = [s for s, _, _ in pairs]
    false_hits = sum(h and not s for h, s in zip(hit, same, strict=True))
    true_hits = sum(h and s for h, s in zip(hit, same, strict=True))
    return false_hits / same.count(False), true_hits / same.count(True)


# Measured with the default threshold (docs/semantic-cache.md); a change that
# serves more wrong answers fails here.
# Measured: 0.0 % / 8.3 %, 0.0 % / 3.0 %, 0.0 % / 3.0 %, 0.7 % / 10.7 % and
# 0.0 % / 5.3 %, with margin for a pair or two (another machine's floating
# point may move one across). Each set was held out until it was first
# measured; docs/semantic-cache.md gives those first measurements.
REPORTED = {
    "semantic_pairs.tsv": {"false_hit_at_most": 0.02, "true_hit_at_least": 0.07},
    "semantic_pairs_heldout.tsv": {"false_hit_at_most": 0.02, "true_hit_at_least": 0.02},
    "semantic_pairs_heldout2.tsv": {"false_hit_at_most": 0.02, "true_hit_at_least": 0.02},
    "semantic_pairs_heldout3.tsv": {"false_hit_at_most": 0.02, "true_hit_at_least": 0.09},
    "semantic_pairs_heldout4.tsv": {"false_hit_at_most": 0.014, "true_hit_at_least": 0.04},
}


@pytest.mark.parametrize("name", sorted(REPORTED))
def test_false_hit_rate_on_the_labelled_set(model, settings, name):
    rows = pairs(name)
    assert sum(r[0] for r in rows) >= 100 and sum(not r[0] for r in rows) >= 100
    scored_pairs = scored(model, rows)
    print(f"\n{name}: threshold, false-hit / true-hit with marks, then embedding alone")
    for threshold in (0.80, 0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.98):
        false_hit, true_hit = rates(scored_pairs, threshold)
        bare_false, bare_true = rates(scored_pairs, threshold, marks=False)
        print(
            f"  {threshold:.2f}  {false_hit:6.1%} / {true_hit:6.1%}"
            f"    {bare_false:6.1%} / {bare_true:6.1%}"
        )
    threshold = settings.CHAT_SEMANTIC_CACHE_THRESHOLD
    false_hit, true_hit = rates(scored_pairs, threshold)
    bare_false, _ = rates(scored_pairs, threshold, marks=False)
    assert false_hit <= REPORTED[name]["false_hit_at_most"], false_hit
    assert true_hit >= REPORTED[name]["true_hit_at_least"], true_hit
    # The marks are what keeps the false hits down: the embedding alone serves many more.
    assert bare_false > 2 * false_hit


def test_marks_tell_apart_what_the_embedding_cannot():
    def ok(a: str, b: str) -> bool:
        return semantic_cache.compatible(semantic_cache.marks(a), semantic_cache.marks(b))

    assert not ok("convert 10 miles to km", "convert 10 km to miles")
    assert not ok("roast a 12 pound turkey", "roast a 20 pound turkey")
    assert not ok("what is 2 to the power of 5", "what is 5 to the power of 2")
    assert not ok("cookies with eggs", "cookies without eggs")
    assert not ok("who invented the telephone", "when was the telephone invented")
    assert not ok("How many cups are in a liter?", "How many liters are in a cup?")
    assert not ok("highlight cells that do not contain late", "highlight cells that contain late")
    assert not ok(
        "regex for lines that don't start with a number", "regex for lines that start with a number"
    )
    assert not ok("SQL for the third highest salary", "SQL for the second highest salary")
    assert ok("Why doesn't my printer print?", "my printer does not print, why?")
    assert not ok("Write a cover letter for Alice Smith", "Write a cover letter for Bob Jones")
    assert not ok("What is the capital of France?", "What is the capital of Germany?")
    assert ok("How do I clear the Chrome cache?", "clear chrome cache how")
    assert ok("How do I cancel my subscription?", "i want to cancel my subscription, how?")
    assert ok("recipe for two people", "recipe for 2 people")
    assert ok("turn on dark mode", "how do I turn dark mode on")
    assert not ok("How much should a 6 month old eat?", "how much should a 6 week old eat")
    assert not ok("How do I convert a PDF to Word?", "How do I convert a Word document to PDF?")
    assert not ok("redirect HTTP to HTTPS in nginx", "redirect HTTPS to HTTP in nginx")
    assert not ok(
        "copy a file from a docker container to the host",
        "copy a file from the host into a docker container",
    )
    assert not ok("check if any element is true", "check if all elements are true")
    assert not ok("sort orders oldest first", "sort orders newest first")
    assert ok("What is 15% of 80?", "15 percent of 80")
    assert ok("What is the 50/30/20 budgeting rule?", "explain the 50 30 20 budgeting rule")
    assert ok("How do I convert a PDF to Word?", "convert pdf to word")
    # What is kept of a question: digests and words from fixed lists, never its text.
    kept = semantic_cache.marks("Call 555-0143 to move with my account, Alice Smith")
    assert not {"555", "0143", "alice", "smith"} & set(str(kept).casefold().split())
    assert kept["polar"] == "with"


def test_a_question_with_personal_data_is_never_looked_up_or_kept(settings, semantic_on):
    from chat.callpath import ModelPlan
    from chat.providers import ChatMessage

    def look_up(question: str):
        return semantic_cache.lookup(
            plan=ModelPlan(model="demo:demo"),
            version_id=None,
            history=[ChatMessage(role="user", content=question)],
        )

    # No probe: nothing to store its answer under either.
    assert look_up("Write to alice@example.com that I cancel my subscription") == (None, None)
    assert look_up("My card 4111 1111 1111 1111 was charged twice") == (None, None)
    assert look_up("Write that I cancel my subscription")[1] is not None


ASKED = "How do I cancel my subscription before the trial ends?"
PARAPHRASE = "I want to cancel my subscription before the trial ends, how do I do that?"
# 0.995 to the embedding, above the threshold: told apart by its opposite word.
LOOKALIKE = "How do I cancel my subscription after the trial ends?"


@pytest.mark.django_db(transaction=True)
async def test_a_paraphrase_is_answered_from_the_cache(ws, make_user, semantic_on):
    before = await database_sync_to_async(scrape)()
    alice = await ws(await user_cookie(make_user, "alice"))
    _, first = await ask(alice, ASKED)
    assert first[-1]["cached"] is False

    bob = await ws(await user_cookie(make_user, "bob"))
    accepted, second = await ask(bob, PARAPHRASE)
    done = second[-1]
    assert done["cached"] is True and done["cost_usd"] == 0.0 and done["finish_reason"] == "stop"
    assert delta_text(second) == delta_text(first)
    reply = await reload(accepted["message"])
    assert reply.cached is True and reply.content == delta_text(first)
    # Staff reviewing the reply see where it came from.
    assert reply.call_path == [{"model": "demo:demo", "outcome": "semantic-cache"}]

    # A look-alike that needs another answer goes to the model.
    carol = await ws(await user_cookie(make_user, "carol"))
    _, third = await ask(carol, LOOKALIKE)
    assert third[-1]["cached"] is False

    after = await database_sync_to_async(scrape)()
    hits = value(after, "ai_cache_requests_total", result="semantic_hit") - value(
        before, "ai_cache_requests_total", result="semantic_hit"
    )
    misses = value(after, "ai_cache_requests_total", result="miss") - value(
        before, "ai_cache_requests_total", result="miss"
    )
    assert (hits, misses) == (1, 2)


LETTER = (
    "Write a cover letter for a pediatric nurse position at a children's hospital in the city,"
    " mentioning five years of experience in intensive care, calm under pressure, good with"
    " families and fluent in Spanish, signed by {}."
)


@pytest.mark.django_db(transaction=True)
async def test_an_answer_about_one_person_is_not_given_for_another(ws, make_user, semantic_on):
    # The two requests embed 0.99 apart: only the names mark tells them apart.
    alice = await ws(await user_cookie(make_user, "alice"))
    _, first = await ask(alice, LETTER.format("Alice Smith"))
    assert first[-1]["cached"] is False
    bob = await ws(await user_cookie(make_user, "bob"))
    _, second = await ask(bob, LETTER.format("Alice Jones"))
    assert second[-1]["cached"] is False
    # The same request in other words is still served.
    carol = await ws(await user_cookie(make_user, "carol"))
    _, third = await ask(carol, "Please " + LETTER.format("Alice Smith").lower())
    assert third[-1]["cached"] is True and delta_text(third) == delta_text(first)


@pytest.mark.django_db(transaction=True)
async def test_it_is_off_by_default(ws, make_user, settings, model, monkeypatch):
    monkeypatch.setitem(semantic_cache._embedders, semantic_cache.BUNDLED_MODEL, model)
    assert settings.CHAT_SEMANTIC_CACHE is False
    alice = await ws(await user_cookie(make_user, "alice"))
    await ask(alice, ASKED)
    bob = await ws(await user_cookie(make_user, "bob"))
    _, frames = await ask(bob, PARAPHRASE)
    assert frames[-1]["cached"] is False


@pytest.mark.django_db(transaction=True)
async def test_another_context_version_or_the_staff_switch_misses(
    ws, make_user, settings, semantic_on
):
    alice = await ws(await user_cookie(make_user, "alice"))
    await ask(alice, ASKED)

    # A follow-up in another conversation is not answered from a first question.
    bob = await ws(await user_cookie(make_user, "bob"))
    started, _ = await ask(bob, "Tell me about your plans")
    _, frames = await ask(bob, PARAPHRASE, conversation=started["conversation"])
    assert frames[-1]["cached"] is False

    # Staff switched the caches off: no answer from either.
    await database_sync_to_async(cache_switch)(enabled=False)
    carol = await ws(await user_cookie(make_user, "carol"))
    _, frames = await ask(carol, PARAPHRASE)
    assert frames[-1]["cached"] is False
    await database_sync_to_async(cache_switch)(enabled=True)

    # A new version (here its system prompt) never serves the old one's answers.
    settings.CHAT_SYSTEM_PROMPT = "You are terse."
    dave = await ws(await user_cookie(make_user, "dave"))
    _, frames = await ask(dave, PARAPHRASE)
    assert frames[-1]["cached"] is False


@pytest.mark.django_db(transaction=True)
async def test_regenerate_asks_the_model_again(ws, make_user, semantic_on):
    alice = await ws(await user_cookie(make_user, "alice"))
    await ask(alice, ASKED)
    bob = await ws(await user_cookie(make_user, "bob"))
    cached, frames = await ask(bob, PARAPHRASE)
    assert frames[-1]["cached"] is True
    _, regenerated = await ask(
        bob, "", conversation=cached["conversation"], regenerate=cached["message"]
    )
    assert regenerated[-1]["cached"] is False


@pytest.mark.django_db(transaction=True)
async def test_a_question_does_not_wait_for_the_model_to_load(
    ws, make_user, settings, model, monkeypatch
):
    settings.CHAT_SEMANTIC_CACHE = True
    settings.CHAT_SEMANTIC_CACHE_MODEL = "slow-to-load"
    # Long enough for a loaded CI machine, as in `semantic_on`: Bob's answer is
    # kept only if his lookup is done by then, and Carol's must find it.
    settings.CHAT_SEMANTIC_CACHE_WAIT_MS = 30_000
    release = threading.Event()

    def slow_load(name: str):
        assert name == "slow-to-load"
        assert release.wait(30)
        return model._model

    monkeypatch.setattr(semantic_cache, "_load_model", slow_load)
    monkeypatch.delitem(semantic_cache._embedders, "slow-to-load", raising=False)
    try:
        alice = await ws(await user_cookie(make_user, "alice"))
        _, first = await ask(alice, ASKED)  # answered while the model still loads
        assert first[-1]["cached"] is False and first[-1]["finish_reason"] == "stop"
    finally:
        release.set()
    # The model's thread takes work in order: this runs once the load is done.
    await asyncio.wrap_future(semantic_cache._executor.submit(lambda: None))
    assert semantic_cache.embedder().ready
    # Loaded now: the next question is looked up (and its answer kept) as usual.
    bob = await ws(await user_cookie(make_user, "bob"))
    await ask(bob, ASKED + " Thanks!")
    carol = await ws(await user_cookie(make_user, "carol"))
    _, frames = await ask(carol, ASKED + " Thank you!")
    assert frames[-1]["cached"] is True


@pytest.mark.django_db(transaction=True)
async def test_a_model_that_cannot_load_costs_a_reply_nothing(
    ws, make_user, settings, caplog, tmp_path, request
):
    settings.CHAT_SEMANTIC_CACHE = True
    settings.CHAT_SEMANTIC_CACHE_MODEL = str(tmp_path / "no-such-model")
    request.addfinalizer(
        lambda: semantic_cache._embedders.pop(str(tmp_path / "no-such-model"), None)
    )
    caplog.set_level(logging.WARNING)
    alice = await ws(await user_cookie(make_user, "alice"))
    accepted, frames = await ask(alice, ASKED)  # starts the load, which fails
    assert frames[-1]["finish_reason"] == "stop" and frames[-1]["cached"] is False
    await asyncio.wrap_future(semantic_cache._executor.submit(lambda: None))
    _, frames = await ask(alice, ASKED, conversation=accepted["conversation"])
    assert frames[-1]["finish_reason"] == "stop" and frames[-1]["cached"] is False

    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    said = [line for line in logged if "semantic cache unavailable" in line]
    assert len(said) == 1, logged  # once, not once a reply
    assert "every question is a miss" in said[0]
    assert not any("subscription" in line for line in logged)
    with pytest.raises(semantic_cache.Unavailable):
        semantic_cache.embedder().load()


@pytest.mark.django_db(transaction=True)
async def test_a_model_process_that_dies_costs_a_reply_nothing(
    ws, make_user, settings, caplog, model, monkeypatch
):
    import os
    import signal

    settings.CHAT_SEMANTIC_CACHE = True
    settings.CHAT_SEMANTIC_CACHE_WAIT_MS = 30_000
    own = semantic_cache.Embedder(semantic_cache.BUNDLED_MODEL)  # the module's stays alive
    await database_sync_to_async(own.load)()
    monkeypatch.setitem(semantic_cache._embedders, semantic_cache.BUNDLED_MODEL, own)
    (pid,) = own._model._pool._processes  # its one worker
    os.kill(pid, signal.SIGKILL)
    caplog.set_level(logging.WARNING)
    alice = await ws(await user_cookie(make_user, "alice"))
    for question in (ASKED, PARAPHRASE, LOOKALIKE):
        _, frames = await ask(alice, question)
        assert frames[-1]["finish_reason"] == "stop" and frames[-1]["cached"] is False
    said = [r.getMessage() for r in caplog.records if "process has died" in r.getMessage()]
    assert said == [
        "semantic cache unavailable, every question is a miss: the model's process has died"
    ]
    assert not own.ready


def test_only_the_newest_answers_stay_and_damaged_entries_are_dropped(settings, semantic_on, model):
    from django.core.cache import cache

    from chat.callpath import ModelPlan
    from chat.providers import ChatMessage

    settings.CHAT_SEMANTIC_CACHE_ENTRIES = 2
    plan = ModelPlan(model="demo:demo")
    history = [ChatMessage(role="user", content=ASKED)]
    _, probe = semantic_cache.lookup(plan=plan, version_id=None, history=history)
    assert probe is not None
    cache.set(probe.scope, ["not an entry", {"v": b"short", "text": "x"}])
    for n in range(3):
        semantic_cache.store_many(
            [(probe, CachedReply(text=f"answer {n}", prompt_tokens=1, completion_tokens=2))]
        )
    kept = cache.get(probe.scope)
    assert [e["text"] for e in kept] == ["answer 1", "answer 2"]
    hit, _ = semantic_cache.lookup(
        plan=plan, version_id=None, history=[ChatMessage(role="user", content=PARAPHRASE)]
    )
    assert hit is not None and hit.text in ("answer 1", "answer 2")


def test_a_check_warns_when_the_model_is_not_installed(settings, monkeypatch):
    from django.core import checks

    settings.CHAT_SEMANTIC_CACHE = True
    settings.CHAT_SEMANTIC_CACHE_MODEL = ""
    assert not [m for m in checks.run_checks() if m.id == "chat.W001"]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sentence_transformers" else real(name, *a),
    )
    found = [m for m in checks.run_checks() if m.id == "chat.W001"]
    assert len(found) == 1 and "requirements-semantic.lock" in found[0].hint
    # A model of one's own needs sentence-transformers all the same.
    settings.CHAT_SEMANTIC_CACHE_MODEL = "/srv/models/my-embedder"
    assert [m.id for m in checks.run_checks() if m.id == "chat.W001"] == ["chat.W001"]


def test_a_server_loads_the_model_once_before_serving(settings, model, monkeypatch):
    settings.CHAT_SEMANTIC_CACHE_MODEL = "loaded-at-start"
    monkeypatch.delitem(semantic_cache._embedders, "loaded-at-start", raising=False)
    loads: list[str] = []

    def load(name: str):
        loads.append(name)
        return model._model

    monkeypatch.setattr(semantic_cache, "_load_model", load)
    semantic_cache.warm()
    semantic_cache.warm()
    assert loads == ["loaded-at-start"] and semantic_cache.embedder().ready
    semantic_cache._embedders.pop("loaded-at-start")


@pytest.mark.django_db
def test_staff_see_whether_it_is_on(client, make_user, settings):
    client.force_login(make_user("admin", staff=True))
    page = client.get("/admin/chat/message/response-cache/").content.decode()
    assert "semantic cache (paraphrases) is off" in page
    settings.CHAT_SEMANTIC_CACHE = True
    page = client.get("/admin/chat/message/response-cache/").content.decode()
    assert "semantic cache</strong> is on" in page and "0.95" in page


async def test_questions_that_wait_together_are_embedded_together(semantic_on, model, monkeypatch):
    from chat.callpath import ModelPlan
    from chat.providers import ChatMessage

    batches: list[int] = []
    real_encode = model.encode

    def encode(texts):
        batches.append(len(texts))
        return real_encode(texts)

    monkeypatch.setattr(model, "encode", encode)
    # The model's thread is busy (a batch being embedded, say) while 20 arrive.
    busy = threading.Event()
    semantic_cache._executor.submit(busy.wait, 30)
    asked = [
        asyncio.ensure_future(
            semantic_cache.lookup_async(
                plan=ModelPlan(model="demo:demo"),
                version_id=None,
                history=[ChatMessage(role="user", content=f"How do I rotate API key number {n}?")],
            )
        )
        for n in range(20)
    ]
    waiting = semantic_cache.MAX_WAITING
    done, _ = await asyncio.wait(asked, return_when=asyncio.FIRST_COMPLETED)
    # Those beyond the queue's bound are misses at once: no one waits long for a cache.
    assert len(done) == 20 - waiting
    assert all(f.result()[0] is None and f.result()[1]() is None for f in done)
    busy.set()
    found = await asyncio.gather(*asked[:waiting])
    assert batches == [waiting]
    probes = [probe() for hit, probe in found if hit is None]
    assert len(probes) == waiting and None not in probes
    assert len({p.marks["numbers"] for p in probes}) == waiting  # each its own


@pytest.mark.django_db(transaction=True)
async def test_a_reply_waits_for_its_lookup_no_longer_than_the_setting(
    ws, make_user, settings, semantic_on
):
    from chat.callpath import ModelPlan
    from chat.providers import ChatMessage

    settings.CHAT_SEMANTIC_CACHE_WAIT_MS = 50
    busy = threading.Event()
    semantic_cache._executor.submit(busy.wait, 30)  # the model's thread is stuck
    try:
        alice = await ws(await user_cookie(make_user, "alice"))
        _, frames = await ask(alice, ASKED)  # the model answers meanwhile
        assert frames[-1]["cached"] is False and frames[-1]["finish_reason"] == "stop"
        hit, probe = await semantic_cache.lookup_async(
            plan=ModelPlan(model="demo:demo"),
            version_id=None,
            history=[ChatMessage(role="user", content=PARAPHRASE)],
        )
        assert hit is None and probe() is None  # not done yet
    finally:
        busy.set()
    # Once done, the late lookup still tells where its answer would be kept.
    await asyncio.wrap_future(semantic_cache._executor.submit(lambda: None))
    assert probe() is not None
