"""Prometheus metrics (SPEC names). Every function here is cheap and never raises.

Several processes serve (uvicorn workers, Celery workers), so when
`PROMETHEUS_MULTIPROC_DIR` is set (the run scripts set and clear it) every
process writes its samples to files there and `/metrics` adds them up
(prometheus-client's multiprocess mode). `ai_circuit_open` is the exception:
it is read from the breakers' shared state at each scrape. Labels are
bounded: models outside the configured ones collapse into a small
per-process allowance and then "other", codes and outcomes outside the
SPEC's closed sets become "other", and no label ever holds a user id or text.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import threading
import time
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client import values as _values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# In multiprocess mode every update asks os.getpid() whether the process has
# forked, and that is a system call each time (glibc no longer caches it):
# about ten a reply. The pid is kept here and refreshed in a forked child
# (Celery's prefork pool), which is all the check needs.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _values.ValueClass = _values.MultiProcessValue(lambda: _pid)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, float("inf"))
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, float("inf"))

REQUESTS = Counter("ai_requests", "Replies finished, by model and outcome", ["model", "outcome"])
DURATION = Histogram(
    "ai_request_duration_seconds",
    "Reply latency from send to last frame",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
TTFT = Histogram(
    "ai_time_to_first_token_seconds",
    "Time from send to the first delta",
    ["model"],
    buckets=_TTFT_BUCKETS,
)
ERRORS = Counter("ai_errors", "Failed replies, by model and error code", ["model", "code"])
TOKENS = Counter(
    "ai_tokens", "Tokens used, by model and kind (prompt/completion)", ["model", "kind"]
)
COST = Counter("ai_cost_usd", "Spend in USD, by model", ["model"])
CACHE = Counter("ai_cache_requests", "Response cache look-ups, by result", ["result"])
MODERATION = Counter(
    "ai_moderation_blocks", "Moderation blocks, by stage and category", ["stage", "category"]
)
RATELIMITED = Counter("ai_ratelimited", "Requests refused by a limit, by scope", ["scope"])
FEEDBACK = Counter("ai_feedback", "Feedback saved, by rating", ["rating"])
# Gauges: each process adds its own share; a dead process's share is dropped.
ACTIVE_STREAMS = Gauge(
    "ai_active_streams", "Replies streaming right now", multiprocess_mode="livesum"
)
QUEUE_DEPTH = Gauge(
    "ai_queue_depth", "Replies waiting for a model slot", multiprocess_mode="livesum"
)
# ai_circuit_open is not one of them: it is read at each scrape (_Circuits).
# Resource use, one series per live process (multiprocess mode adds `pid`).
PROCESS_CPU = Gauge(
    "ai_process_cpu_seconds", "CPU time used by the process", multiprocess_mode="liveall"
)
PROCESS_RSS = Gauge(
    "ai_process_resident_memory_bytes",
    "Resident memory of the process",
    multiprocess_mode="liveall",
)
PROCESS_FDS = Gauge(
    "ai_process_open_fds", "Open file descriptors of the process", multiprocess_mode="liveall"
)
PROCESS_SOCKETS = Gauge(
    "ai_process_open_sockets", "Open sockets of the process", multiprocess_mode="liveall"
)

OUTCOMES = frozenset({"stop", "length", "cancelled", "moderated", "error"})
ERROR_CODES = frozenset(
    {
        "invalid_input",
        "rate_limited",
        "budget_exceeded",
        "blocked_input",
        "timeout",
        "unavailable",
        "not_found",
        "forbidden",
        "internal",
    }
)
CACHE_RESULTS = frozenset({"hit", "semantic_hit", "miss", "error", "skip", "bypass"})
# Models nobody configured (a staff-made version, a fallback) get a few
# label values each process before collapsing into "other".
_EXTRA_MODELS_MAX = 16
# The label of replies answered from the last-resort cache (chat.callpath
# .LAST_RESORT; not imported, so the metrics load without the chat app).
_LAST_RESORT = "cache"
_SAFE_LABEL = re.compile(r"^[A-Za-z0-9_.:/@-]{1,80}$")
_FREE_LABEL_MAX = 32
_PROCESS_SAMPLE_EVERY_S = 10.0

_lock = threading.Lock()
_extra_models: set[str] = set()
_free_labels: dict[str, set[str]] = {}
_configured_models: frozenset[str] | None = None
_last_process_sample = 0.0


def _models_configured() -> frozenset[str]:
    global _configured_models
    if _configured_models is None:
        from django.conf import settings

        names = [
            getattr(settings, "CHAT_MODEL", ""),
            *getattr(settings, "CHAT_FALLBACK_MODELS", []),
        ]
        _configured_models = frozenset(n for n in names if n)
    return _configured_models


def model_label(model: str) -> str:
    """Return `model` if it may be a label value, else "other" (bounded per process)."""
    if model in _models_configured() or model in _extra_models or model == _LAST_RESORT:
        return model
    if not _SAFE_LABEL.match(model or ""):
        return "other"
    with _lock:
        if len(_extra_models) < _EXTRA_MODELS_MAX:
            _extra_models.add(model)
            return model
    return "other"


def _closed(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else "other"


def _free(kind: str, value: str) -> str:
    """Bound a label whose values nobody enumerated (limit scopes, categories)."""
    value = str(value).lower()
    seen = _free_labels.setdefault(kind, set())
    if value in seen:
        return value
    if not _SAFE_LABEL.match(value):
        return "other"
    with _lock:
        if len(seen) < _FREE_LABEL_MAX:
            seen.add(value)
            return value
    return "other"


def reply_observed(
    *,
    model: str,
    outcome: str,
    ttft_s: float | None,
    duration_s: float,
    prompt_tokens: int,
    completion_tokens: int,
    cost_usd: float,
    error_code: str,
) -> None:
    try:
        label = model_label(model)
        REQUESTS.labels(label, _closed(outcome, OUTCOMES)).inc()
        DURATION.labels(label).observe(max(0.0, duration_s))
        if ttft_s is not None:
            TTFT.labels(label).observe(max(0.0, ttft_s))
        if error_code:
            ERRORS.labels(label, _closed(error_code, ERROR_CODES)).inc()
        if prompt_tokens:
            TOKENS.labels(label, "prompt").inc(max(0, prompt_tokens))
        if completion_tokens:
            TOKENS.labels(label, "completion").inc(max(0, completion_tokens))
        if cost_usd > 0:
            COST.labels(label).inc(cost_usd)
        _sample_soon()
    except Exception:  # metrics must never break a reply
        logger.debug("metrics: reply_observed failed", exc_info=True)


def stream_started() -> None:
    try:
        ACTIVE_STREAMS.inc()
    except Exception:
        logger.debug("metrics: stream_started failed", exc_info=True)


def stream_ended() -> None:
    try:
        ACTIVE_STREAMS.dec()
    except Exception:
        logger.debug("metrics: stream_ended failed", exc_info=True)


def ratelimited(scope: str) -> None:
    try:
        RATELIMITED.labels(_free("scope", scope)).inc()
    except Exception:
        logger.debug("metrics: ratelimited failed", exc_info=True)


def moderation_blocked(stage: str, category: str) -> None:
    try:
        MODERATION.labels(_free("stage", stage), _free("category", category)).inc()
    except Exception:
        logger.debug("metrics: moderation_blocked failed", exc_info=True)


def cache_checked(result: str) -> None:
    try:
        CACHE.labels(_closed(result, CACHE_RESULTS)).inc()
    except Exception:
        logger.debug("metrics: cache_checked failed", exc_info=True)


def feedback_saved(rating: int) -> None:
    try:
        FEEDBACK.labels("up" if rating > 0 else "down").inc()
    except Exception:
        logger.debug("metrics: feedback_saved failed", exc_info=True)


def queue_depth_changed(delta: int) -> None:
    try:
        QUEUE_DEPTH.inc(delta)
    except Exception:
        logger.debug("metrics: queue_depth_changed failed", exc_info=True)


def _sample_soon() -> None:
    """Take a process sample on a thread of its own, at most every _PROCESS_SAMPLE_EVERY_S.

    Replies end on the event loop, and the sample reads a link in
    /proc/self/fd for every open descriptor: ~10 ms with 2,000 sockets
    (measured), a stall for every stream of the process, longer the more
    connections it holds. On its own thread the loop runs meanwhile: each
    of those reads lets go of the GIL.
    """
    global _last_process_sample
    now = time.monotonic()
    if now - _last_process_sample < _PROCESS_SAMPLE_EVERY_S:
        return
    _last_process_sample = now
    # A new thread each time (every 10 s at most): one kept in a pool would
    # not survive a fork into a worker process.
    threading.Thread(target=process_sample, name="metrics-sample", daemon=True).start()


def process_sample() -> None:
    """Record this process's CPU, memory, open fds and sockets (read from /proc)."""
    try:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        PROCESS_CPU.set(usage.ru_utime + usage.ru_stime)
        with open("/proc/self/statm") as statm:
            PROCESS_RSS.set(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        fds = sockets = 0
        for name in os.listdir("/proc/self/fd"):
            fds += 1
            try:
                if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    sockets += 1
            except OSError:
                continue  # closed while we looked
        PROCESS_FDS.set(fds)
        PROCESS_SOCKETS.set(sockets)
    except Exception:
        logger.debug("metrics: process sample failed", exc_info=True)


def multiprocess_dir() -> str:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


def _forget_dead_processes(path: str) -> None:
    # uvicorn has no child-exit hook (gunicorn's is where the docs call
    # mark_process_dead), so a worker that died would keep its gauges.
    pids: set[int] = set()
    for name in os.listdir(path):
        match = re.match(r"^gauge_live\w+_(\d+)\.db$", name)
        if match:
            pids.add(int(match.group(1)))
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _multiprocess.mark_process_dead(pid, path)
        except PermissionError:
            continue  # alive, someone else's


class _Circuits(Collector):
    """`ai_circuit_open{model}`, read from the breakers' shared state at each scrape.

    A breaker is opened by one process and may be closed by another's probe,
    so a gauge each process set would keep the opener's 1 for as long as it
    lives. The state in the shared cache is the one every process acts on;
    reading it costs /metrics two trips to the cache, and the breaker's own
    path nothing.
    """

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ai_circuit_open", "1 while the circuit breaker for a model is open", labels=["model"]
        )
        from monitoring import selectors

        states = selectors.circuits_open()
        # While the cache cannot be read nobody knows the breakers' state, so
        # no sample is exported rather than a guess: a 0 could hide an open
        # breaker, and this process's own last transition is the very error
        # this gauge avoids. Prometheus sees the series go absent (alert on
        # absent() if that matters), /health/ready names the cache, and the
        # rest of /metrics is served as usual.
        by_label: dict[str, float] = {}
        for model, is_open in (states or {}).items():
            safe = model in _models_configured() or _SAFE_LABEL.match(model)
            label = model if safe else "other"
            by_label[label] = max(by_label.get(label, 0.0), 1.0 if is_open else 0.0)
        for label, value in sorted(by_label.items()):
            family.add_metric([label], value)
        yield family


_CIRCUITS = CollectorRegistry()
_CIRCUITS.register(_Circuits())


def _recorded() -> CollectorRegistry:
    """Return the samples the processes recorded: every live one's files, or this one's."""
    path = multiprocess_dir()
    if path and os.path.isdir(path):
        _forget_dead_processes(path)
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=path)
        return registry
    from prometheus_client import REGISTRY

    return REGISTRY


def render() -> tuple[bytes, str]:
    """Return the exposition text for every process, and its content type."""
    process_sample()
    return generate_latest(_recorded()) + generate_latest(_CIRCUITS), CONTENT_TYPE_LATEST


def gauges_now() -> dict[str, float]:
    """Return active streams and queue depth summed over every live process."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"ai_active_streams": 0.0, "ai_queue_depth": 0.0}
    try:
        # Not render(): the health page reads the breakers on its own.
        text = generate_latest(_recorded())
        for family in text_string_to_metric_families(text.decode()):
            if family.name in wanted:
                wanted[family.name] = sum(s.value for s in family.samples)
    except Exception:
        logger.warning("metrics: gauges could not be read", exc_info=True)
    return wanted
