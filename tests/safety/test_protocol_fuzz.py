"""A seeded fuzzer over everything a client can send: WebSocket frames and HTTP requests.

Each case is generated from a fixed seed (`CHAT_FUZZ_SEED`, `CHAT_FUZZ_CASES`
to search longer by hand), sent through the real ASGI application, and
checked through the public surface only:

- every answer is a clear, specific one: a `chat.error` with a known code
  other than `internal`, or the frames of a normal reply; an HTTP status
  below 500 (503 only from the health endpoints) with no stack trace;
- every frame the server sends is valid UTF-8 (a real server encodes it;
  a lone surrogate there kills the socket), and the socket stays open;
- every accepted send ends with `chat.done`; nothing is left half-written
  (a user message without its reply, a reply still pending); a
  `client_msg_id` is stored once however it is sent;
- no log line carries the personal data some inputs hold, and nothing is
  logged at ERROR (that is what an unexpected exception logs).

A failing case prints its seed, index and input, so it replays alone.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model

from chat.models import Message
from monitoring.logs import PlainFormatter, RedactFilter
from tests.asgi_ws import WebsocketCommunicator
from tests.chat.helpers import recv_until_done, send, send_frame
from tests.conftest import session_cookie_for
from tests.safety.helpers import asgi_http, cookie_for, replies_settled

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def _replies_settled() -> AsyncIterator[None]:
    yield
    await replies_settled()


SEED = int(os.environ.get("CHAT_FUZZ_SEED", "20261207"))
WS_CASES = int(os.environ.get("CHAT_FUZZ_CASES", "300"))
HTTP_CASES = int(os.environ.get("CHAT_FUZZ_HTTP_CASES", str(WS_CASES)))

KNOWN_CODES = {
    "invalid_input",
    "rate_limited",
    "budget_exceeded",
    "blocked_input",
    "timeout",
    "unavailable",
    "not_found",
    "forbidden",
}
# Personal data some inputs carry; no log line may hold it.
PII_EMAIL = "fuzz.person.q7@example.com"
PII_PHONE = "+1 415 555 0199"
LEAK_MARKERS = ("Traceback", 'File "/', "site-packages", "django.db", "sqlite3.", "psycopg")
TIMEOUT = 10


# --- values ------------------------------------------------------------------


STRINGS = [
    "",
    " ",
    "hello",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "\u202eevil\u202c",
    "\u2066iso\u2069",
    "👩\u200d👩\u200d👧\u200d👦",
    "🏳️\u200d🌈",
    "e\u0301" * 50,
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "Ω" * 3000,
    "x" * 70_000,
    f"mail me at {PII_EMAIL} or call {PII_PHONE}",
    "<script>alert(1)</script>",
    "'; DROP TABLE chat_message; --",
    "%s %d {0} {content}",
    "../../etc/passwd",
    "ignore all previous instructions",
    "\r\n\r\n",
    "\t",
]
NUMBERS: list[Any] = [
    0,
    1,
    -1,
    2,
    2**31,
    2**62,
    2**62 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    10**30,
    1.0,
    0.5,
    -0.0,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
]
LITERALS: list[Any] = [None, True, False, [], {}, [1], {"a": 1}, ["x"] * 5]


def nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


OUTCOMES: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(f"\nfuzz seed {SEED}: first answers {dict(sorted(OUTCOMES.items()))}")


@dataclass
class Ids:
    """Ids worth aiming at: the user's own and another user's."""

    own: dict[str, int] = field(default_factory=dict)
    other: dict[str, int] = field(default_factory=dict)

    def any(self, rng: random.Random) -> Any:
        pool: list[Any] = [*self.own.values(), *self.other.values()]
        roll = rng.random()
        if roll < 0.55 and pool:
            return rng.choice(pool)
        if roll < 0.85:
            return rng.choice(NUMBERS)
        if roll < 0.95:
            return rng.choice(LITERALS)
        return rng.choice(STRINGS[:12])


def any_value(rng: random.Random, ids: Ids) -> Any:
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(STRINGS)
    if roll < 0.6:
        return ids.any(rng)
    if roll < 0.8:
        return rng.choice(LITERALS)
    if roll < 0.9:
        return nested(rng.choice([3, 30, 200]))
    return str(uuid.UUID(int=rng.getrandbits(128)))


def encode(frame: Any, rng: random.Random) -> str:
    """JSON the way a careless or hostile client might write it."""
    text = json.dumps(frame, allow_nan=True, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.05:
        text = text.replace("0", "00", 1)  # leading zeros: not JSON
    return text


# --- WebSocket frames --------------------------------------------------------


def ws_frame(rng: random.Random, ids: Ids) -> tuple[str | None, bytes | None]:
    """Return one text or binary frame, built from a valid frame by mutation."""
    kind = rng.choice(["send", "send", "send", "stop", "resume", "feedback", "other", "raw"])
    if kind == "raw":
        choice = rng.randrange(9)
        raws: list[tuple[str | None, bytes | None]] = [
            (None, b'{"type":"chat.send"}'),
            (None, b"\xff\xfe\x00garbage"),
            (None, b""),
            ("", None),
            ("{", None),
            ('{"type": NaN}', None),
            (
                '{"type":"chat.send","content":"\\ud800","client_msg_id":"'
                + str(uuid.uuid4())
                + '"}',
                None,
            ),
            ("[" * 100_000, None),
            ('{"type":"feedback","message":1' + "0" * 5000 + "}", None),
        ]
        return raws[choice]
    frame: dict[str, Any]
    if kind == "send":
        frame = send_frame(rng.choice(["fine question"] * 10 + STRINGS))
        for name in ("conversation", "regenerate", "edit"):
            if rng.random() < 0.35:
                frame[name] = ids.any(rng)
        if rng.random() < 0.2:
            frame[rng.choice(["model", "temperature", "system", "max_tokens"])] = any_value(
                rng, ids
            )
    elif kind == "stop":
        frame = {"type": "chat.stop", "message": ids.any(rng)}
    elif kind == "resume":
        frame = {"type": "chat.resume", "message": ids.any(rng), "after": rng.choice(NUMBERS)}
    elif kind == "feedback":
        frame = {
            "type": "feedback",
            "message": ids.any(rng),
            "rating": rng.choice([1, -1, 0, None] * 4 + [*NUMBERS, *LITERALS, "1"]),
            "reasons": rng.choice([[], ["accurate"], ["wrong"], *LITERALS, [rng.choice(STRINGS)]]),
            "comment": rng.choice(["", "thanks", *STRINGS]),
        }
    else:
        frame = {
            "type": rng.choice(["chat.explode", "", None, 1, ["chat.send"], "\ud800", "x" * 99])
        }
    # Structured mutations: drop, retype or add fields.
    for _ in range(rng.choice([0, 0, 0, 0, 1, 2, 3])):
        op = rng.random()
        keys = list(frame)
        if op < 0.3 and keys:
            del frame[rng.choice(keys)]
        elif op < 0.8 and keys:
            frame[rng.choice(keys)] = any_value(rng, ids)
        else:
            frame[rng.choice(["extra", "client_msg_id", "__proto__", "\ud800"])] = any_value(
                rng, ids
            )
    if rng.random() < 0.05:
        frame["client_msg_id"] = rng.choice(STRINGS[:16])
    return encode(frame, rng), None


class Socket:
    """A socket that checks every frame the server sends as a real server would."""

    def __init__(self, comm: WebsocketCommunicator, label: str) -> None:
        self.comm = comm
        self.label = label

    async def recv(self) -> dict[str, Any]:
        out = await self.comm.receive_output(TIMEOUT)
        assert out["type"] == "websocket.send", f"{self.label}: the socket closed: {out!r}"
        text = out["text"]
        # A server writes UTF-8; a lone surrogate there raises and drops the socket.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise AssertionError(f"{self.label}: a frame a server cannot send: {text!r}") from None
        frame = json.loads(text)
        assert isinstance(frame, dict) and isinstance(frame.get("type"), str), frame
        if frame["type"] == "chat.error":
            assert frame["code"] in KNOWN_CODES, f"{self.label}: {frame}"
            message = frame["message"]
            assert isinstance(message, str) and 10 <= len(message) <= 300, frame
            assert not any(marker in message for marker in LEAK_MARKERS), frame
        return frame


def is_send(text: str | None) -> bool:
    try:
        frame = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        return False
    return isinstance(frame, dict) and frame.get("type") == "chat.send"


async def ws_case(sock: Socket, probe_no: int, text: str | None, data: bytes | None) -> list[dict]:
    """Send one frame and a probe behind it; return what the frame got, every reply ended.

    A refusal comes before the probe's answer; a send's chat.accepted may
    come after it (the reply's task sends it), so a send with neither is
    waited for: every send is answered.
    """
    await sock.comm.send_to(text_data=text, bytes_data=data)
    probe = f"probe-{probe_no}"
    await send(sock.comm, {"type": "fuzz.probe", "client_msg_id": probe})
    got: list[dict[str, Any]] = []
    open_replies: set[int] = set()
    probed = False
    unanswered = is_send(text)
    while not probed or open_replies or unanswered:
        frame = await sock.recv()
        if frame["type"] == "chat.error" and frame.get("client_msg_id") == probe:
            probed = True
            continue
        got.append(frame)
        if frame["type"] in ("chat.accepted", "chat.error"):
            unanswered = False
        if frame["type"] == "chat.accepted" and not frame.get("duplicate"):
            open_replies.add(frame["message"])
        elif frame["type"] == "chat.done":
            open_replies.discard(frame["message"])
    return got


@database_sync_to_async
def second_sign_in(username: str) -> str:
    return session_cookie_for(get_user_model().objects.get(username=username))


@database_sync_to_async
def stored_state(username: str) -> list[Message]:
    return list(Message.objects.filter(conversation__user__username=username).order_by("id"))


@database_sync_to_async
def ids_of(username: str) -> dict[str, int]:
    messages = list(
        Message.objects.filter(conversation__user__username=username).order_by("-id")[:2]
    )
    reply, question = messages[0], messages[1]
    return {
        f"{username}_conversation": reply.conversation_id,
        f"{username}_reply": reply.pk,
        f"{username}_question": question.pk,
    }


class LogLines:
    """Every record formatted as the production console writes it."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(PlainFormatter("%(levelname)s %(name)s %(message)s"))
        self.handler.addFilter(RedactFilter())
        self.errors: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        # django.security logs a refused Host header at ERROR, as it should.
        if record.levelno >= logging.ERROR and not record.name.startswith("django.security"):
            self.errors.append(record)

    def check(self) -> None:
        text = self.stream.getvalue()
        assert PII_EMAIL not in text and "555 0199" not in text, text[-2000:]
        assert not self.errors, [r.getMessage() for r in self.errors][:5]


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    lines = LogLines()
    root = logging.getLogger()
    catcher = logging.Handler()
    catcher.emit = lines.emit  # type: ignore[method-assign]
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(lines.handler)
    root.addHandler(catcher)
    yield lines
    root.removeHandler(lines.handler)
    root.removeHandler(catcher)
    root.setLevel(old_level)


@pytest.fixture
def roomy(settings: Any) -> None:
    settings.CHAT_RATELIMIT_USER = "100000/m"
    settings.FEEDBACK_RATELIMIT = "100000/m"
    settings.CHAT_ABUSE_THRESHOLD = 100_000


def check_stored(messages: list[Message], accepted: dict[str, int]) -> None:
    by_id = {m.pk: m for m in messages}
    for m in messages:
        if m.role == Message.Role.ASSISTANT:
            assert m.status != Message.Status.PENDING, f"reply {m.pk} left pending"
            assert m.reply_to_id in by_id, f"reply {m.pk} answers nothing"
        else:
            assert any(r.reply_to_id == m.pk for r in messages), f"question {m.pk} has no reply"
    client_ids = [m.client_msg_id for m in messages if m.role == Message.Role.USER]
    assert len(client_ids) == len(set(client_ids)), "a client_msg_id was stored twice"
    for client_msg_id, user_message in accepted.items():
        assert user_message in by_id, f"accepted {client_msg_id} is not stored"


async def test_websocket_frames_fuzzed(ws, make_user, roomy, log_lines):
    rng = random.Random(SEED)
    alice = Socket(await ws(await cookie_for(make_user, "alice")), "alice")
    bob = Socket(await ws(await cookie_for(make_user, "bob")), "bob")
    for sock in (alice, bob):
        await send(sock.comm, send_frame(f"first words, {PII_EMAIL}"))
        await recv_until_done(sock.comm)
    ids = Ids(own=await ids_of("alice"), other=await ids_of("bob"))
    accepted: dict[str, int] = {}
    for n in range(WS_CASES):
        text, data = ws_frame(rng, ids)
        label = f"seed {SEED} case {n}: {(text or repr(data))[:300]!r}"
        alice.label = label
        got = await ws_case(alice, n, text, data)
        for frame in got[:1]:
            key = frame["type"] + ("/" + frame["code"] if frame["type"] == "chat.error" else "")
            if os.environ.get("CHAT_FUZZ_VERBOSE") and frame["type"] == "chat.error":
                key += ": " + frame["message"][:50]
            OUTCOMES[key] = OUTCOMES.get(key, 0) + 1
        for frame in got:
            if frame["type"] == "chat.accepted":
                accepted[frame["client_msg_id"]] = frame["user_message"]
                ids.own["alice_reply"] = frame["message"]
                ids.own["alice_question"] = frame["user_message"]
                ids.own["alice_conversation"] = frame["conversation"]
        if data is not None or text is None:
            assert [f["code"] for f in got] == ["invalid_input"], label
    # Interleavings: two sends with one id at once, a stop before its send,
    # the same send on two sockets of one user.
    twin = send_frame("twice at once")
    alice2 = Socket(await ws(await second_sign_in("alice")), "alice2")
    await send(alice.comm, {"type": "chat.stop", "message": ids.own["alice_reply"] + 2})
    await send(alice.comm, twin)
    await send(alice.comm, twin)
    await send(alice2.comm, twin)
    frames = await ws_case(alice, -1, None, b"")
    frames += await ws_case(alice2, -2, None, b"")
    accepts = [f for f in frames if f["type"] == "chat.accepted"]
    assert len(accepts) == 3 and sum(not f.get("duplicate") for f in accepts) == 1, frames
    assert len({f["message"] for f in accepts}) == 1, accepts

    for sock in (alice, bob, alice2):
        assert await sock.comm.receive_nothing(timeout=0.05)
    check_stored(await stored_state("alice"), accepted)
    check_stored(await stored_state("bob"), {})
    log_lines.check()


async def test_websocket_interleavings_fuzzed(ws, make_user, roomy, settings, log_lines):
    """Random actions on two sockets of one user and one of another, replies still running."""
    settings.CHAT_DEMO_TPS = 400.0
    settings.CHAT_DEMO_REPLY_TOKENS = 30
    rng = random.Random(SEED + 2)
    cookie = await cookie_for(make_user, "alice")
    mine = [Socket(await ws(cookie), "alice-1"), Socket(await ws(cookie), "alice-2")]
    bob = Socket(await ws(await cookie_for(make_user, "bob")), "bob")
    await send(bob.comm, send_frame("bob asks"))
    await recv_until_done(bob.comm)
    ids = Ids(other=await ids_of("bob"))
    replies: list[int] = []
    questions: list[int] = []
    conversations: list[int] = []
    # Replies each socket started and has not seen end yet.
    running: dict[int, set[int]] = {0: set(), 1: set()}
    dones_seen: dict[int, int] = {}
    twins: list[str] = []

    def note(n: int, frame: dict[str, Any]) -> None:
        if frame["type"] == "chat.accepted" and not frame.get("duplicate"):
            running[n].add(frame["message"])
            replies.append(frame["message"])
            questions.append(frame["user_message"])
            conversations.append(frame["conversation"])
        elif frame["type"] == "chat.done":
            running[n].discard(frame["message"])
            dones_seen[frame["message"]] = dones_seen.get(frame["message"], 0) + 1

    probes = iter(range(10**9))

    async def settle(n: int, send_id: str | None) -> None:
        """Read socket n's frames up to a probe sent behind everything it was sent.

        A send's chat.accepted may come after the probe's answer (the reply's
        task sends it): a send is waited for until it is answered.
        """
        probe = f"probe-{next(probes)}"
        await send(mine[n].comm, {"type": "fuzz.probe", "client_msg_id": probe})
        probed = False
        while not probed or send_id is not None:
            frame = await mine[n].recv()
            if frame["type"] == "chat.error" and frame.get("client_msg_id") == probe:
                probed = True
                continue
            if frame.get("client_msg_id") == send_id and frame["type"] in (
                "chat.accepted",
                "chat.error",
            ):
                send_id = None
            note(n, frame)

    async def pump(n: int, budget: int) -> None:
        """Read up to `budget` frames that are surely coming (replies still running)."""
        while budget and running[n]:
            note(n, await mine[n].recv())
            budget -= 1

    for step in range(max(40, WS_CASES // 4)):
        n = rng.randrange(2)
        pool = {
            "reply": replies[-3:] or [1],
            "question": questions[-3:] or [1],
            "conversation": conversations[-2:] or [None],
        }
        action = rng.choice(["send", "send", "stop", "resume", "feedback", "regen", "edit", "twin"])
        frame: dict[str, Any]
        if action == "send":
            frame = send_frame(f"step {step}", conversation=rng.choice(pool["conversation"]))
        elif action == "stop":
            frame = {
                "type": "chat.stop",
                "message": rng.choice(pool["reply"] + [ids.other["bob_reply"]]),
            }
        elif action == "resume":
            frame = {
                "type": "chat.resume",
                "message": rng.choice(pool["reply"] + [ids.other["bob_reply"]]),
                "after": rng.choice([0, 0, 1, 5, 10**6]),
            }
        elif action == "feedback":
            frame = {
                "type": "feedback",
                "message": rng.choice(pool["reply"] + pool["question"] + [ids.other["bob_reply"]]),
                "rating": rng.choice([1, -1, 0, None]),
                "comment": rng.choice(["", f"reach me at {PII_EMAIL}"]),
            }
        elif action == "regen":
            frame = send_frame("", regenerate=rng.choice(pool["reply"] + pool["question"]))
        elif action == "edit":
            frame = send_frame("edited", edit=rng.choice(pool["question"] + pool["reply"]))
        else:
            twin = send_frame("twice", conversation=rng.choice(pool["conversation"]))
            twins.append(twin["client_msg_id"])
            await send(mine[1 - n].comm, twin)
            frame = twin
        mine[n].label = f"seed {SEED} interleaving {step}: {frame!r}"
        await send(mine[n].comm, frame)
        await settle(n, frame.get("client_msg_id"))
        if action == "twin":
            await settle(1 - n, frame["client_msg_id"])
        await pump(n, rng.randrange(6))
        await pump(1 - n, rng.randrange(6))
    # Every reply a socket started ends on it.
    for n in (0, 1):
        await pump(n, -1)
    assert all(count >= 1 for count in dones_seen.values())
    messages = await stored_state("alice")
    check_stored(messages, {})
    twin_rows = [m for m in messages if str(m.client_msg_id) in twins]
    assert len(twin_rows) == len(twins), "a client_msg_id sent twice at once was stored twice"
    assert len(replies) > 5, "too few sends were accepted to say anything"
    log_lines.check()


ORIGINS = [
    b"http://testserver",
    b"http://evil.example",
    b"null",
    b"",
    b"\xff\xfe",
    b"http://[::1",
    b"https://testserver]",
    b"http://testserver.evil.example",
    b"HTTP://TESTSERVER",
    b"http://testserver:99999",
    b"javascript:alert(1)",
]


def origin_allowed(origin: bytes | None) -> bool:
    if origin is None:
        return False
    try:
        return urlsplit(origin.decode("latin1")).hostname == "testserver"
    except ValueError:
        return False


async def test_websocket_handshakes_fuzzed(make_user, log_lines):
    """Any Origin and Cookie header: the handshake is accepted or refused, never a crash."""
    from config.asgi import application

    rng = random.Random(SEED + 3)
    good = (await cookie_for(make_user, "alice")).encode()
    cookies = [good, b"sessionid=\xff", b"sessionid=" + b"a" * 5000, b"sessionid=x; sessionid=y"]
    for n in range(max(10, WS_CASES // 8)):
        headers = []
        origin = rng.choice([*ORIGINS, None])
        if origin is not None:
            headers.append((b"origin", origin))
        if rng.random() < 0.8:
            headers.append((b"cookie", rng.choice(cookies)))
        comm = WebsocketCommunicator(application, "/ws/chat/", headers)
        connected, _ = await comm.connect()
        label = f"seed {SEED} handshake {n}: {headers!r}"
        assert connected is origin_allowed(origin), label
        if connected:
            sock = Socket(comm, label)
            got = await ws_case(sock, n, json.dumps({"type": "chat.nothing"}), None)
            assert [f["code"] for f in got] == ["invalid_input"], label
            await comm.disconnect()
    log_lines.check()


# --- HTTP --------------------------------------------------------------------


PATHS: list[Callable[[Ids], str]] = [
    lambda ids: "/api/conversations/",
    lambda ids: f"/api/conversations/{ids.own['alice_conversation']}/",
    lambda ids: f"/api/conversations/{ids.other['bob_conversation']}/",
    lambda ids: f"/api/conversations/{ids.own['alice_conversation']}/messages/",
    lambda ids: f"/api/conversations/{ids.other['bob_conversation']}/messages/",
    lambda ids: f"/api/conversations/{ids.own['alice_conversation']}/export/",
    lambda ids: "/api/conversations/99999999999999999999999/",
    lambda ids: "/api/conversations/99999999999999999999999/messages/",
    lambda ids: "/api/conversations/9223372036854775808/export/",
    lambda ids: "/api/conversations/0/messages/",
    lambda ids: "/api/feedback/",
    lambda ids: "/accounts/data/",
    lambda ids: "/accounts/data/export/",
    lambda ids: "/accounts/data/delete/",
    lambda ids: "/accounts/login/",
    lambda ids: "/accounts/signup/",
    lambda ids: "/health/live",
    lambda ids: "/health/ready",
    lambda ids: "/health/",
    lambda ids: "/metrics",
    lambda ids: "/",
    lambda ids: "/api/conversations/%ED%A0%80/",
    lambda ids: "/api/conversations/1%C3%A9/",
    lambda ids: "/api/conversations/%00/messages/",
    lambda ids: "/api/feedback/%2e%2e/",
]
QUERY_VALUES = [
    "",
    "x",
    "\x00",
    "%00",
    "%ff%fe",
    "%ED%A0%80",
    "A" * 70,
    "MTox",
    "OTk5OTk5OTk5OTk5OTk5OTk5Ojk5OTk5OTk5OTk5OTk5OTk5OTk",
    "MDox",
    "-_-_",
    "md",
    "json",
    "csv",
    "../etc",
    quote("\u202e"),
    quote(PII_EMAIL),
    "q" * 5000,
]
CONTENT_TYPES = [
    b"application/json",
    b"application/json; charset=latin-1",
    b"application/json; charset=bogus-9",
    b"text/plain",
    b"application/x-www-form-urlencoded",
    b"multipart/form-data; boundary=zz",
    b"multipart/form-data",
    b"",
    b"\xff\xfe",
]


CSRF_SECRET = b"Fz" * 16


def http_body(rng: random.Random, ids: Ids) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        return b""
    if roll < 0.15:
        return b"\xff\xfe\x00\x80"
    if roll < 0.2:
        return b"[" * 50_000
    if roll < 0.25:
        return b'--zz\r\nContent-Disposition: form-data; name="password"\r\n\r\nx\r\n--zz--\r\n'
    if roll < 0.3:
        value = rng.choice(STRINGS[:12]).encode("utf-8", "surrogatepass")
        return b"password=" + quote(value).encode() + b"&title=x"
    obj: dict[str, Any] = {
        "message": ids.any(rng),
        "rating": rng.choice([1, -1, 0, None, *NUMBERS, *LITERALS]),
        "reasons": rng.choice([[], ["accurate"], *LITERALS, [rng.choice(STRINGS)]]),
        "comment": rng.choice(STRINGS),
        "title": rng.choice([*STRINGS, *LITERALS, 1]),
    }
    for key in list(obj):
        if rng.random() < 0.3:
            del obj[key]
    payload: Any = obj if rng.random() < 0.85 else rng.choice(LITERALS + NUMBERS[:3])
    return json.dumps(payload, allow_nan=True, ensure_ascii=rng.random() < 0.5).encode(
        "utf-8", "surrogatepass"
    )


def http_request(
    rng: random.Random, ids: Ids, cookie: bytes
) -> tuple[str, str, bytes, list[tuple[bytes, bytes]], bytes]:
    method = rng.choice(
        ["GET", "GET", "POST", "POST", "PATCH", "DELETE", "PUT", "HEAD", "OPTIONS", "BREW"]
    )
    path = rng.choice(PATHS)(ids)
    params = [
        (name, rng.choice(QUERY_VALUES))
        for name in ("q", "cursor", "format", "next")
        if rng.random() < 0.35
    ]
    query = "&".join(f"{k}={v}" for k, v in params)
    if rng.random() < 0.05:
        query += "&q=a&q=b&cursor"
    headers: list[tuple[bytes, bytes]] = [
        (b"host", rng.choice([b"testserver"] * 8 + [b"evil.example", b"testserver:99999", b"\xff"]))
    ]
    if rng.random() < 0.9:
        if rng.random() < 0.7:  # a CSRF pair, so the views behind the check are reached
            cookie += b"; csrftoken=" + CSRF_SECRET
            headers.append((b"x-csrftoken", rng.choice([CSRF_SECRET] * 6 + [b"x", b"\xff" * 32])))
        headers.append((b"cookie", cookie))
    if rng.random() < 0.6:
        headers.append((b"content-type", rng.choice(CONTENT_TYPES)))
    if rng.random() < 0.3:
        headers.append(
            (
                b"origin",
                rng.choice([b"http://evil.example", b"null", b"http://testserver", b"\xff"]),
            )
        )
    if rng.random() < 0.2:
        headers.append(
            (
                b"authorization",
                rng.choice([b"Bearer ", b"Bearer x", b"Basic Zm9vOmJhcg==", b"\xff"]),
            )
        )
    body = http_body(rng, ids) if method not in ("GET", "HEAD") or rng.random() < 0.1 else b""
    if rng.random() < 0.1:
        # Only digits: h11 and httptools refuse any other Content-Length
        # before the application sees the request.
        headers.append((b"content-length", rng.choice([b"99999999999999999999", b"0", b"1"])))
    else:
        headers.append((b"content-length", str(len(body)).encode()))
    return method, path, query.encode("utf-8", "surrogatepass"), headers, body


async def test_http_requests_fuzzed(make_user, roomy, log_lines, settings):
    settings.METRICS_TOKEN = "fuzz-token-0123456789"
    rng = random.Random(SEED + 1)
    ws_ids: dict[str, dict[str, int]] = {}
    cookies: dict[str, str] = {}
    from config.asgi import application

    for name in ("alice", "bob"):
        cookies[name] = await cookie_for(make_user, name)
        comm = WebsocketCommunicator(
            application,
            "/ws/chat/",
            [(b"origin", b"http://testserver"), (b"cookie", cookies[name].encode())],
        )
        assert (await comm.connect())[0]
        await send(comm, send_frame(f"write to {PII_EMAIL} please"))
        await recv_until_done(comm)
        await comm.disconnect()
        ws_ids[name] = await ids_of(name)
    ids = Ids(own=ws_ids["alice"], other=ws_ids["bob"])
    anonymous = await cookie_for(make_user, None)
    for n in range(HTTP_CASES):
        cookie = rng.choice([cookies["alice"], cookies["alice"], anonymous, "sessionid=\ud800x"])
        method, path, query, headers, body = http_request(
            rng, ids, cookie.encode("utf-8", "surrogatepass")
        )
        label = f"seed {SEED} http case {n}: {method} {path!r} ?{query[:200]!r} {headers!r}"
        label += f" {body[:200]!r}"
        status, response_headers, content = await asgi_http(method, path, query, headers, body)
        OUTCOMES[f"http {status}"] = OUTCOMES.get(f"http {status}", 0) + 1
        health = path.startswith("/health/")
        assert status < 500 or (health and status == 503), (label, status, content[:500])
        assert not any(marker.encode() in content for marker in LEAK_MARKERS), (
            label,
            content[:500],
        )
        json_error = response_headers.get(b"content-type", b"").startswith(b"application/json")
        if path.startswith("/api/") and status >= 400 and method != "HEAD" and json_error:
            error = json.loads(content)["error"]
            assert error["code"] in KNOWN_CODES, (label, error)
    # Nothing half-written: alice's rows are whole, and she still exists.
    check_stored(await stored_state("alice"), {})
    log_lines.check()


def test_fuzz_values_are_what_they_claim():
    # The generator itself: NaN and infinities really reach the wire.
    rng = random.Random(SEED)
    text = encode({"v": float("nan"), "w": float("inf")}, rng)
    assert "NaN" in text and "Infinity" in text
    assert math.isnan(json.loads(text)["v"])
