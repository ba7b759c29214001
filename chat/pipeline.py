"""The path a chat message takes, top to bottom, in one place.

    chat_accept:  check the input → score and moderate it → check limits and
                  blocks → store the user message and a pending reply (before any
                  model is called)
    reply_run:    build the history → call the model (timeouts, retries,
                  fallbacks, queueing) → moderate each window of output →
                  stream deltas to the socket → store the reply exactly once →
                  settle the budget → count it

The consumer calls these two and owns nothing but the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import sqlite3
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, IntegrityError, connections, transaction
from django.utils import timezone

from chat import response_cache, selectors, semantic_cache, services
from chat.batching import Batched, Call, Outcome
from chat.callpath import LAST_RESORT, CallOutcome, call_model, estimated_usage
from chat.errors import BlockedInput, ChatError, Forbidden, Internal, InvalidInput, Timeout
from chat.models import Message
from chat.owners import Owner
from chat.pricing import reply_cost
from chat.providers import ChatMessage, Usage
from chat.replay import ReplyBuffer, hub, partial_key, store_partials
from chat.safety import InjectionVerdict, injection_score, limits, moderation
from chat.safety.errors import InvalidInput as TextRefused
from chat.safety.input import check_user_text
from chat.safety.pii import redact
from chat.services import Accepted
from chat.snapshots import from_settings
from chat.streaming import DeltaSender, Emit
from feedback.versions import version_for
from monitoring import metrics
from monitoring.sentry import capture_exception as report_exception

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SendRequest:
    content: object
    client_msg_id: uuid.UUID
    conversation_id: int | None
    # The id as the client wrote it, echoed in its frames (an upper-case or
    # braced UUID comes back as sent); empty: the canonical form.
    client_msg_id_text: str = ""
    # Answer this finished last reply's question again (content is ignored).
    regenerate_id: int | None = None
    # Replace this earlier user message (and what followed) with `content`.
    edit_id: int | None = None


def check_message_text(text: object) -> str:
    """Return the user's text ready to store, or raise InvalidInput."""
    try:
        return check_user_text(text, max_chars=settings.CHAT_MAX_INPUT_CHARS)
    except TextRefused as exc:
        raise InvalidInput(exc.user_message) from None


@dataclass(frozen=True, slots=True)
class Prepared:
    """What the model call needs, read in the same trip as the accept."""

    history: list[ChatMessage]
    cache_key: str  # "" while the response cache is off
    cached: response_cache.CachedReply | None


async def chat_accept(
    *,
    owner: Owner | None,
    request: SendRequest,
    client_ip: str,
    then: Callable[[tuple[Accepted, Prepared | None]], object] | None = None,
) -> tuple[Accepted, Prepared | None]:
    """Check, limit and store a send; return it with what the reply needs.

    The checks that need no database run first; then one trip to the
    database thread checks limits, stores the message and its pending reply,
    and reads the history and the response cache, so the first token waits
    for one thread hop, not four. `then` gets the result on the event loop
    as soon as that trip is back, before the callers of a batched trip
    resume (chat/batching.py): the consumer starts the reply there.
    """
    if owner is None:
        raise Forbidden("Your session has expired. Reload the page to keep chatting.")
    if owner.is_anonymous and not settings.CHAT_ALLOW_ANONYMOUS:
        raise Forbidden("Please sign in to chat.")
    admit = functools.partial(
        _admit_batched, then=then, owner=owner, client_ip=client_ip, request=request
    )
    if request.regenerate_id is not None:
        return await admit(content="", injection=None, screen=None)
    content = check_message_text(request.content)
    moderator = moderation.moderator_from_settings()
    if isinstance(moderator, moderation.RulesModerator):
        # Scored and moderated in the admission trip (_screen_all), where a
        # burst's messages go through the patterns one after another.
        return await admit(content=content, injection=None, screen=moderator)
    # A moderation vendor is called from the event loop, before the trip.
    injection = injection_score(content)
    if _input_refused(injection, await moderator.check(content, stage="input")):
        await database_sync_to_async(limits.record_violation)(
            owner=owner, client_ip=client_ip, kind="blocked_input"
        )
        raise BlockedInput()
    return await admit(content=content, injection=injection, screen=None)


def _input_refused(injection: InjectionVerdict, verdict: moderation.Verdict | None) -> bool:
    """Return whether the input moderation or the injection score refuses a message."""
    if verdict is not None:
        metrics.moderation_blocked(verdict.stage, verdict.category)
        return True
    threshold = settings.CHAT_BLOCK_INJECTION_SCORE
    return threshold is not None and injection.score >= threshold


def _screen(
    *, owner: Owner, client_ip: str, content: str, screen: moderation.RulesModerator, **_: Any
) -> InjectionVerdict:
    """Score and moderate a message; refuse it, as a violation, with BlockedInput."""
    injection = injection_score(content)
    if _input_refused(injection, screen.check_now(content, stage="input")):
        limits.record_violation(owner=owner, client_ip=client_ip, kind="blocked_input")
        raise BlockedInput()
    return injection


def _screen_all(calls: list[Call], outcomes: list[Outcome | None]) -> None:
    """Screen the trip's messages that the event loop left to it (chat_accept).

    One after another, the patterns and their compiled programs stay in the
    CPU's caches: a message's injection score and input moderation took
    ~80 us when each was checked as its frame was read, between the server's
    other work, against ~40-50 us here (make bench (c), 1,000 messages at
    once, on a 2-core machine).
    A refused message gets its outcome; the others' scores go with them.
    """
    for i, call in enumerate(calls):
        if call.kwargs["screen"] is None:
            continue
        ok, value = call.run(_screen, **call.kwargs)
        if ok:
            call.kwargs["injection"] = value  # stored with the message
        else:
            outcomes[i] = (False, value)


def _store_send(
    *,
    owner: Owner,
    request: SendRequest,
    content: str,
    injection: InjectionVerdict | None,
    **_: Any,
) -> Accepted:
    # Both write inside their own transaction.atomic(), which within a batch's
    # transaction is a savepoint: a refused send (someone else's conversation,
    # a retried id) undoes only its own statements. (A savepoint is a round
    # trip on PostgreSQL, as BEGIN and COMMIT are; it adds no fsync.)
    if request.regenerate_id is not None:
        return services.reply_regenerate(
            owner=owner,
            reply_id=request.regenerate_id,
            client_msg_id=request.client_msg_id,
            version_for=version_for,
        )
    return services.message_accept(
        owner=owner,
        content=content,
        client_msg_id=request.client_msg_id,
        conversation_id=request.conversation_id,
        version_for=version_for,
        injection_score=injection.score if injection else None,
        injection_signals=list(injection.signals) if injection else [],
        edit_id=request.edit_id,
    )


def _ready(
    *,
    accepted: Accepted,
    reservation: limits.Reservation,
    content: str,
    cache_on: bool,
    client_msg_id: str,
) -> tuple[Accepted, Prepared | None]:
    echo = client_msg_id or accepted.client_msg_id
    if accepted.duplicate:
        # Nothing new will run: give the budget back at once.
        limits.budget_settle(reservation=reservation, cost_usd=Decimal("0"), tokens=0)
        return dataclasses.replace(accepted, client_msg_id=echo), None
    ready = dataclasses.replace(accepted, reservation=reservation, client_msg_id=echo)
    return ready, _prepare(accepted, content, cache_on=cache_on)


def _store_new_together(
    calls: list[Call],
    indexes: list[int],
    stored: dict[int, Accepted],
    outcomes: list[Outcome | None],
) -> None:
    """Store the batch's plain new messages with a few statements for them all.

    Edits and regenerations are left to _store_send, and so is every send of
    a lot that holds a retried client_msg_id: the lot is undone (its own
    savepoint) and each send is stored on its own, which answers the retry.
    """
    plain = [
        i
        for i in indexes
        if calls[i].kwargs["request"].edit_id is None
        and calls[i].kwargs["request"].regenerate_id is None
    ]
    if len(plain) < 2:
        return
    sends = []
    for i in plain:
        request, injection = calls[i].kwargs["request"], calls[i].kwargs["injection"]
        sends.append(
            services.NewMessage(
                owner=calls[i].kwargs["owner"],
                content=calls[i].kwargs["content"],
                client_msg_id=request.client_msg_id,
                conversation_id=request.conversation_id,
                injection_score=injection.score if injection else None,
                injection_signals=list(injection.signals) if injection else [],
            )
        )
    try:
        with transaction.atomic():
            results = services.messages_accept(sends=sends, version_for=version_for)
    except IntegrityError:
        return
    for i, result in zip(plain, results, strict=True):
        if isinstance(result, Accepted):
            stored[i] = result
        else:
            outcomes[i] = (False, result)


def _store_together(
    calls: list[Call],
    indexes: list[int],
    outcomes: list[Outcome | None],
    *,
    together: bool = True,
) -> tuple[dict[int, Accepted], list[int]]:
    """Store these sends in one transaction; return what was stored (or nothing), and what is left.

    A send that fails gets its outcome here. A lone send is stored as it
    always was, in its own transaction. Sends stored one by one (edits,
    regenerations, a lot with a retried id; all of them unless `together`)
    take a savepoint each; those beyond SAVEPOINTS_PER_COMMIT are left
    untried, for the next transaction.
    """
    stored: dict[int, Accepted] = {}
    left: list[int] = []
    try:
        with transaction.atomic() if len(indexes) > 1 else contextlib.nullcontext():
            if len(indexes) > 1 and together:
                _store_new_together(calls, indexes, stored, outcomes)
            one_by_one = 0
            for i in indexes:
                if i in stored or outcomes[i] is not None:
                    continue
                if one_by_one == SAVEPOINTS_PER_COMMIT:
                    left.append(i)
                    continue
                one_by_one += 1
                ok, value = calls[i].run(_store_send, **calls[i].kwargs)
                if ok:
                    stored[i] = value
                    continue
                outcomes[i] = (False, value)
                if isinstance(value, DatabaseError):
                    # The transaction may be aborted (PostgreSQL then turns
                    # the COMMIT into a silent ROLLBACK): fail them all rather
                    # than answer sends that were not stored.
                    raise value
    except Exception as exc:  # nothing of these is stored
        if isinstance(exc, IntegrityError) and len(indexes) > 1:
            # A constraint checked at the commit (a deferred foreign key: an
            # account deleted while one of its sockets was still open) failed
            # the whole lot. Each of its sends goes again in a transaction of
            # its own, so that only the one at fault fails.
            alone: dict[int, Accepted] = {}
            for i in indexes:
                if outcomes[i] is None and i not in left:
                    alone.update(_store_together(calls, [i], outcomes)[0])
            return alone, left
        for i in indexes:
            if outcomes[i] is None and i not in left:  # stored, or never tried
                outcomes[i] = (False, exc)
        return {}, left
    return stored, left


# Sends stored per transaction. New messages of a lot share one savepoint
# and three statements, so a lot's cost is mostly its round trips and its
# commit: on PostgreSQL 499 sends took a median of 142-169 ms in lots of 32
# and 89-125 ms in lots of 128 (in-process, seven trips each, two runs).
SENDS_PER_COMMIT = 128
# Sends stored one by one take a savepoint each (a send may take two), and
# on PostgreSQL a transaction with more than 64 subtransactions overflows
# every backend's subtransaction cache, which slows the visibility checks of
# every other session while it is open: at most this many a transaction.
SAVEPOINTS_PER_COMMIT = 32
# SQLite has no such cache, and each lot's transaction, savepoints,
# statements and commit cost ~0.4 ms: 1,000 sends in one trip took ~82 ms
# at 128 to a commit against ~96 ms at 32 (in-process, four runs each).
SQLITE_SENDS_PER_COMMIT = 128


def _sends_per_commit() -> int:
    """Return how many sends share a transaction on this database."""
    conn = connections[DEFAULT_DB_ALIAS]
    if conn.vendor != "sqlite":
        return SENDS_PER_COMMIT
    # A lot's messages are one INSERT, and an SQLite build may allow as few
    # as 999 parameters in a statement (before 3.32).
    conn.ensure_connection()
    variables = conn.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    fits = variables // len(Message._meta.concrete_fields)
    return max(1, min(SQLITE_SENDS_PER_COMMIT, fits))


def _admit_all(calls: list[Call]) -> list[Outcome]:
    """Admit the sends of one trip: limits, then transactions storing them, then history.

    Phase by phase, each send in its caller's context with its own outcome:
    0. the messages' injection score and input moderation, unless the event
       loop did them (_screen_all);
    1. limits, blocks and budget (the cache, which may be Redis: no
       database transaction is open across it; the SQLite cache commits the
       whole trip's counters at once, and the rate counts are one write);
    2. the admitted sends stored a lot to a transaction (_sends_per_commit): they
       share a commit, the write-ahead log's write and (on PostgreSQL) its
       fsync, instead of one a message. New messages share their INSERTs too
       (services.messages_accept: three statements for the lot); edits,
       regenerations and a lot with a retried id go one by one, each in its
       own savepoint;
    3. after the commits, what each reply needs: its history, then the
       response cache for the whole trip in one read (_look_up_cached).
    A send that is not stored gets its budget reservation back. If a commit
    fails, or a send fails with a database error (the transaction may be
    broken), none of that transaction's sends is stored and each gets the
    error.
    """
    outcomes: list[Outcome | None] = [None] * len(calls)
    reservations: dict[int, limits.Reservation] = {}
    _screen_all(calls, outcomes)
    refused = {i for i, outcome in enumerate(outcomes) if outcome is not None}
    try:
        # The whole trip's counters share one commit (the SQLite cache: a
        # commit cost ~0.6 ms in a burst, more than 32 sends' counters).
        with limits.counters_together():
            # Not refused by _screen_all: counted in their rate windows with
            # one write to the store, then checked one by one.
            todo = [i for i in range(len(calls)) if outcomes[i] is None]
            counts = limits.count_sends(
                [(calls[i].kwargs["owner"], calls[i].kwargs["client_ip"]) for i in todo]
            )
            for i, counted in zip(todo, counts, strict=True):
                call = calls[i]
                ok, value = call.run(
                    limits.check_send_limits,
                    owner=call.kwargs["owner"],
                    client_ip=call.kwargs["client_ip"],
                    counted=counted,
                    # A retry of a stored send is answered as a duplicate
                    # (below), not refused: asked only before a refusal.
                    resent=functools.partial(
                        services.send_stored,
                        owner=call.kwargs["owner"],
                        client_msg_id=call.kwargs["request"].client_msg_id,
                    ),
                )
                if ok:
                    reservations[i] = value
                else:
                    outcomes[i] = (False, value)
    except Exception as exc:  # the commit failed: none of these was counted
        reservations.clear()
        outcomes = [o if i in refused else (False, exc) for i, o in enumerate(outcomes)]
    stored: dict[int, Accepted] = {}
    admitted = list(reservations)
    per_commit = _sends_per_commit()
    for start in range(0, len(admitted), per_commit):
        lot, together = admitted[start : start + per_commit], True
        while lot:
            lot_stored, lot = _store_together(calls, lot, outcomes, together=together)
            stored.update(lot_stored)
            together = False  # what is left went one by one, and goes on so
    cache_on = bool(stored) and _response_cache_on()
    for i, reservation in reservations.items():
        if i in stored:
            ready = calls[i].run(
                _ready,
                accepted=stored[i],
                reservation=reservation,
                content=calls[i].kwargs["content"],
                cache_on=cache_on,
                client_msg_id=calls[i].kwargs["request"].client_msg_id_text,
            )
            outcomes[i] = ready
            if ready[0]:
                continue
        # No reply will run for this send: its reservation goes back.
        calls[i].run(limits.budget_settle, reservation=reservation, cost_usd=Decimal("0"), tokens=0)
    if cache_on:
        _look_up_cached(outcomes)
    # Every send has its outcome by now; none is ever dropped or shifted.
    return [o if o is not None else (False, RuntimeError("no outcome")) for o in outcomes]


def _response_cache_on() -> bool:
    """Return whether the response cache is on; off, and logged, if it cannot be asked."""
    try:
        return response_cache.cache_enabled()
    except Exception as exc:
        logger.warning("response cache unavailable (%s): no lookups", type(exc).__name__)
        return False


def _look_up_cached(outcomes: list[Outcome | None]) -> None:
    """Find the trip's prepared replies in the response cache, with one read for them all.

    A cache that cannot be read is a miss for every send: the model answers.
    """
    wanted: dict[int, str] = {}
    for i, outcome in enumerate(outcomes):
        if outcome is not None and outcome[0]:
            accepted, prepared = outcome[1]
            if prepared is not None and prepared.cache_key and not accepted.bypass_cache:
                wanted[i] = prepared.cache_key
    if not wanted:
        return
    try:
        found = response_cache.cache_lookup_many(
            list(dict.fromkeys(wanted.values())), switch_read=True
        )
    except Exception as exc:
        logger.warning("response cache unavailable (%s): no lookups", type(exc).__name__)
        return
    for i, key in wanted.items():
        hit = found.get(key)
        if hit is not None:
            accepted, prepared = outcomes[i][1]  # type: ignore[index]  # set above
            outcomes[i] = (True, (accepted, dataclasses.replace(prepared, cached=hit)))


# Messages that arrive together share trips to the database thread and a commit.
# A burst of sends goes in one trip (Batched._settle): a trip for its tail
# would run while the first replies stream, when trips are slow.
_admit_batched = Batched.grouped(_admit_all, settle=True)


def accepted_frame(accepted: Accepted) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "chat.accepted",
        "client_msg_id": accepted.client_msg_id,
        "conversation": accepted.conversation_id,
        "user_message": accepted.user_message_id,
        "message": accepted.reply_id,
        "model": accepted.model,
    }
    if accepted.duplicate:
        frame["duplicate"] = True
    return frame


class ClientGone(Exception):
    """The socket went away while a frame was being sent."""


@dataclass(slots=True)
class _Result:
    finish_reason: str = "error"
    error: ChatError | None = None
    outcome: CallOutcome | None = None
    verdict: moderation.Verdict | None = None
    cancelled: bool = False
    cached: bool = False
    # Characters the model sent, shown or not (a reply cut short is priced by them).
    received: int = 0
    # What the response cache keeps of a complete answer: the reply under its keys.
    remember: dict[str, response_cache.CachedReply] | None = None
    # The question as the semantic cache saw it (once its lookup is done), and
    # what it keeps of the answer.
    probe: Callable[[], semantic_cache.Probe | None] | None = None
    remember_semantic: tuple[semantic_cache.Probe, response_cache.CachedReply] | None = None


def _prepare(accepted: Accepted, content: str, *, cache_on: bool) -> Prepared:
    """Return the history to send and its response-cache key ("" while the cache is off).

    The cached reply, if any, is filled in for the whole trip at once
    (_look_up_cached).
    """
    if accepted.conversation_created:
        # Nothing came before the message just stored: no need to read it back.
        history = [ChatMessage(role="user", content=content)]
        if accepted.plan_system_prompt:
            history.insert(0, ChatMessage(role="system", content=accepted.plan_system_prompt))
    else:
        history = selectors.history_for_model(
            conversation_id=accepted.conversation_id,
            upto_message_id=accepted.user_message_id,
            budget_tokens=settings.CHAT_CONTEXT_TOKENS,
            system_prompt=accepted.plan_system_prompt,
        )
    # With the cache off there is nothing to look up or store: no key either.
    key = ""
    if cache_on:
        key = response_cache.response_key(
            plan=accepted.plan, version_id=accepted.version_id, history=history
        )
    if settings.CHAT_REDACT_VENDOR_TEXT:
        # Personal data stays here: the vendor sees typed placeholders.
        history = [ChatMessage(role=m.role, content=redact(m.content)) for m in history]
    return Prepared(history=history, cache_key=key, cached=None)


def _last_resort(history: list[ChatMessage]) -> Callable[[], Awaitable[str | None]]:
    """Return the call path's last resort: an earlier answer to the same question."""

    async def cached_answer() -> str | None:
        key = response_cache.last_resort_key(history)
        hit = await database_sync_to_async(response_cache.cache_lookup)(key)
        return hit.text if hit is not None else None

    return cached_answer


async def _semantic_lookup(
    accepted: Accepted, history: list[ChatMessage]
) -> tuple[response_cache.CachedReply | None, Callable[[], semantic_cache.Probe | None] | None]:
    """Return an earlier answer to the same question in other words, if any.

    A semantic cache that fails is a miss, logged: the model answers.
    """
    try:
        return await semantic_cache.lookup_async(
            plan=accepted.plan, version_id=accepted.version_id, history=history
        )
    except Exception as exc:
        logger.warning("semantic cache unavailable (%s): the model answers", type(exc).__name__)
        return None, None


async def _replay_cached(
    accepted: Accepted, hit: response_cache.CachedReply, *, outcome: str = "cache"
) -> AsyncGenerator[str | CallOutcome, None]:
    """Stream a cached reply like a model would, at memory speed."""
    size = settings.CHAT_RESPONSE_CACHE_CHUNK_CHARS
    for start in range(0, len(hit.text), size):
        yield hit.text[start : start + size]
    yield CallOutcome(
        model=accepted.plan.model,
        usage=Usage(prompt_tokens=hit.prompt_tokens, completion_tokens=hit.completion_tokens),
        path=[{"model": accepted.plan.model, "outcome": outcome}],
    )


@dataclass(frozen=True, slots=True)
class _StreamingSettings:
    """How a reply's text is coalesced into frames and held for moderation."""

    coalesce_s: float
    coalesce_max_chars: int
    window_tokens: int
    window_chars: int
    context_chars: int
    first_window_tokens: int
    max_hold_s: float
    reply_max_s: float


@from_settings
def _streaming_settings() -> _StreamingSettings:
    """Return the streaming settings, read once and again after a settings change.

    Every reply's start reads them (eight settings, ~6 us on the event loop
    on a 2-core machine; a burst starts a thousand replies at once).
    """
    return _StreamingSettings(
        coalesce_s=settings.CHAT_COALESCE_MS / 1000,
        coalesce_max_chars=settings.CHAT_COALESCE_MAX_CHARS,
        window_tokens=settings.CHAT_MODERATION_WINDOW_TOKENS,
        window_chars=settings.CHAT_MODERATION_WINDOW_CHARS,
        context_chars=settings.CHAT_MODERATION_CONTEXT_CHARS,
        first_window_tokens=settings.CHAT_MODERATION_FIRST_WINDOW_TOKENS,
        max_hold_s=settings.CHAT_MODERATION_MAX_HOLD_MS / 1000,
        reply_max_s=settings.CHAT_REPLY_MAX_SECONDS,
    )


async def reply_run(
    *,
    accepted: Accepted,
    emit: Emit,
    started_at: float,
    buffer: ReplyBuffer,
    prepared: Prepared,
) -> None:
    """Acknowledge the send, then generate, stream and store one reply.

    Never raises except CancelledError. The `chat.accepted` frame goes out
    right after the model call has begun, and before any other frame of the
    reply: when a thousand sends are stored together, every model call
    starts before the thousand acknowledgements are written, and those are
    written while the models think (make bench (c), docs/benchmarks.md).
    Deltas go to the reply's replay buffer (for resumes and other listeners)
    and straight to the socket that asked. A dropped socket does not stop the
    reply unless CHAT_CANCEL_ON_DISCONNECT; cancelling the task (Stop) ends
    the upstream call at once and stores exactly the text that was sent, with
    finish reason `cancelled`.
    """
    loop = asyncio.get_running_loop()
    origin_attached = True

    async def acknowledge() -> BaseException | None:
        try:
            await emit(accepted_frame(accepted))
        except Exception as exc:
            return exc
        return None

    # Queued now, it runs once this task waits for the model's first token.
    acknowledged = loop.create_task(acknowledge())

    async def to_origin(frame: dict[str, Any]) -> None:
        nonlocal origin_attached
        if not origin_attached:
            return
        # Shielded: a Stop while the acknowledgement is being written must
        # not cut it off.
        failed = await asyncio.shield(acknowledged)
        try:
            if failed is not None:
                raise failed
            await emit(frame)
        except Exception as exc:
            origin_attached = False
            if settings.CHAT_CANCEL_ON_DISCONNECT:
                raise ClientGone() from exc

    async def publish(frame: dict[str, Any]) -> None:
        hub.publish_delta(buffer, frame["text"])
        await to_origin(frame)

    async def on_queued(position: int) -> None:
        await to_origin({"type": "chat.queued", "message": accepted.reply_id, "position": position})

    streaming = _streaming_settings()
    sender = DeltaSender(
        emit=publish,
        message_id=accepted.reply_id,
        window=streaming.coalesce_s,
        max_chars=streaming.coalesce_max_chars,
    )
    gate = moderation.OutputGate(
        window_tokens=streaming.window_tokens,
        window_chars=streaming.window_chars,
        context_chars=streaming.context_chars,
        first_window_tokens=streaming.first_window_tokens,
        clock=loop.time,
        max_hold_s=streaming.max_hold_s,
        # Windows grow while text arrives faster than the socket sends it.
        fast_s=streaming.coalesce_s,
    )
    result = _Result()
    metrics.stream_started()
    try:
        history, cache_key, hit = prepared.history, prepared.cache_key, prepared.cached
        # A cache that is off is skipped, not missed: the hit ratio stays true.
        checked = ("hit" if hit else "miss") if cache_key else "skip"
        if hit is None and cache_key and not accepted.bypass_cache and semantic_cache.enabled():
            hit, result.probe = await _semantic_lookup(accepted, history)
            if hit is not None:
                checked = "semantic_hit"
        metrics.cache_checked(checked)
        if hit is not None:
            result.cached = True
            stream = _replay_cached(
                accepted, hit, outcome="semantic-cache" if checked == "semantic_hit" else "cache"
            )
        else:
            stream = call_model(
                accepted.plan,
                history,
                owner_key=accepted.owner_key,
                on_queued=on_queued,
                cached_answer=_last_resort(history),
                on_streaming=lambda progress: setattr(result, "outcome", progress),
            )
        try:
            # No reply runs longer than this, queueing, retries and fallbacks
            # included: the reaper fails a reply still pending past it.
            async with asyncio.timeout_at(started_at + streaming.reply_max_s):
                async with contextlib.aclosing(stream):  # closes the vendor's stream at once
                    async for event in stream:
                        if isinstance(event, CallOutcome):
                            result.outcome = event
                            result.cached = result.cached or event.cached
                            if event.error is None:
                                # All the text is in: show the last of it now,
                                # not after the call path's bookkeeping.
                                for safe in await gate.finish():
                                    await sender.push(safe)
                                await sender.close(deliver=True)
                            continue
                        result.received += len(event)
                        for safe in await gate.feed(event):
                            await sender.push(safe)
        except TimeoutError:
            logger.warning("reply %s ran past CHAT_REPLY_MAX_SECONDS", accepted.reply_id)
            raise Timeout() from None
        for safe in await gate.finish():
            await sender.push(safe)
        await sender.close(deliver=True)
        usage = result.outcome.usage if result.outcome else None
        result.finish_reason = usage.finish_reason if usage else "stop"
        # Only the version's own model answers for the version: a fallback's
        # answer is not cached under the primary's key.
        fallback = result.outcome is not None and result.outcome.fallback
        if (
            cache_key
            and not (result.cached or fallback)
            and result.finish_reason == "stop"
            and usage
        ):
            # Stored with the reply, in its trip to the database thread.
            reply = response_cache.CachedReply(
                text=sender.text,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
            )
            result.remember = dict.fromkeys(
                (cache_key, response_cache.last_resort_key(history)), reply
            )
            probe = result.probe() if result.probe is not None else None
            if probe is not None:
                result.remember_semantic = (probe, reply)
    except asyncio.CancelledError:
        result.cancelled = True
        result.finish_reason = "cancelled"
    except ClientGone:
        result.finish_reason = "cancelled"
    except moderation.Moderated as flagged:
        result.finish_reason = "moderated"
        result.verdict = flagged.verdict
        metrics.moderation_blocked(flagged.verdict.stage, flagged.verdict.category)
    except ChatError as exc:
        result.error = exc
        logger.warning("reply %s failed: %s", accepted.reply_id, exc.code)
    except Exception as exc:
        result.error = Internal()
        logger.exception("reply %s: unexpected failure", accepted.reply_id)
        report_exception(exc)
    finally:
        metrics.stream_ended()
        # Text the model already produced still reaches the user on a failure,
        # once moderation has passed it; on a cancel or a flag, nothing more.
        if result.finish_reason == "error":
            with contextlib.suppress(Exception):
                for safe in await gate.finish():
                    await sender.push(safe)
        with contextlib.suppress(ClientGone):
            await sender.close(deliver=result.finish_reason == "error")

    async def end() -> None:
        done = await _store(
            accepted,
            result,
            sender,
            history=prepared.history,
            started_at=started_at,
            now=loop.time(),
        )
        hub.publish_done(buffer, done)
        with contextlib.suppress(Exception):
            if result.error is not None:
                await to_origin(result.error.frame(client_msg_id=accepted.client_msg_id))
            await to_origin(done)

    # Once the reply is ending, a second cancel (Stop clicked twice, a stop
    # from another process seen on two polls, a server shutting down) must
    # not cut off its row, its budget or its last frame: the user would wait
    # for a chat.done that never comes.
    ending = loop.create_task(end())
    while not ending.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(ending)
    ending.result()
    if result.cancelled:
        raise asyncio.CancelledError()


async def _store(
    accepted: Accepted,
    result: _Result,
    sender: DeltaSender,
    *,
    history: list[ChatMessage],
    started_at: float,
    now: float,
) -> dict[str, Any]:
    """Finish the reply row, settle the budget, count it; return the done frame."""
    outcome = result.outcome
    usage = _usage(result, history)
    model = outcome.model if outcome else accepted.model
    ttft_ms = (
        None if sender.first_sent_at is None else round((sender.first_sent_at - started_at) * 1000)
    )
    latency_ms = round((now - started_at) * 1000)
    finish_kwargs: dict[str, Any] = {
        "reply_id": accepted.reply_id,
        "content": sender.text,
        "finish_reason": result.finish_reason,
        "model": model,
        "ttft_ms": ttft_ms,
        "latency_ms": latency_ms,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "usage_estimated": bool(usage and usage.estimated),
        "cost_usd": Decimal("0"),
        "error_code": result.error.code if result.error else "",
        "call_path": outcome.path if outcome else [],
        "moderation": result.verdict.as_json() if result.verdict else None,
        "cached": result.cached,
    }
    priced = usage is not None and not result.cached
    # The store must happen even while this task is being cancelled again.
    cost = await asyncio.shield(
        _finish_with_retries(
            accepted=accepted,
            finish_kwargs=finish_kwargs,
            priced=priced,
            remember=result.remember if result.finish_reason == "stop" else None,
            remember_semantic=(
                result.remember_semantic if result.finish_reason == "stop" else None
            ),
        )
    )
    if cost is None:
        # Not stored: the user hears so, and the reaper fails the row later
        # with the text kept for it (and counts it then, in the metrics).
        result.error = Internal("Your reply could not be saved. Please try again.")
        result.finish_reason = "error"
        cost = Decimal("0")
    else:
        metrics.reply_observed(
            # An earlier answer given when every model failed is counted as
            # the cache's, not as the failed primary's success.
            model=LAST_RESORT if outcome is not None and outcome.cached else model,
            outcome=result.finish_reason,
            ttft_s=None if ttft_ms is None else ttft_ms / 1000,
            duration_s=latency_ms / 1000,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cost_usd=float(cost),
            error_code=result.error.code if result.error else "",
        )
    return {
        "type": "chat.done",
        "message": accepted.reply_id,
        "finish_reason": result.finish_reason,
        "model": model,
        "cached": result.cached,
        "usage": {
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
        },
        "cost_usd": float(cost),
        "ttft_ms": ttft_ms,
        "latency_ms": latency_ms,
    }


class ReplyNotStored(Exception):
    """A finished reply's row could not be written (reported with the error's type only)."""


# Seconds to wait before each new try at storing a finished reply: a
# database that is locked or failing over for a moment costs no reply.
FINISH_RETRY_DELAYS_S = (0.2, 1.0, 3.0)


async def _finish_with_retries(*, accepted: Accepted, **kwargs: Any) -> Decimal | None:
    """Store the finished reply and settle its budget; return its cost, or None if not stored.

    A reply whose store fails every try is logged and reported (its id and
    the error's type, never its text). Its row stays pending until the
    reaper fails it, as for a process that died (monitoring.services
    .replies_reap), and its text waits for the reaper in the cache.
    """
    for delay in (*FINISH_RETRY_DELAYS_S, None):
        try:
            cost: Decimal = await _finish_batched(accepted=accepted, **kwargs)
            return cost
        except Exception as exc:
            if delay is None:
                logger.error(
                    "reply %s could not be stored: %s", accepted.reply_id, type(exc).__name__
                )
                # Not the error itself: a database's message may quote the row.
                report_exception(ReplyNotStored(type(exc).__name__))
                text = kwargs["finish_kwargs"]["content"]
                if text:
                    with contextlib.suppress(Exception):
                        await sync_to_async(store_partials, thread_sensitive=False)(
                            {partial_key(accepted.reply_id): text}
                        )
                return None
            logger.warning(
                "reply %s not stored yet (%s); trying again in %.1f s",
                accepted.reply_id,
                type(exc).__name__,
                delay,
            )
            await asyncio.sleep(delay)
    return None


def _usage(result: _Result, history: list[ChatMessage]) -> Usage | None:
    """Return the tokens a reply used, as the vendor bills them.

    A cached answer used none. A reply stopped, dropped or cut by moderation
    after the model began never gets the vendor's count, which comes last;
    the vendor still billed the prompt and what it sent, so both are
    estimated (as for a reply that failed halfway), and priced: otherwise a
    Stop near the end of every reply would spend past any budget for free.
    """
    outcome = result.outcome
    if result.cached:
        return Usage(prompt_tokens=0, completion_tokens=0) if outcome else None
    if outcome is None:
        return None
    if outcome.usage is None and result.received:
        return estimated_usage(history, result.received)
    return outcome.usage


def _price(*, finish_kwargs: dict[str, Any], priced: bool, **_: Any) -> dict[str, Any]:
    """Give finish_kwargs the reply's cost; return them."""
    if priced:
        usage = Usage(
            prompt_tokens=finish_kwargs["prompt_tokens"] or 0,
            completion_tokens=finish_kwargs["completion_tokens"] or 0,
        )
        finish_kwargs["cost_usd"] = reply_cost(
            model=finish_kwargs["model"], usage=usage, at=timezone.now()
        )
    return finish_kwargs


def _finish_reply(**kwargs: Any) -> None:
    """Price the reply and store it (finish_kwargs gets its cost)."""
    services.reply_finish(**_price(**kwargs))


def _settle(*, accepted: Accepted, finish_kwargs: dict[str, Any], **_: Any) -> Decimal:
    """Settle the reply's budget reservation with what it cost; return the cost."""
    if accepted.reservation is not None:
        limits.budget_settle(
            reservation=accepted.reservation,
            cost_usd=finish_kwargs["cost_usd"],
            tokens=(finish_kwargs["prompt_tokens"] or 0)
            + (finish_kwargs["completion_tokens"] or 0),
        )
    return Decimal(finish_kwargs["cost_usd"])


# Finished replies per transaction: their lot is one `executemany`, with no
# savepoints (unlike a lot of sends) and no limit on bound parameters.
FINISHES_PER_COMMIT = 256


def _finish_all(calls: list[Call]) -> list[Outcome]:
    """Store the finished replies of one trip, a lot to a commit; then settle.

    Replies that end together (a burst's, which stream in step) share a
    commit instead of paying one each (on PostgreSQL an fsync each), and one
    call to the driver for their UPDATEs: a statement each through Django's
    cursor held the database thread, and with it the GIL the event loop
    needs to send the other replies' last words, ~50 us a reply. A lot
    whose transaction fails for any reason is stored again reply by reply,
    each in a transaction of its own, so one bad row never costs the others
    their text; a reply finished twice is a no-op (services.reply_finish).
    Budgets are settled after the commits: the cache may be Redis, and no
    transaction stays open across it. Then the stored replies that the
    response cache keeps go to it in one write (one commit on SQLite; a
    thousand replies that end together used to make a thousand trips and two
    thousand commits). A cache that cannot be written costs a reply nothing.
    """
    stored: list[Outcome | None] = [None] * len(calls)
    per_commit = FINISHES_PER_COMMIT
    for start in range(0, len(calls), per_commit):
        lot = range(start, min(start + per_commit, len(calls)))
        if len(lot) > 1:
            try:
                with transaction.atomic():
                    priced = []
                    for i in lot:
                        ok, value = calls[i].run(_price, **calls[i].kwargs)
                        if not ok:
                            raise value
                        priced.append(value)
                    services.replies_finish(priced)
                for i in lot:
                    stored[i] = (True, None)
                continue
            except Exception:  # nothing of this lot is stored: one by one below
                for i in lot:
                    stored[i] = None
        for i in lot:
            stored[i] = calls[i].run(_finish_reply, **calls[i].kwargs)
    outcomes: list[Outcome] = []
    for call, result in zip(calls, stored, strict=True):
        if result is None or not result[0]:
            outcomes.append(result or (False, RuntimeError("no outcome")))
            continue
        outcomes.append(call.run(_settle, **call.kwargs))
    remembered: dict[str, response_cache.CachedReply] = {}
    replies = 0
    for call, result in zip(calls, stored, strict=True):
        if result is not None and result[0] and call.kwargs.get("remember"):
            remembered.update(call.kwargs["remember"])
            replies += 1
    _keep("response cache", response_cache.cache_store_many, remembered, replies=replies)
    semantic = [
        call.kwargs["remember_semantic"]
        for call, result in zip(calls, stored, strict=True)
        if result is not None and result[0] and call.kwargs.get("remember_semantic")
    ]
    _keep("semantic cache", semantic_cache.store_many, semantic, replies=len(semantic))
    return outcomes


def _keep(name: str, store: Callable[[Any], None], answers: Any, *, replies: int) -> None:
    """Hand a trip's answers to a cache in one write; a cache that fails costs a reply nothing."""
    if not answers:
        return
    try:
        store(answers)
    except Exception as exc:
        logger.warning(
            "%s unavailable (%s): the answers of %d replies not kept",
            name,
            type(exc).__name__,
            replies,
        )


# Replies that end together share trips to the database thread and commits.
_finish_batched = Batched.grouped(_finish_all)
