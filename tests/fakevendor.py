"""A fake model vendor: a real HTTP/1.1 server on 127.0.0.1 that speaks just enough of
OpenAI's chat completions and Anthropic's messages APIs to drive the official SDKs, and
misbehaves on demand.

In tests::

    with FakeVendor() as vendor:
        vendor.script([Fault.rate_limited(retry_after=2), Fault.ok()])
        provider = OpenAIProvider(model="gpt-x", api_key="k", base_url=vendor.openai_base_url)
        ...
        record = vendor.wait_for_disconnect(timeout=5)

Standalone, for benchmarks (records are capped so memory stays flat)::

    python tests/fakevendor.py --port 9100 --tokens 200 --tps 30 --ttft-ms 250

Faults can be scripted over HTTP too: ``POST /_fake/script`` with ``{"faults": [{...}]}``,
``POST /_fake/default`` with one fault object, ``POST /_fake/reset``, ``GET /_fake/stats``.

The server runs its own asyncio loop in a daemon thread, so it keeps serving while a test's
event loop is blocked or busy. Waiting helpers block the calling thread on a Condition; the
``*_async`` variants run them in a worker thread.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "FakeVendor",
    "Fault",
    "RecordedRequest",
    "prompt_tokens_for",
    "reply_text",
    "reply_tokens",
]

_WORDS = (
    *("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed"),
    *("do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna"),
    "aliqua",
)

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"
MODERATIONS_PATH = "/v1/moderations"

Finish = Literal["stop", "length", "content_filter"]


def reply_tokens(n: int) -> list[str]:
    """Return the deterministic reply of ``n`` tokens, one string per token."""
    return [("" if i == 0 else " ") + _WORDS[i % len(_WORDS)] for i in range(n)]


def reply_text(n: int) -> str:
    """Return the deterministic reply of ``n`` tokens as one string."""
    return "".join(reply_tokens(n))


def _text_tokens(text: str) -> list[str]:
    """Split a custom reply into tokens: each word with the whitespace before it."""
    return re.findall(r"\s*\S+", text) or [text]


def _fault_tokens(fault: Fault, n: int) -> list[str]:
    """Return the first ``n`` tokens of the fault's reply (custom text or lorem ipsum)."""
    if fault.text is None:
        return reply_tokens(n)
    tokens = _text_tokens(fault.text)
    return (tokens * (n // len(tokens) + 1))[:n]


def prompt_tokens_for(body: dict[str, Any]) -> int:
    """Return the prompt token count the vendor reports for a request body.

    Deliberately not the providers' own estimate (chars / 4), so tests can tell a reported
    count from an estimated one: 10 + the number of whitespace-separated words.
    """
    texts: list[str] = []
    system = body.get("system")
    if isinstance(system, str):
        texts.append(system)
    elif isinstance(system, list):
        texts.extend(str(b.get("text", "")) for b in system if isinstance(b, dict))
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return 10 + sum(len(t.split()) for t in texts)


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True, kw_only=True)
class Fault:
    """How the vendor answers one request. The defaults are a normal, healthy reply.

    "after k" hooks fire once k reply tokens have been sent (k=0: before the first token,
    after the stream preamble). Use the class-method constructors; combine with
    ``dataclasses.replace`` or by passing extra fields to a constructor.
    """

    http_status: int = 200
    # "context_length" | "content_policy": a vendor-shaped error body for that failure.
    error: str | None = None
    # Explicit error body (JSON-able or str); overrides the vendor-shaped default.
    body: Any = None
    retry_after: str | float | None = None
    headers: tuple[tuple[str, str], ...] = ()
    tokens: int | None = None  # reply length; None = the vendor's default
    usage: bool = True  # report usage (OpenAI: only when stream_options.include_usage)
    first_token_delay: float = 0.0
    headers_first: bool = True  # False: delay before the status line instead
    tps: float | None = None  # tokens per second; None = vendor default, 0 = unpaced
    stall_after: int | None = None
    stall_for: float | None = None  # None = forever (until the client or the vendor closes)
    disconnect_after: int | None = None  # close the socket mid-stream
    malformed_after: int | None = None  # an SSE data line that is not JSON
    wrong_schema_after: int | None = None  # valid JSON, wrong shape
    stream_error_after: int | None = None  # the vendor's in-stream error event, then the end
    # That event's data (JSON-able) instead of the vendor's own; the Anthropic event keeps
    # its `event: error` line.
    error_event: Any = None
    truncate_after: int | None = None  # end the body cleanly, without the closing events
    empty: bool = False  # 200 SSE with no events (OpenAI: only [DONE])
    not_json: bool = False  # 200 text/html body
    finish: Finish | None = None  # override; mapped to each vendor's vocabulary
    # The reply's own text instead of the lorem-ipsum words, sent one word (with its
    # leading space) per token; `tokens` then defaults to the number of words.
    text: str | None = None

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def ok(cls, **kw: Any) -> Fault:
        return cls(**kw)

    @classmethod
    def status(cls, code: int, *, retry_after: str | float | None = None, **kw: Any) -> Fault:
        """Answer with HTTP ``code`` and a vendor-shaped error body."""
        return cls(http_status=code, retry_after=retry_after, **kw)

    @classmethod
    def rate_limited(cls, retry_after: str | float | None = 1, **kw: Any) -> Fault:
        return cls(http_status=429, retry_after=retry_after, **kw)

    @classmethod
    def server_error(cls, code: int = 500, **kw: Any) -> Fault:
        return cls(http_status=code, **kw)

    @classmethod
    def bad_request(cls, **kw: Any) -> Fault:
        return cls(http_status=400, **kw)

    @classmethod
    def unauthorized(cls, **kw: Any) -> Fault:
        return cls(http_status=401, **kw)

    @classmethod
    def context_length(cls, **kw: Any) -> Fault:
        return cls(http_status=400, error="context_length", **kw)

    @classmethod
    def content_policy(cls, **kw: Any) -> Fault:
        return cls(http_status=400, error="content_policy", **kw)

    @classmethod
    def filtered(cls, after: int = 3, **kw: Any) -> Fault:
        """Stop the stream with the vendor's content-filter finish (refusal for Anthropic)."""
        return cls(tokens=after, finish="content_filter", **kw)

    @classmethod
    def slow_first_token(cls, delay: float, *, headers_first: bool = True, **kw: Any) -> Fault:
        return cls(first_token_delay=delay, headers_first=headers_first, **kw)

    @classmethod
    def stall(cls, after: int, seconds: float | None = None, **kw: Any) -> Fault:
        return cls(stall_after=after, stall_for=seconds, **kw)

    @classmethod
    def disconnect(cls, after: int, **kw: Any) -> Fault:
        return cls(disconnect_after=after, **kw)

    @classmethod
    def malformed_sse(cls, after: int = 0, **kw: Any) -> Fault:
        return cls(malformed_after=after, **kw)

    @classmethod
    def wrong_schema(cls, after: int = 0, **kw: Any) -> Fault:
        return cls(wrong_schema_after=after, **kw)

    @classmethod
    def stream_error(cls, after: int = 0, **kw: Any) -> Fault:
        return cls(stream_error_after=after, **kw)

    @classmethod
    def truncated(cls, after: int, **kw: Any) -> Fault:
        return cls(truncate_after=after, **kw)

    @classmethod
    def empty_stream(cls, **kw: Any) -> Fault:
        return cls(empty=True, **kw)

    @classmethod
    def not_json_body(cls, **kw: Any) -> Fault:
        return cls(not_json=True, **kw)

    @classmethod
    def huge(cls, tokens: int = 50_000, **kw: Any) -> Fault:
        return cls(tokens=tokens, tps=0, **kw)

    @classmethod
    def paced(cls, tps: float, **kw: Any) -> Fault:
        return cls(tps=tps, **kw)

    @classmethod
    def no_usage(cls, **kw: Any) -> Fault:
        return cls(usage=False, **kw)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        if "headers" in kw:
            kw["headers"] = tuple((str(k), str(v)) for k, v in kw["headers"])
        return cls(**kw)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """One request the vendor received, and what became of its response."""

    index: int
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, or None
    raw_body: bytes
    arrived_at: float  # time.monotonic()
    fault: Fault
    client_port: int = 0  # the same port twice means a reused (keep-alive) connection
    status: int | None = None
    tokens_sent: int = 0
    completed_at: float | None = None  # the whole response was written
    disconnected_at: float | None = None  # the client closed before the response ended
    server_closed_at: float | None = None  # the vendor cut the connection (a fault)

    @property
    def closed_early(self) -> bool:
        return self.disconnected_at is not None


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    raw_body: bytes
    body: Any
    keep_alive: bool


def _peer_port(writer: asyncio.StreamWriter) -> int:
    peer = writer.get_extra_info("peername")
    return int(peer[1]) if isinstance(peer, tuple) and len(peer) > 1 else 0


class _ClientGone(Exception):
    """The client closed the connection while we were answering."""


# --------------------------------------------------------------------------- stream plans


@dataclass
class _Plan:
    """A streamed reply, split so the fault hooks can sit between tokens."""

    preamble: list[bytes]
    token: Callable[[int], bytes]
    n_tokens: int
    epilogue: list[bytes]
    malformed: bytes
    wrong_schema: bytes
    error_event: bytes
    content_type: str = "text/event-stream; charset=utf-8"
    extra_headers: list[tuple[str, str]] = field(default_factory=list)


def _sse(data: Any, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def _reply_length(req: _Request, fault: Fault, default_tokens: int) -> tuple[int, str]:
    """Return (tokens to send, natural finish) honouring the request's max tokens."""
    if fault.tokens is not None:
        wanted = fault.tokens
    elif fault.text is not None:
        wanted = len(_text_tokens(fault.text))
    else:
        wanted = default_tokens
    body = req.body if isinstance(req.body, dict) else {}
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and limit < wanted:
        return limit, "length"
    return wanted, "stop"


def _openai_error_body(status: int, error: str | None, model: str) -> dict[str, Any]:
    if error == "context_length":
        return {
            "error": {
                "message": (
                    "This model's maximum context length is 128000 tokens. However, your "
                    "messages resulted in 131072 tokens. Please reduce the length of the messages."
                ),
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    if error == "content_policy":
        return {
            "error": {
                "message": (
                    "Your request was rejected as a result of our safety system. Your prompt "
                    "may contain text that is not allowed by our safety system."
                ),
                "type": "invalid_request_error",
                "param": None,
                "code": "content_policy_violation",
            }
        }
    table: dict[int, tuple[str, str, str | None]] = {
        400: ("Invalid value for 'temperature'.", "invalid_request_error", "invalid_value"),
        401: (
            "Incorrect API key provided: sk-fake***. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            "invalid_api_key",
        ),
        403: ("You are not allowed to sample from this model", "invalid_request_error", None),
        404: (
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        ),
        429: (
            f"Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3.",
            "requests",
            "rate_limit_exceeded",
        ),
    }
    message, kind, code = table.get(
        status,
        (
            "The server had an error while processing your request. Sorry about that!",
            "server_error" if status >= 500 else "invalid_request_error",
            None,
        ),
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _anthropic_error_body(status: int, error: str | None) -> dict[str, Any]:
    if error == "context_length":
        kind, message = (
            "invalid_request_error",
            "prompt is too long: 208190 tokens > 200000 maximum",
        )
    elif error == "content_policy":
        kind, message = "invalid_request_error", "Output blocked by content filtering policy"
    else:
        kind, message = {
            400: ("invalid_request_error", "max_tokens: Field required"),
            401: ("authentication_error", "invalid x-api-key"),
            403: (
                "permission_error",
                "Your API key does not have permission to use this resource.",
            ),
            404: ("not_found_error", "model: claude-fake"),
            413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
            429: ("rate_limit_error", "Number of request tokens has exceeded your rate limit."),
            500: ("api_error", "Internal server error"),
            529: ("overloaded_error", "Overloaded"),
        }.get(status, ("api_error", "Internal server error"))
    return {"type": "error", "error": {"type": kind, "message": message}}


def _openai_plan(req: _Request, fault: Fault, default_tokens: int, seq: int) -> _Plan:
    body = req.body if isinstance(req.body, dict) else {}
    model = str(body.get("model") or "fake-model")
    n, natural = _reply_length(req, fault, default_tokens)
    stream_options = body.get("stream_options") or {}
    include_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
    cid = f"chatcmpl-fake{seq}"
    created = int(time.time())
    words = _fault_tokens(fault, n)

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
        }
        if include_usage:
            data["usage"] = usage
        return data

    def token(i: int) -> bytes:
        delta = {"content": words[i]}
        return _sse(chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]))

    finish = fault.finish or natural
    epilogue = [_sse(chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]))]
    if include_usage and fault.usage:
        prompt = prompt_tokens_for(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        epilogue.append(_sse(chunk([], usage)))
    epilogue.append(b"data: [DONE]\n\n")
    role = {"role": "assistant", "content": "", "refusal": None}
    return _Plan(
        preamble=[
            _sse(chunk([{"index": 0, "delta": role, "logprobs": None, "finish_reason": None}]))
        ],
        token=token,
        n_tokens=n,
        epilogue=epilogue,
        malformed=b'data: {"id":"' + cid.encode() + b'","object":"chat.completion.chunk","ch\n\n',
        wrong_schema=_sse({"id": cid, "object": "chat.completion.chunk", "choices": "none"}),
        error_event=_sse(
            {
                "error": {
                    "message": "The server had an error while processing your request.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        ),
        extra_headers=[("x-request-id", f"req_fake{seq}")],
    )


def _anthropic_plan(req: _Request, fault: Fault, default_tokens: int, seq: int) -> _Plan:
    body = req.body if isinstance(req.body, dict) else {}
    model = str(body.get("model") or "claude-fake")
    n, natural = _reply_length(req, fault, default_tokens)
    words = _fault_tokens(fault, n)
    stop_reason = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal"}[
        fault.finish or natural
    ]
    message: dict[str, Any] = {
        "id": f"msg_fake{seq}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    delta_usage: dict[str, Any] = {}
    if fault.usage:
        message["usage"] = {
            "input_tokens": prompt_tokens_for(body),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1,
        }
        delta_usage = {"usage": {"output_tokens": n}}

    def token(i: int) -> bytes:
        return _sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": words[i]},
            },
            "content_block_delta",
        )

    return _Plan(
        preamble=[
            _sse({"type": "message_start", "message": message}, "message_start"),
            _sse(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
                "content_block_start",
            ),
            _sse({"type": "ping"}, "ping"),
        ],
        token=token,
        n_tokens=n,
        epilogue=[
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    **delta_usage,
                },
                "message_delta",
            ),
            _sse({"type": "message_stop"}, "message_stop"),
        ],
        malformed=b'event: content_block_delta\ndata: {"type":"content_block_delta","ind\n\n',
        wrong_schema=_sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": 42},
            },
            "content_block_delta",
        ),
        error_event=_sse(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            "error",
        ),
        extra_headers=[("request-id", f"req_fake{seq}")],
    )


# --------------------------------------------------------------------------- server


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    424: "Failed Dependency",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    529: "Overloaded",
}

_FLUSH_BYTES = 32 * 1024


class FakeVendor:
    """A fake OpenAI + Anthropic server on a background thread. Use as a context manager."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: int = 20,
        tps: float = 0.0,
        default: Fault | None = None,
        max_records: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tokens = tokens
        self.tps = tps
        self._default = default or Fault.ok()
        self._queue: collections.deque[Fault] = collections.deque()
        self._records: collections.deque[RecordedRequest] = collections.deque(maxlen=max_records)
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stats = {"requests": 0, "disconnects": 0, "completed": 0, "active_streams": 0}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[None] | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        # POST /v1/moderations flags an input that contains one of these substrings
        # (case-insensitive) under the mapped category; the inputs are kept in order.
        # Moderation calls take no scripted fault and are not in `requests`.
        self.moderation_flags: dict[str, str] = {}
        self.moderation_inputs: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeVendor:
        """Start serving; return once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeVendor already started")
        self._thread = threading.Thread(target=self._run, name="fakevendor", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._start_error is not None:
            raise RuntimeError("FakeVendor failed to start") from self._start_error
        if not self._started.is_set():
            raise RuntimeError("FakeVendor did not start within 10 s")
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections, and join the thread."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is None or stop is None or thread is None:
            return

        def finish() -> None:
            if not stop.done():
                stop.set_result(None)

        with contextlib.suppress(RuntimeError):  # the loop may already be closed
            loop.call_soon_threadsafe(finish)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> FakeVendor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surface bind errors to start()
            self._start_error = exc
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        server = await asyncio.start_server(
            self._on_connection, self.host, self.port, limit=4 * 1024 * 1024, backlog=2048
        )
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        async with server:
            await self._stop
            server.close()
            for task in list(self._conn_tasks):
                task.cancel()
            if self._conn_tasks:
                await asyncio.gather(*self._conn_tasks, return_exceptions=True)

    # -- addresses ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The server root, ``http://127.0.0.1:PORT`` (what the Anthropic SDK wants)."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.base_url

    # -- scripting ---------------------------------------------------------------------

    def script(self, faults: Iterable[Fault]) -> None:
        """Queue faults; each request takes the next one, then falls back to the default."""
        with self._cond:
            self._queue.extend(faults)

    @property
    def default(self) -> Fault:
        return self._default

    @default.setter
    def default(self, fault: Fault) -> None:
        with self._cond:
            self._default = fault

    def reset(self) -> None:
        """Forget scripted faults, records and counters; restore the healthy default."""
        with self._cond:
            self._queue.clear()
            self._records.clear()
            self._default = Fault.ok()
            self._seq = itertools.count()
            active = self._stats["active_streams"]
            self._stats = {"requests": 0, "disconnects": 0, "completed": 0}
            self._stats["active_streams"] = active  # live connections are still live
            self.moderation_flags.clear()
            self.moderation_inputs.clear()

    def _next_fault(self) -> Fault:
        with self._cond:
            return self._queue.popleft() if self._queue else self._default

    # -- observations ------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, in arrival order."""
        with self._cond:
            return list(self._records)

    @property
    def stats(self) -> dict[str, int]:
        with self._cond:
            return dict(self._stats)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least ``n`` requests have arrived; raise TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._stats["requests"] >= n, timeout):
                raise TimeoutError(f"{self._stats['requests']} of {n} requests within {timeout}s")
            return list(self._records)

    def wait_for_disconnect(
        self, timeout: float = 5.0, *, index: int | None = None
    ) -> RecordedRequest:
        """Block until a client closes its connection before its response ended.

        With ``index``, wait for that request (arrival order, from 0). Raise TimeoutError
        when nothing closes early within ``timeout`` seconds.
        """

        def closed() -> RecordedRequest | None:
            for record in self._records:
                if record.closed_early and (index is None or record.index == index):
                    return record
            return None

        with self._cond:
            found = self._cond.wait_for(closed, timeout)
            if found is None:
                raise TimeoutError(f"no client disconnect observed within {timeout}s")
            return found

    def wait_for_completion(self, timeout: float = 5.0, *, index: int = 0) -> RecordedRequest:
        """Block until request ``index`` has been answered in full, or closed early."""

        def ended() -> RecordedRequest | None:
            for record in self._records:
                if record.index == index and (
                    record.completed_at or record.disconnected_at or record.server_closed_at
                ):
                    return record
            return None

        with self._cond:
            found = self._cond.wait_for(ended, timeout)
            if found is None:
                raise TimeoutError(f"request {index} did not end within {timeout}s")
            return found

    async def wait_for_disconnect_async(
        self, timeout: float = 5.0, *, index: int | None = None
    ) -> RecordedRequest:
        """Like `wait_for_disconnect`, without blocking the caller's event loop."""
        return await asyncio.to_thread(self.wait_for_disconnect, timeout, index=index)

    async def wait_for_requests_async(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        return await asyncio.to_thread(self.wait_for_requests, n, timeout)

    def _update(self, record: RecordedRequest, **changes: Any) -> None:
        with self._cond:
            for name, value in changes.items():
                setattr(record, name, value)
            if changes.get("disconnected_at") is not None:
                self._stats["disconnects"] += 1
            if changes.get("completed_at") is not None:
                self._stats["completed"] += 1
            self._cond.notify_all()

    # -- HTTP ----------------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        leftover = bytearray()
        try:
            while True:
                req = await self._read_request(reader, leftover)
                if req is None:
                    break
                leftover.clear()
                keep_alive = await self._answer(req, reader, writer, leftover)
                if not keep_alive:
                    break
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            pass
        except asyncio.CancelledError:
            # The vendor is stopping. End quietly: on 3.11 the stream server's done-callback
            # calls task.exception(), which raises (and logs) for a cancelled task.
            pass
        finally:
            self._conn_tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(
        self, reader: asyncio.StreamReader, leftover: bytearray
    ) -> _Request | None:
        head = bytes(leftover)
        if b"\r\n\r\n" not in head:
            try:
                head += await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial and not head:
                    return None  # clean close between requests
                raise
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        raw = rest[:length]
        if len(raw) < length:
            raw += await reader.readexactly(length - len(raw))
        leftover[:] = rest[length:]
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" and version.upper() == "HTTP/1.1"
        return _Request(method.upper(), target.split("?", 1)[0], headers, raw, body, keep_alive)

    async def _answer(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        leftover: bytearray,
    ) -> bool:
        if req.path.startswith("/_fake/"):
            return await self._control(req, writer)
        if req.path == MODERATIONS_PATH and req.method == "POST":
            return await self._moderate(req, writer)
        fault = self._next_fault()
        with self._cond:
            record = RecordedRequest(
                index=next(self._seq),
                method=req.method,
                path=req.path,
                headers=dict(req.headers),
                body=req.body,
                raw_body=req.raw_body,
                arrived_at=time.monotonic(),
                fault=fault,
                client_port=_peer_port(writer),
            )
            self._records.append(record)
            self._stats["requests"] += 1
            self._stats["active_streams"] += 1
            self._cond.notify_all()

        # Watch the socket while we answer: EOF means the client gave up on this response.
        respond = asyncio.create_task(self._respond(req, fault, record, writer))
        try:
            while True:
                watch = asyncio.create_task(reader.read(65536))
                done, _ = await asyncio.wait({respond, watch}, return_when=asyncio.FIRST_COMPLETED)
                if respond in done:
                    # Let the cancelled read finish unwinding: StreamReader refuses a new read
                    # while the old one is still registered as its waiter.
                    watch.cancel()
                    await asyncio.wait({watch})
                    if not watch.cancelled() and watch.exception() is None:
                        leftover.extend(watch.result())  # a pipelined request, or b"" at EOF
                    try:
                        return respond.result() and req.keep_alive
                    except _ClientGone:
                        self._update(record, disconnected_at=time.monotonic())
                        return False
                try:
                    data = watch.result()
                except ConnectionError:
                    data = b""
                if data:
                    leftover.extend(data)
                    continue
                self._update(record, disconnected_at=time.monotonic())
                respond.cancel()
                await asyncio.wait({respond})
                if not respond.cancelled():
                    respond.exception()  # mark retrieved; the client is gone either way
                return False
        finally:
            if not respond.done():
                respond.cancel()
            with self._cond:
                self._stats["active_streams"] -= 1

    async def _respond(
        self, req: _Request, fault: Fault, record: RecordedRequest, writer: asyncio.StreamWriter
    ) -> bool:
        """Write the whole response; return whether the connection may be reused."""
        if req.method == "GET" and req.path in ("/", "/v1/models"):
            data = {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}
            await self._send_json(writer, record, 200, data)
            return True
        if req.method != "POST" or req.path not in (OPENAI_PATH, ANTHROPIC_PATH):
            await self._send_json(
                writer,
                record,
                404,
                {"error": {"message": f"no route {req.path}", "type": "not_found"}},
            )
            return True

        is_openai = req.path == OPENAI_PATH
        body = req.body if isinstance(req.body, dict) else {}
        if fault.first_token_delay and not fault.headers_first:
            await asyncio.sleep(fault.first_token_delay)

        if fault.http_status >= 400:
            payload = fault.body
            if payload is None:
                model = str(body.get("model") or "fake-model")
                payload = (
                    _openai_error_body(fault.http_status, fault.error, model)
                    if is_openai
                    else _anthropic_error_body(fault.http_status, fault.error)
                )
            headers = list(fault.headers)
            if fault.retry_after is not None:
                headers.append(("retry-after", str(fault.retry_after)))
            await self._send_json(writer, record, fault.http_status, payload, headers)
            return True

        if fault.not_json:
            html = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            await self._send_raw(writer, record, 200, "text/html", html)
            return True

        if not body.get("stream"):
            return await self._send_complete(writer, record, req, fault, is_openai)

        seq = record.index
        plan = (
            _openai_plan(req, fault, self.tokens, seq)
            if is_openai
            else _anthropic_plan(req, fault, self.tokens, seq)
        )
        return await self._stream(writer, record, fault, plan, is_openai)

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        record: RecordedRequest,
        fault: Fault,
        plan: _Plan,
        is_openai: bool,
    ) -> bool:
        headers = [
            ("content-type", plan.content_type),
            ("transfer-encoding", "chunked"),
            ("cache-control", "no-cache"),
            *plan.extra_headers,
            *fault.headers,
        ]
        self._update(record, status=200)
        writer.write(self._head(200, headers))
        pending: list[bytes] = []
        size = 0

        async def flush() -> None:
            nonlocal size
            if pending:
                data = b"".join(pending)
                pending.clear()
                size = 0
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            try:
                await writer.drain()
            except ConnectionError as exc:
                raise _ClientGone from exc

        def add(data: bytes) -> None:
            nonlocal size
            pending.append(data)
            size += len(data)

        if fault.empty:
            if is_openai:
                add(b"data: [DONE]\n\n")
            await flush()
            writer.write(b"0\r\n\r\n")
            await flush()
            self._update(record, completed_at=time.monotonic())
            return True

        for event in plan.preamble:
            add(event)
        await flush()
        if fault.first_token_delay and fault.headers_first:
            await asyncio.sleep(fault.first_token_delay)

        tps = fault.tps if fault.tps is not None else self.tps
        interval = 1.0 / tps if tps and tps > 0 else 0.0
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        cut = False  # the stream ends without its closing events

        for i in range(plan.n_tokens + 1):
            # Hooks keyed on "after i tokens"; the last pass (i == n) only runs hooks.
            if fault.disconnect_after == i:
                await flush()
                writer.close()  # FIN mid-body: the client sees an incomplete chunked read
                self._update(record, server_closed_at=time.monotonic())
                return False
            if fault.stall_after == i:
                await flush()
                if fault.stall_for is None:
                    await asyncio.Event().wait()  # until the client or the vendor closes
                else:
                    await asyncio.sleep(fault.stall_for)
                t0 = loop.time() - i * interval
            if fault.malformed_after == i:
                add(plan.malformed)
            if fault.wrong_schema_after == i:
                add(plan.wrong_schema)
            if fault.stream_error_after == i:
                if fault.error_event is None:
                    add(plan.error_event)
                else:
                    add(_sse(fault.error_event, None if is_openai else "error"))
                cut = True
                break
            if fault.truncate_after == i:
                cut = True
                break
            if i == plan.n_tokens:
                break
            if interval:
                delay = t0 + i * interval - loop.time()
                if delay > 0:
                    await flush()
                    await asyncio.sleep(delay)
            add(plan.token(i))
            record.tokens_sent = i + 1  # read racily by tests; exact at completion
            if interval or size >= _FLUSH_BYTES:
                await flush()

        if not cut:
            for event in plan.epilogue:
                add(event)
        # The last event and the chunked terminator go out in one write, so a client that
        # hangs up as soon as it reads [DONE] / message_stop never looks like an early close.
        data = b"".join(pending)
        pending.clear()
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n")
        await flush()
        self._update(record, completed_at=time.monotonic())
        return True

    async def _send_complete(
        self,
        writer: asyncio.StreamWriter,
        record: RecordedRequest,
        req: _Request,
        fault: Fault,
        is_openai: bool,
    ) -> bool:
        body = req.body if isinstance(req.body, dict) else {}
        n, natural = _reply_length(req, fault, self.tokens)
        finish = fault.finish or natural
        text = "".join(_fault_tokens(fault, n))
        prompt = prompt_tokens_for(body)
        if is_openai:
            data: dict[str, Any] = {
                "id": f"chatcmpl-fake{record.index}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or "fake-model",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
            }
            if fault.usage:
                data["usage"] = {
                    "prompt_tokens": prompt,
                    "completion_tokens": n,
                    "total_tokens": prompt + n,
                }
        else:
            data = {
                "id": f"msg_fake{record.index}",
                "type": "message",
                "role": "assistant",
                "model": body.get("model") or "claude-fake",
                "content": [{"type": "text", "text": text}],
                "stop_reason": {"stop": "end_turn", "length": "max_tokens"}.get(finish, "refusal"),
                "stop_sequence": None,
            }
            if fault.usage:
                data["usage"] = {"input_tokens": prompt, "output_tokens": n}
        record.tokens_sent = n
        await self._send_json(writer, record, 200, data)
        return True

    async def _moderate(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer like OpenAI's moderation endpoint, flagging `moderation_flags` matches."""
        body = req.body if isinstance(req.body, dict) else {}
        text = str(body.get("input", ""))
        with self._cond:
            self.moderation_inputs.append(text)
            flags = dict(self.moderation_flags)
        hits = {cat for term, cat in flags.items() if term.lower() in text.lower()}
        categories = {c: c in hits for c in ("harassment", "hate", "violence", *sorted(hits))}
        result = {
            "flagged": bool(hits),
            "categories": categories,
            "category_scores": {c: (0.97 if hit else 0.001) for c, hit in categories.items()},
        }
        data = {"id": "modr-fake", "model": body.get("model"), "results": [result]}
        await self._send_json(writer, None, 200, data)
        return req.keep_alive

    async def _control(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        body = req.body if isinstance(req.body, dict) else {}
        if req.path == "/_fake/script" and req.method == "POST":
            self.script(Fault.from_json(f) for f in body.get("faults", []))
        elif req.path == "/_fake/default" and req.method == "POST":
            self.default = Fault.from_json(body)
        elif req.path == "/_fake/reset" and req.method == "POST":
            self.reset()
        elif req.path != "/_fake/stats":
            await self._send_json(writer, None, 404, {"error": "unknown control path"})
            return req.keep_alive
        await self._send_json(writer, None, 200, self.stats)
        return req.keep_alive

    # -- writing -----------------------------------------------------------------------

    @staticmethod
    def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        lines.extend(f"{k}: {v}" for k, v in headers)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _send_json(
        self,
        writer: asyncio.StreamWriter,
        record: RecordedRequest | None,
        status: int,
        payload: Any,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        await self._send_raw(writer, record, status, "application/json", data, headers)

    async def _send_raw(
        self,
        writer: asyncio.StreamWriter,
        record: RecordedRequest | None,
        status: int,
        content_type: str,
        data: bytes,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        all_headers = [
            ("content-type", content_type),
            ("content-length", str(len(data))),
            *(headers or []),
        ]
        writer.write(self._head(status, all_headers) + data)
        try:
            await writer.drain()
        except ConnectionError as exc:
            raise _ClientGone from exc
        if record is not None:
            self._update(record, status=status, completed_at=time.monotonic())


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake OpenAI/Anthropic vendor for benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tokens", type=int, default=20, help="reply length in tokens")
    parser.add_argument("--tps", type=float, default=0.0, help="tokens per second, 0 = unpaced")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token")
    parser.add_argument("--max-records", type=int, default=1000, help="recorded requests kept")
    args = parser.parse_args(argv)

    default = Fault(first_token_delay=args.ttft_ms / 1000.0) if args.ttft_ms else Fault()
    vendor = FakeVendor(
        host=args.host,
        port=args.port,
        tokens=args.tokens,
        tps=args.tps,
        default=default,
        max_records=args.max_records,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with vendor:
        print(f"fakevendor listening on {vendor.base_url}", flush=True)
        print(f"  openai:    {vendor.openai_base_url}", flush=True)
        print(f"  anthropic: {vendor.anthropic_base_url}", flush=True)
        while not done.wait(3600):
            pass
        print(f"fakevendor stopping: {vendor.stats}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
