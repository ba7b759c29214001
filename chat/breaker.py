"""A circuit breaker per `provider:model`, shared by every process through the cache.

closed: calls go through; failures are counted (consecutive, and per time
bucket for a failure rate over a window). It opens after
CHAT_BREAKER_FAILURES consecutive failures, or when at least
CHAT_BREAKER_MIN_VOLUME calls in the last CHAT_BREAKER_WINDOW_S seconds failed
at CHAT_BREAKER_FAILURE_RATE or more.
open: calls are refused at once (the call path goes to the fallbacks).
half-open: after CHAT_BREAKER_COOLDOWN_S, up to CHAT_BREAKER_PROBES calls are
let through; a success closes the breaker, a failure opens it again.

The state lives in Django's cache: Redis in the scaled mode, the shared SQLite
cache in the embedded one, so every process sees the same breaker. Updates are
single increments or writes, not transactions: two processes recording at the
same instant may both open the breaker, which is harmless.

The `ai_circuit_open` gauge is read from that shared state when /metrics is
scraped (`circuits_open`), not written by the process that opened or closed a
breaker: a process that opened one and another that closed it would otherwise
each report their own last word.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterator

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache

from chat import clock

logger = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_BUCKET_S = 10
# Models seen by this process, so the health page can list them.
_seen: set[str] = set()
LOCAL_TRUST_S = 1.0
# model -> wall time until which this process trusts "closed" (see acheck_allowed).
_trusted_closed: dict[str, float] = {}


def _key(model: str, part: str) -> str:
    return f"breaker:{model}:{part}"


# Models outside the configured ones whose breaker has opened, in any
# process: one model a slot of the shared cache, so that /metrics on every
# process lists the same models (one written with `add`, so two processes
# never take the same slot). Bounded like the metrics' model labels; a slot
# is kept until the cache is emptied, so a model keeps its series (at 0)
# after its breaker closes.
_REGISTRY_SLOTS = 16


def _registry_keys() -> list[str]:
    return [f"breaker:models:{i}" for i in range(_REGISTRY_SLOTS)]


def _configured() -> list[str]:
    return [m for m in (settings.CHAT_MODEL, *settings.CHAT_FALLBACK_MODELS) if m]


def _register(model: str) -> None:
    """Remember in the shared cache that `model`'s breaker has opened, while a slot is free."""
    if model in _configured():
        return  # always listed
    keys = _registry_keys()
    held = cache.get_many(keys)
    if model in held.values():
        return
    for key in keys:
        if key in held:
            continue
        if cache.add(key, model, timeout=None) or cache.get(key) == model:
            return
    logger.warning("%s is not in ai_circuit_open: %d other models hold its slots", model, len(keys))


def _registered() -> list[str]:
    return sorted({str(m) for m in cache.get_many(_registry_keys()).values()})


def _incr(key: str, ttl: float | None, delta: int = 1) -> int:
    # incr on a missing key raises; add() is a no-op when it exists.
    cache.add(key, 0, timeout=ttl)
    try:
        return int(cache.incr(key, delta))
    except ValueError:  # expired between add and incr
        cache.set(key, delta, timeout=ttl)
        return delta


def _buckets(now: float) -> list[int]:
    window = max(1, math.ceil(settings.CHAT_BREAKER_WINDOW_S / _BUCKET_S))
    current = int(now // _BUCKET_S)
    return [current - i for i in range(window)]


def check_allowed(*, model: str, now: float) -> tuple[bool, str]:
    """Return (may call, state) and take a probe slot when half-open."""
    _seen.add(model)
    opened_at = cache.get(_key(model, "opened_at"))
    if opened_at is None:
        return True, CLOSED
    if now < opened_at + settings.CHAT_BREAKER_COOLDOWN_S:
        return False, OPEN
    probes = _incr(_key(model, f"probes:{opened_at}"), settings.CHAT_BREAKER_COOLDOWN_S * 10)
    return probes <= settings.CHAT_BREAKER_PROBES, HALF_OPEN


def record_result(*, model: str, ok: bool, now: float) -> str:
    """Count one call's result; return the state afterwards."""
    ttl = settings.CHAT_BREAKER_WINDOW_S + 2 * _BUCKET_S
    known = cache.get_many([_key(model, "opened_at"), _key(model, "consecutive")])
    opened_at = known.get(_key(model, "opened_at"))
    bucket = int(now // _BUCKET_S)
    _incr(_key(model, f"calls:{bucket}"), ttl)
    if ok:
        if opened_at is not None:
            _close(model)
        elif known.get(_key(model, "consecutive")):
            cache.set(_key(model, "consecutive"), 0, timeout=None)
        return CLOSED
    _incr(_key(model, f"failures:{bucket}"), ttl)
    consecutive = _incr(_key(model, "consecutive"), None)
    if opened_at is not None:
        if now >= opened_at + settings.CHAT_BREAKER_COOLDOWN_S:
            _open(model, now)  # a failed probe: open again for another cooldown
        return OPEN
    if consecutive >= settings.CHAT_BREAKER_FAILURES or _rate_exceeded(model, now):
        _open(model, now)
        return OPEN
    return CLOSED


def _rate_exceeded(model: str, now: float) -> bool:
    buckets = _buckets(now)
    keys = [_key(model, f"{kind}:{b}") for b in buckets for kind in ("calls", "failures")]
    counts = cache.get_many(keys)
    calls = sum(int(counts.get(_key(model, f"calls:{b}"), 0)) for b in buckets)
    failures = sum(int(counts.get(_key(model, f"failures:{b}"), 0)) for b in buckets)
    return (
        calls >= settings.CHAT_BREAKER_MIN_VOLUME
        and failures / calls >= settings.CHAT_BREAKER_FAILURE_RATE
    )


def _open(model: str, now: float) -> None:
    _trusted_closed.pop(model, None)
    cache.set(_key(model, "opened_at"), now, timeout=None)
    logger.warning("circuit breaker for %s is open", model)
    try:
        _register(model)
    except Exception:  # the breaker is open; only its gauge may miss it
        logger.warning("could not list %s for ai_circuit_open", model, exc_info=True)


def _close(model: str) -> None:
    buckets = _buckets(clock.current().wall())
    cache.delete_many(
        [_key(model, "opened_at"), _key(model, "consecutive")]
        + [_key(model, f"{kind}:{b}") for b in buckets for kind in ("calls", "failures")]
    )
    logger.info("circuit breaker for %s is closed again", model)


def _state(opened_at: float | None, now: float) -> str:
    if opened_at is None:
        return CLOSED
    return OPEN if now < opened_at + settings.CHAT_BREAKER_COOLDOWN_S else HALF_OPEN


def state_of(*, model: str, now: float) -> str:
    """Return "closed", "open" or "half_open" without taking a probe slot."""
    return _state(cache.get(_key(model, "opened_at")), now)


def _states(models: list[str]) -> dict[str, str]:
    """Return each model's state, read in one trip to the cache."""
    now = clock.current().wall()
    opened = cache.get_many([_key(model, "opened_at") for model in models])
    return {model: _state(opened.get(_key(model, "opened_at")), now) for model in models}


def breaker_states() -> dict[str, str]:
    """Return each known model's breaker state: configured, opened anywhere, or seen here."""
    return _states(list(dict.fromkeys([*_configured(), *_registered(), *sorted(_seen)])))


def circuits_open() -> dict[str, bool]:
    """Return whether each model's breaker is open, as every process sees it.

    For the `ai_circuit_open` gauge: the configured models and those whose
    breaker has opened in any process, but not the ones only this process
    has called, so that every process lists the same models. Half-open
    counts as open: calls are still refused but for the probes, and the
    gauge drops to 0 when a probe closes the breaker.
    """
    states = _states(list(dict.fromkeys([*_configured(), *_registered()])))
    return {model: state != CLOSED for model, state in states.items()}


# The cache is network I/O in the scaled mode: keep it off the event loop, and
# off the single ORM thread too (thread_sensitive=False).
_check_in_thread = sync_to_async(check_allowed, thread_sensitive=False)


async def acheck_allowed(*, model: str, now: float) -> tuple[bool, str]:
    """Async twin of `check_allowed`.

    A closed breaker seen within the last LOCAL_TRUST_S seconds is trusted
    without asking the cache again: that spares every reply a round trip
    before its first token, at the price of another process noticing an open
    breaker up to a second late. This process drops the trust when it opens
    the breaker itself.
    """
    if _trusted_closed.get(model, -math.inf) > now:
        return True, CLOSED
    if await _after_trip_in_flight(model) and _trusted_closed.get(model, -math.inf) > now:
        return True, CLOSED
    with _trip(model):
        try:
            allowed, state = await _check_in_thread(model=model, now=now)
        except Exception as exc:
            # The shared state cannot be read (Redis down): the model is
            # called, as a closed breaker would let it, and the cache is
            # asked again a second later rather than by every reply. Its
            # retries and fallbacks still handle a model that fails.
            _store_down("check", exc)
            allowed, state = True, CLOSED
    if state == CLOSED:
        _trusted_closed[model] = now + LOCAL_TRUST_S
    return allowed, state


# This process's trip to the shared state of a model, while one runs. When
# the trust has lapsed, a burst of calls (a thousand replies that started or
# ended together) would each make that trip, and queue for the threads and
# the cache's write lock. They wait for the one in flight instead: if it saw
# the breaker closed they go on trusting it, else they make their own trip
# (a half-open breaker hands out one probe slot a trip).
_in_flight: dict[str, asyncio.Future[None]] = {}


@contextlib.contextmanager
def _trip(model: str) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    running = _in_flight.get(model)
    if running is not None and running.get_loop() is loop:
        yield  # another trip runs: the waiters keep waiting for that one
        return
    done = _in_flight[model] = loop.create_future()
    try:
        yield
    finally:
        if _in_flight.get(model) is done:
            del _in_flight[model]
        done.set_result(None)


async def _after_trip_in_flight(model: str) -> bool:
    """Wait for this process's trip for `model` if one runs; return whether one did."""
    done = _in_flight.get(model)
    if done is None or done.get_loop() is not asyncio.get_running_loop():
        return False
    await asyncio.shield(done)
    return True


# Monotonic time of this process's last warning that the shared state failed.
_warned_at = -math.inf
_WARN_EVERY_S = 30.0


def _store_down(what: str, exc: Exception) -> None:
    """Log, at most every _WARN_EVERY_S per process, that the breaker's store failed."""
    global _warned_at
    now = time.monotonic()
    if now - _warned_at >= _WARN_EVERY_S:
        _warned_at = now
        logger.warning(
            "circuit breaker state unavailable (%s, on %s): calls go through as if closed",
            type(exc).__name__,
            what,
        )


# Successes while the breaker is trusted closed and this process has seen no
# failure since its last full-path success: counted here and added to the
# shared counters in one batch at most LOCAL_TRUST_S later, instead of two
# cache writes per reply. A failure first adds this process's batch (and
# resets the consecutive count if the batch held a success), so the failure
# rate and the consecutive count this process sees are exact; other
# processes see its successes up to a second late.
_pending_ok: dict[tuple[str, int], int] = {}
_failed_since_success: set[str] = set()
_flush_handle: asyncio.TimerHandle | None = None


def _take_pending(model: str | None = None) -> dict[tuple[str, int], int]:
    taken = {k: n for k, n in _pending_ok.items() if model is None or k[0] == model}
    for key in taken:
        del _pending_ok[key]
    return taken


def add_successes(batch: dict[tuple[str, int], int]) -> None:
    """Count a batch of successes: each bucket's calls, and the consecutive reset."""
    ttl = settings.CHAT_BREAKER_WINDOW_S + 2 * _BUCKET_S
    for (model, bucket), count in batch.items():
        _incr(_key(model, f"calls:{bucket}"), ttl, count)
    for model in {model for model, _bucket in batch}:
        if cache.get(_key(model, "consecutive")):
            cache.set(_key(model, "consecutive"), 0, timeout=None)


def _record_after(batch: dict[tuple[str, int], int], model: str, ok: bool, now: float) -> str:
    if batch:
        add_successes(batch)
    return record_result(model=model, ok=ok, now=now)


_record_in_thread = sync_to_async(_record_after, thread_sensitive=False)
_add_in_thread = sync_to_async(add_successes, thread_sensitive=False)


async def arecord_result(*, model: str, ok: bool, now: float) -> str:
    """Async twin of `record_result`; successes may be counted in a batch (see above)."""
    if ok and _may_batch(model, now):
        _batch_success(model, now)
        return CLOSED
    if ok and await _after_trip_in_flight(model) and _may_batch(model, now):
        _batch_success(model, now)
        return CLOSED
    if ok:
        _failed_since_success.discard(model)
    else:
        _failed_since_success.add(model)
    with _trip(model):
        try:
            state = await _record_in_thread(_take_pending(model), model, ok, now)
        except Exception as exc:
            # Not counted: the reply's own outcome does not depend on it.
            _store_down("count", exc)
            state = CLOSED
    if ok and state == CLOSED:
        # Just seen closed: trusted as acheck_allowed trusts it, so the next
        # second's successes are batched. Without this, replies that outlive
        # the trust (any longer than a second) each paid a trip here before
        # their last words could be sent (make bench (c): the longest gap).
        _trusted_closed[model] = now + LOCAL_TRUST_S
    return state


def _may_batch(model: str, now: float) -> bool:
    return model not in _failed_since_success and _trusted_closed.get(model, -math.inf) > now


def _batch_success(model: str, now: float) -> None:
    key = (model, int(now // _BUCKET_S))
    _pending_ok[key] = _pending_ok.get(key, 0) + 1
    _schedule_flush()


def _schedule_flush() -> None:
    global _flush_handle
    if _flush_handle is None:
        loop = asyncio.get_running_loop()
        _flush_handle = loop.call_later(LOCAL_TRUST_S, _flush_soon)


def _flush_soon() -> None:
    global _flush_handle
    _flush_handle = None
    task = asyncio.ensure_future(aflush())
    _flushes.add(task)
    task.add_done_callback(_flushes.discard)


_flushes: set[asyncio.Future[None]] = set()


async def aflush() -> None:
    """Count this process's batched successes now."""
    global _flush_handle
    if _flush_handle is not None:
        _flush_handle.cancel()
        _flush_handle = None
    batch = _take_pending()
    if batch:
        await _flush(batch)


async def _flush(batch: dict[tuple[str, int], int]) -> None:
    try:
        await _add_in_thread(batch)
    except Exception:
        logger.warning("could not count %d successful calls in the breaker", sum(batch.values()))


def forget_local_state() -> None:
    """Drop what this process remembers (tests start each case with nothing)."""
    global _flush_handle
    _seen.clear()
    _trusted_closed.clear()
    _pending_ok.clear()
    _failed_since_success.clear()
    _in_flight.clear()
    if _flush_handle is not None:
        _flush_handle.cancel()
        _flush_handle = None
