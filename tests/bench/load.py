"""The load generator: WebSocket clients in several processes, one asyncio loop each.

Every phase runs the same way against the app and against the floor: each
client process opens its share of the connections (reporting back when they are
all open, so the caller can measure idle memory), waits for the go, then every
connection sends `replies` chat.send frames one after the other, each as soon
as the previous reply's chat.done arrived, and records per reply:

- ttft: from just before sending chat.send to the first chat.delta;
- longest gap between two consecutive chat.delta frames;
- delta frames received and usage.completion_tokens from chat.done.

The process then reports its CPU time and wall time for the phase, so the
caller can tell whether the client was the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

# Both servers serialise frames with json.dumps(), so a delta starts like this;
# anything else is parsed in full (and a delta that does not match still counts).
_DELTA_PREFIX = '{"type": "chat.delta"'
_OPEN_CONCURRENCY = 32  # handshakes in flight per client process
_OPEN_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class ConnSpec:
    url: str
    origin: str
    cookie: str | None = None


MID_SKIP = 4


@dataclass(slots=True)
class Reply:
    ttft: float | None = None
    accepted: float | None = None  # send -> chat.accepted
    max_gap: float = 0.0
    max_gap_at: float = 0.0  # when the longest gap ended, seconds after the send
    max_gap_frame: int = 0  # the delta frame that ended it (1 = the second frame)
    # The longest gap away from a reply's ends: its first MID_SKIP and last
    # MID_SKIP gaps left out, so a reply's own cadence shows apart from the
    # start and the end of a burst. `recent` holds the last gaps until more
    # frames show they are not among the last.
    mid_gap: float = 0.0
    recent: list[float] = field(default_factory=list)
    frames: int = 0
    tokens: int = 0
    finish: str = ""
    error: str = ""
    sent_at: float = 0.0
    done_at: float = 0.0


@dataclass(slots=True)
class ProcessReport:
    opened: int = 0
    failed: int = 0
    open_errors: list[str] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0


async def _open(spec: ConnSpec) -> ClientConnection:
    headers = {"Cookie": spec.cookie} if spec.cookie else {}
    return await connect(
        spec.url,
        origin=spec.origin,  # type: ignore[arg-type]
        additional_headers=headers,
        compression=None,
        max_size=2**22,
        ping_interval=None,
        open_timeout=_OPEN_TIMEOUT_S,
        close_timeout=2,
    )


async def _reply(
    ws: ClientConnection, content: str, conversation: int | None, deadline_s: float
) -> tuple[Reply, int | None]:
    reply = Reply()
    frame: dict[str, Any] = {
        "type": "chat.send",
        "content": content,
        "client_msg_id": str(uuid.uuid4()),
    }
    if conversation is not None:
        frame["conversation"] = conversation
    payload = json.dumps(frame)
    last = 0.0
    perf = time.perf_counter
    try:
        async with asyncio.timeout(deadline_s):
            reply.sent_at = perf()
            await ws.send(payload)
            while True:
                raw = await ws.recv()
                now = perf()
                if isinstance(raw, str) and raw.startswith(_DELTA_PREFIX):
                    kind = "chat.delta"
                else:
                    parsed = json.loads(raw)
                    kind = parsed.get("type")
                if kind == "chat.delta":
                    if reply.frames == 0:
                        reply.ttft = now - reply.sent_at
                    else:
                        gap = now - last
                        if gap > reply.max_gap:
                            reply.max_gap = gap
                            reply.max_gap_at = now - reply.sent_at
                            reply.max_gap_frame = reply.frames
                        if reply.frames > MID_SKIP:
                            reply.recent.append(gap)
                            if len(reply.recent) > MID_SKIP:
                                reply.mid_gap = max(reply.mid_gap, reply.recent.pop(0))
                    last = now
                    reply.frames += 1
                elif kind == "chat.accepted":
                    reply.accepted = now - reply.sent_at
                    conversation = parsed.get("conversation", conversation)
                elif kind == "chat.done":
                    reply.done_at = now
                    reply.finish = str(parsed.get("finish_reason"))
                    reply.tokens = int((parsed.get("usage") or {}).get("completion_tokens") or 0)
                    return reply, conversation
                elif kind == "chat.error":
                    reply.error = str(parsed.get("code"))
                    return reply, conversation
                # chat.queued and anything else: keep waiting.
    except TimeoutError:
        reply.error = "client_timeout"
    except ConnectionClosed:
        reply.error = "closed"
    return reply, conversation


async def _converse(
    ws: ClientConnection, tag: str, replies: int, deadline_s: float, out: list[Reply]
) -> None:
    conversation: int | None = None
    for index in range(replies):
        # Unique per run, process, connection and message: no cache hit, and
        # the demo text differs from reply to reply.
        content = f"Bench {tag} message {index}: tell me about load and latency."
        reply, conversation = await _reply(ws, content, conversation, deadline_s)
        out.append(reply)
        if reply.error in ("closed", "client_timeout"):
            break


async def _worker(specs: list[ConnSpec], plan: dict[str, Any], pipe: Connection) -> None:
    report = ProcessReport()
    sockets: list[ClientConnection] = []
    gate = asyncio.Semaphore(_OPEN_CONCURRENCY)

    async def open_one(spec: ConnSpec) -> None:
        async with gate:
            try:
                sockets.append(await _open(spec))
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                report.failed += 1
                if len(report.open_errors) < 3:
                    report.open_errors.append(f"{type(exc).__name__}: {exc}")

    loop = asyncio.get_running_loop()
    try:
        await asyncio.gather(*(open_one(spec) for spec in specs))
        report.opened = len(sockets)
        pipe.send(("open", report.opened, report.failed))
        # Wait for the go (or a stop) without blocking the loop, so the open
        # sockets keep answering pings.
        command = await loop.run_in_executor(None, _recv_bounded, pipe, plan["wait_s"])
        if command == "go" and plan["replies"] > 0:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            report.started_at = wall0
            phase = asyncio.gather(
                *(
                    _converse(
                        ws,
                        f"{plan['tag']}-{os.getpid()}-{i}",
                        plan["replies"],
                        plan["deadline_s"],
                        report.replies,
                    )
                    for i, ws in enumerate(sockets)
                )
            )
            try:
                # Replies unfinished at the end count as not completed.
                await asyncio.wait_for(phase, timeout=plan["phase_timeout_s"])
            except TimeoutError:
                report.open_errors.append("phase timed out")
            report.ended_at = time.perf_counter()
            report.cpu_s = time.process_time() - cpu0
            report.wall_s = report.ended_at - wall0
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    pipe.send(("done", report))


def _recv_bounded(pipe: Connection, wait_s: float) -> str:
    if pipe.poll(wait_s):
        return str(pipe.recv())
    return "stop"


def _process_main(specs: list[ConnSpec], plan: dict[str, Any], pipe: Connection) -> None:
    try:
        try:  # the servers run uvloop too; it halves the client's cost per frame
            import uvloop
        except ImportError:
            asyncio.run(_worker(specs, plan, pipe))
        else:
            uvloop.run(_worker(specs, plan, pipe))
    except BaseException as exc:  # report, never hang the parent
        with contextlib.suppress(Exception):
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))


@dataclass(slots=True)
class PhaseResult:
    opened: int
    failed: int
    open_errors: list[str]
    replies: list[Reply]
    client_cpu: list[float]  # per process: CPU seconds / wall seconds during the run
    wall_s: float


def run_phase(
    specs: list[ConnSpec],
    *,
    processes: int,
    replies: int,
    tag: str,
    deadline_s: float,
    phase_timeout_s: float,
    before_go: Any = None,
) -> PhaseResult:
    """Open every connection, call before_go(), run the replies; return what was seen.

    Connections are dealt round-robin to `processes` client processes. Every
    wait is bounded; the processes are terminated whatever happens.
    """
    ctx = multiprocessing.get_context("spawn")
    processes = max(1, min(processes, len(specs)))
    plan = {
        "replies": replies,
        "tag": tag,
        "deadline_s": deadline_s,
        "phase_timeout_s": phase_timeout_s,
        "wait_s": phase_timeout_s + 120,
    }
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        for index in range(processes):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_process_main,
                args=(specs[index::processes], plan, theirs),
                daemon=True,
                name=f"bench-client-{index}",
            )
            proc.start()
            workers.append((proc, ours))
        opened = failed = 0
        for proc, pipe in workers:
            message = _expect(proc, pipe, _OPEN_TIMEOUT_S * 2 + 30)
            if message[0] == "error":
                raise RuntimeError(f"client process failed: {message[1]}")
            opened += message[1]
            failed += message[2]
        if before_go is not None:
            before_go()
        for _proc, pipe in workers:
            pipe.send("go")
        reports: list[ProcessReport] = []
        for proc, pipe in workers:
            message = _expect(proc, pipe, phase_timeout_s + 60)
            if message[0] == "error":
                raise RuntimeError(f"client process failed: {message[1]}")
            reports.append(message[1])
    finally:
        for proc, pipe in workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            pipe.close()
    started = min((r.started_at for r in reports if r.started_at), default=0.0)
    ended = max((r.ended_at for r in reports if r.ended_at), default=0.0)
    return PhaseResult(
        opened=opened,
        failed=failed,
        open_errors=[e for r in reports for e in r.open_errors],
        replies=[reply for r in reports for reply in r.replies],
        client_cpu=[r.cpu_s / r.wall_s if r.wall_s else 0.0 for r in reports],
        wall_s=max(0.0, ended - started),
    )


def _expect(
    proc: multiprocessing.process.BaseProcess, pipe: Connection, timeout: float
) -> tuple[Any, ...]:
    deadline = time.monotonic() + timeout
    while not pipe.poll(0.2):
        if not proc.is_alive() and not pipe.poll(0):
            raise RuntimeError(f"client process {proc.name} died (exit code {proc.exitcode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"client process {proc.name} did not answer within {timeout:.0f} s")
    message = pipe.recv()
    assert isinstance(message, tuple)
    return message
