"""`python -m tests.bench [--quick]`: the app against the floor, same client, same run.

Scenarios (docs/benchmarks.md explains each number):
  (a) TTFT with CHAT_DEMO_TTFT_MS=0: 1 connection, then 50 connections
  (b) delivered tokens/s and frames/s: 50 connections, 500-token replies, TPS=0
  (c) 1,000 connections, 150 tokens at 30 tokens/s after 300 ms
  (d) server RSS per idle connection, 1,000 connections (measured before (c))
  scaled (c): the app as two uvicorn processes on PostgreSQL + Redis
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import servers
from tests.bench.load import ConnSpec, PhaseResult, Reply, run_phase


@dataclass(frozen=True)
class Sizes:
    a_messages_1: int  # messages on the single connection
    a_conns: int
    a_messages_each: int  # messages per connection at a_conns (200 in all by default)
    a_tokens: int
    b_conns: int
    b_replies_each: int
    b_tokens: int
    c_conns: int
    c_replies_each: int
    c_tokens: int
    c_tps: float
    c_ttft_ms: int
    phase_timeout_s: float  # a phase still running then is cut; its missing replies count


FULL = Sizes(200, 50, 4, 20, 50, 4, 500, 1000, 1, 150, 30.0, 300, 240.0)
QUICK = Sizes(30, 10, 3, 20, 10, 1, 500, 100, 1, 150, 30.0, 300, 45.0)


@dataclass
class Row:
    label: str
    unit: str
    app: float | None = None
    floor: float | None = None
    target: str = ""
    verdict: str = ""
    lower_is_better: bool = True


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, key: str, label: str, unit: str, lower_is_better: bool = True) -> Row:
        for r in self.rows:
            if r.label == label:
                return r
        r = Row(label=label, unit=unit, lower_is_better=lower_is_better)
        self.rows.append(r)
        return r

    def note(self, text: str) -> None:
        print(f"  · {text}", flush=True)
        self.notes.append(text)


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ok_replies(result: PhaseResult, tokens: int) -> list[Reply]:
    return [
        r
        for r in result.replies
        if not r.error and r.finish == "stop" and r.tokens == tokens and r.ttft is not None
    ]


def describe(name: str, result: PhaseResult, server_cpu: float, expected: int) -> str:
    errors: dict[str, int] = {}
    for r in result.replies:
        if r.error or r.finish != "stop":
            key = r.error or f"finish={r.finish}"
            errors[key] = errors.get(key, 0) + 1
    cpu = ", ".join(f"{c:.0%}" for c in result.client_cpu)
    text = (
        f"{name}: {len(result.replies)}/{expected} replies in {result.wall_s:.1f} s, "
        f"{result.opened} sockets open ({result.failed} failed); "
        f"server CPU {server_cpu:.0%} of a core, client CPU per process {cpu}"
    )
    if errors:
        text += f"; problems {errors}"
    if result.open_errors:
        text += f"; {result.open_errors[:2]}"
    return text


def where_gaps_fall(name: str, replies: list[Reply]) -> str:
    """Say when the worst 1 % of the replies' longest gaps ended, and at which frame.

    Times are from the phase's first send (perf_counter is one clock for
    every process of the machine).
    """
    if not replies:
        return f"{name}: no replies"
    start = min(r.sent_at for r in replies)
    worst = sorted(replies, key=lambda r: r.max_gap)[-max(1, len(replies) // 100) :]
    ends = sorted(r.sent_at - start + r.max_gap_at for r in worst)
    frames = sorted(r.max_gap_frame for r in worst)
    per_reply = sorted(r.frames for r in replies)[len(replies) // 2]
    return (
        f"{name}: the worst 1% of longest gaps ({worst[0].max_gap * 1000:.0f}-"
        f"{worst[-1].max_gap * 1000:.0f} ms) ended {ends[0]:.2f}-{ends[-1]:.2f} s into "
        f"the phase, at delta frames {frames[0]}-{frames[-1]} (a reply's median: {per_reply})"
    )


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.report = Report()
        self.tmp = Path(tempfile.mkdtemp(prefix="chat-bench-"))
        self.nonce = f"{int(time.time()) % 100000}"
        self.cookies: list[str] = []
        self.t0 = time.perf_counter()

    def stamp(self) -> None:
        load = Path("/proc/loadavg").read_text().split()[0]
        print(f"[{time.perf_counter() - self.t0:4.0f} s, load {load}] ", end="")

    # --- plumbing ---------------------------------------------------------------

    def specs(self, server: servers.Server, count: int, cookies: bool) -> list[ConnSpec]:
        if cookies and count > len(self.cookies):
            raise RuntimeError("not enough bench users seeded")
        out = []
        for i in range(count):
            port = server.ports[i % len(server.ports)]
            out.append(
                ConnSpec(
                    url=f"ws://127.0.0.1:{port}/ws/chat/",
                    origin=f"http://127.0.0.1:{port}",
                    cookie=self.cookies[i] if cookies else None,
                )
            )
        return out

    def phase(
        self,
        server: servers.Server,
        *,
        conns: int,
        replies: int,
        processes: int,
        deadline_s: float,
        phase_timeout_s: float,
        before_go: Callable[[], None] | None = None,
    ) -> tuple[PhaseResult, float]:
        """Run one phase; return its result and the server's CPU share meanwhile."""
        cpu = {"before": 0.0, "at": 0.0}

        def go() -> None:
            if before_go is not None:
                before_go()
            cpu["before"] = server.cpu_s()
            cpu["at"] = time.perf_counter()

        result = run_phase(
            self.specs(server, conns, cookies=server.name.startswith("app")),
            processes=processes,
            replies=replies,
            tag=f"{self.nonce}-{server.name}-{conns}x{replies}",
            deadline_s=deadline_s,
            phase_timeout_s=phase_timeout_s,
            before_go=go,
        )
        elapsed = time.perf_counter() - cpu["at"]
        server_cpu = (server.cpu_s() - cpu["before"]) / elapsed if elapsed > 0 else 0.0
        server.check_alive()
        return result, server_cpu

    def start(
        self, which: str, *, ttft_ms: int, tps: float, tokens: int, **extra: Any
    ) -> servers.Server:
        demo = {
            "CHAT_DEMO_TTFT_MS": str(ttft_ms),
            "CHAT_DEMO_TPS": str(tps),
            "CHAT_DEMO_REPLY_TOKENS": str(tokens),
        }
        if which == "floor":
            env = servers.base_env(self.tmp / "floor", **demo)
            (self.tmp / "floor").mkdir(exist_ok=True)
            return servers.start_web("floor", servers.FLOOR_ASGI, env, self.tmp / "floor")
        env = dict(self.app_env, **demo, **extra)
        return servers.start_web(which, servers.APP_ASGI, env, self.app_dir, ports=self.app_ports)

    def use_app(self, data_dir: Path, users: int, ports: int = 1, **extra: str) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.app_dir = data_dir
        self.app_ports = ports
        self.app_env = servers.base_env(data_dir, **{**extra, **dict(self.args.settings)})
        t0 = time.perf_counter()
        self.cookies = servers.prepare_app_data(self.app_env, users)
        print(
            f"  · {data_dir.name}: migrated and {users} users signed in "
            f"in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )

    # --- scenarios ----------------------------------------------------------------

    def scenario_a(self) -> None:
        s = self.sizes
        self.stamp()
        print(
            f"(a) TTFT, CHAT_DEMO_TTFT_MS=0, {s.a_tokens}-token replies: 1 connection x "
            f"{s.a_messages_1} messages, {s.a_conns} connections x {s.a_messages_each}",
            flush=True,
        )
        for which in ("app", "floor"):
            server = self.start(which, ttft_ms=0, tps=0, tokens=s.a_tokens)
            try:
                self.phase(
                    server, conns=1, replies=5, processes=1, deadline_s=30, phase_timeout_s=60
                )  # warm-up
                for conns, messages, procs in (
                    (1, s.a_messages_1, 1),
                    (s.a_conns, s.a_messages_each, self.args.clients),
                ):
                    result, scpu = self.phase(
                        server,
                        conns=conns,
                        replies=messages,
                        processes=procs,
                        deadline_s=30,
                        phase_timeout_s=s.phase_timeout_s,
                    )
                    self.report.note(
                        describe(f"{which} {conns} conn", result, scpu, conns * messages)
                    )
                    ttfts = [r.ttft * 1000 for r in ok_replies(result, s.a_tokens)]
                    for q in (50, 99):
                        row = self.report.row("", f"(a) TTFT p{q}, {conns} conn", "ms")
                        setattr(row, which, pct(ttfts, q))
            finally:
                server.stop()

    def scenario_b(self) -> None:
        s = self.sizes
        self.stamp()
        print(
            f"(b) throughput, TPS=0, {s.b_tokens}-token replies: {s.b_conns} connections x "
            f"{s.b_replies_each} replies",
            flush=True,
        )
        for which in ("app", "floor"):
            server = self.start(which, ttft_ms=0, tps=0, tokens=s.b_tokens)
            try:
                self.phase(
                    server, conns=1, replies=1, processes=1, deadline_s=30, phase_timeout_s=60
                )  # warm-up
                result, scpu = self.phase(
                    server,
                    conns=s.b_conns,
                    replies=s.b_replies_each,
                    processes=self.args.clients,
                    deadline_s=120,
                    phase_timeout_s=s.phase_timeout_s,
                )
                self.report.note(describe(f"{which}", result, scpu, s.b_conns * s.b_replies_each))
                tokens = sum(r.tokens for r in result.replies if not r.error)
                frames = sum(r.frames for r in result.replies)
                wall = result.wall_s or 1.0
                row = self.report.row("", "(b) delivered tokens/s", "tok/s", lower_is_better=False)
                setattr(row, which, tokens / wall)
                row = self.report.row("", "(b) delta frames/s", "frames/s", lower_is_better=False)
                setattr(row, which, frames / wall)
                row = self.report.row("", "(b) tokens per frame", "tok", lower_is_better=False)
                setattr(row, which, tokens / frames if frames else None)
            finally:
                server.stop()

    def scenario_cd(self, which: str, label: str = "") -> None:
        s = self.sizes
        expected = s.c_conns * s.c_replies_each
        server = self.start(which, ttft_ms=s.c_ttft_ms, tps=s.c_tps, tokens=s.c_tokens)
        prefix = label or "(c)"
        try:
            # Warm-up: the first connections pay for lazy imports and DB threads.
            self.phase(server, conns=2, replies=0, processes=1, deadline_s=30, phase_timeout_s=30)
            time.sleep(1.0)
            memory: dict[str, int] = {"before": server.rss_kb()}

            def measure() -> None:
                time.sleep(2.0)  # let the handshakes' garbage settle
                memory["after"] = server.rss_kb()

            result, scpu = self.phase(
                server,
                conns=s.c_conns,
                replies=s.c_replies_each,
                processes=self.args.clients,
                deadline_s=120,
                phase_timeout_s=s.phase_timeout_s,
                before_go=measure,
            )
            self.report.note(describe(f"{which} {prefix}", result, scpu, expected))
            good = ok_replies(result, s.c_tokens)
            row = self.report.row("", f"{prefix} completion", "%", lower_is_better=False)
            setattr(row, "app" if which != "floor" else "floor", 100 * len(good) / expected)
            row = self.report.row("", f"{prefix} TTFT p99", "ms")
            setattr(
                row,
                "app" if which != "floor" else "floor",
                pct([r.ttft * 1000 for r in good if r.ttft is not None], 99),
            )
            self.report.note(where_gaps_fall(f"{which} {prefix}", good))
            row = self.report.row("", f"{prefix} longest gap p99", "ms")
            setattr(
                row,
                "app" if which != "floor" else "floor",
                pct([r.max_gap * 1000 for r in good], 99),
            )
            # The longest gap away from the replies' ends: their own cadence,
            # apart from the start and the end of the burst.
            row = self.report.row("", f"{prefix} longest gap p99, mid-reply", "ms")
            setattr(
                row,
                "app" if which != "floor" else "floor",
                pct([r.mid_gap * 1000 for r in good], 99),
            )
            # Where TTFT goes: the wait for chat.accepted, then the model's TTFT.
            row = self.report.row("", f"{prefix} chat.accepted p99", "ms")
            setattr(
                row,
                "app" if which != "floor" else "floor",
                pct([r.accepted * 1000 for r in good if r.accepted is not None], 99),
            )
            if not label:
                opened = max(1, result.opened)
                per_conn = (memory["after"] - memory["before"]) * 1024 / opened / 1000
                row = self.report.row("", "(d) RSS per idle connection", "KB")
                setattr(row, which, per_conn)
                self.report.note(
                    f"{which} (d): RSS {memory['before'] / 1024:.1f} MiB -> "
                    f"{memory['after'] / 1024:.1f} MiB with {result.opened} open sockets"
                )
        finally:
            server.stop()

    def scenario_scaled(self) -> None:
        s = self.sizes
        admin = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
        redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
        self.stamp()
        print(f"scaled (c): two uvicorn processes, PostgreSQL + Redis ({redis_url})", flush=True)
        try:
            services = servers.services_create(admin, redis_url)
        except Exception as exc:
            self.report.note(f"scaled mode SKIPPED: PostgreSQL/Redis unavailable ({exc})")
            return
        try:
            self.use_app(
                self.tmp / "scaled",
                users=s.c_conns + 10,
                ports=2,
                DATABASE_URL=services.database_url,
                REDIS_URL=services.redis_url,
            )
            self.scenario_cd("app-scaled", label="scaled (c)")
        finally:
            servers.services_drop(services)

    # --- the table ------------------------------------------------------------------

    def judge(self) -> None:
        def ratio(label: str) -> float | None:
            for r in self.report.rows:
                if r.label == label and r.app is not None and r.floor:
                    return r.app / r.floor
            return None

        def row(label: str) -> Row | None:
            return next((r for r in self.report.rows if r.label == label), None)

        def verdict(label: str, target: str, passed: bool | None) -> None:
            r = row(label)
            if r is not None:
                r.target = target
                r.verdict = "n/a" if passed is None else ("PASS" if passed else "MISS")

        def within(label: str, limit: float) -> bool | None:
            value = ratio(label)
            return None if value is None else value <= limit

        verdict("(a) TTFT p50, 1 conn", "app <= 8x floor", within("(a) TTFT p50, 1 conn", 8))
        verdict("(a) TTFT p99, 1 conn", "app <= 10x floor", within("(a) TTFT p99, 1 conn", 10))
        tps = ratio("(b) delivered tokens/s")
        verdict("(b) delivered tokens/s", "app >= floor", None if tps is None else tps >= 1.0)
        comp = row("(c) completion")
        verdict(
            "(c) completion", "100 %", None if comp is None or comp.app is None else comp.app >= 100
        )
        verdict("(c) TTFT p99", "app <= 1.5x floor", within("(c) TTFT p99", 1.5))
        verdict("(c) longest gap p99", "app <= 1.5x floor", within("(c) longest gap p99", 1.5))
        mem = row("(d) RSS per idle connection")
        verdict(
            "(d) RSS per idle connection",
            "app < 100 KB",
            None if mem is None or mem.app is None else mem.app < 100,
        )
        scaled = row("scaled (c) completion")
        verdict(
            "scaled (c) completion",
            "100 %",
            None if scaled is None or scaled.app is None else scaled.app >= 100,
        )

    def table(self) -> str:
        def fmt(value: float | None, unit: str) -> str:
            if value is None:
                return "-"
            if unit in ("tok/s", "frames/s"):
                return f"{value:,.0f} {unit}"
            if unit == "%":
                return f"{value:.1f} %"
            if unit == "ms" and value < 10:
                return f"{value:.2f} ms"
            return f"{value:,.1f} {unit}"

        head = ("measure", "app", "floor", "app/floor", "target", "")
        lines = [head]
        for r in self.report.rows:
            ratio = f"{r.app / r.floor:.2f}x" if r.app is not None and r.floor else "-"
            lines.append(
                (r.label, fmt(r.app, r.unit), fmt(r.floor, r.unit), ratio, r.target, r.verdict)
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        out = []
        for n, line in enumerate(lines):
            out.append(
                "| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) + " |"
            )
            if n == 0:
                out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(out)

    def run(self) -> int:
        s = self.sizes
        started = time.perf_counter()
        print(
            f"chat bench {'--quick ' if self.args.quick else ''}"
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on {servers.machine()}; "
            f"{self.args.clients} client processes; temp dir {self.tmp}",
            flush=True,
        )
        load = float(Path("/proc/loadavg").read_text().split()[0])
        if load > 0.5:
            print(
                f"  ! load average {load:.2f} before starting: other work shares these cores, "
                "so the numbers (and ratios) will be noisy",
                flush=True,
            )
        try:
            users = max(s.c_conns, s.a_conns, s.b_conns) + 10
            self.use_app(self.tmp / "app", users=users)
            if "a" in self.args.only:
                self.scenario_a()
            if "b" in self.args.only:
                self.scenario_b()
            if "c" in self.args.only:
                self.stamp()
                print(
                    f"(c)+(d) {s.c_conns} connections x {s.c_replies_each} replies of "
                    f"{s.c_tokens} tokens at {s.c_tps:g} tokens/s after {s.c_ttft_ms} ms",
                    flush=True,
                )
                self.scenario_cd("app")
                self.scenario_cd("floor")
            if "s" in self.args.only:
                self.scenario_scaled()
        finally:
            servers.stop_all()
            if not self.args.keep:
                shutil.rmtree(self.tmp, ignore_errors=True)
        self.judge()
        print()
        print(self.table())
        print(f"\nfinished in {time.perf_counter() - started:.0f} s")
        return 0


def setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts (< 60 s)")
    parser.add_argument(
        "--clients", type=int, default=2, help="client processes for the many-socket phases"
    )
    parser.add_argument(
        "--only", default="abcs", help="scenarios to run: a, b, c (with d), s (scaled)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    parser.add_argument(
        "--set",
        dest="settings",
        metavar="NAME=VALUE",
        type=setting,
        action="append",
        default=[],
        help="an environment variable for the app's servers (repeatable), "
        "e.g. --set CHAT_MODERATION_MAX_HOLD_MS=50",
    )
    args = parser.parse_args(argv)
    if args.settings:
        print("app settings: " + ", ".join(f"{k}={v}" for k, v in args.settings), flush=True)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        return Bench(args).run()
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
