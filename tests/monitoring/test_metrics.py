"""/metrics: SPEC names and labels, values after real replies, access, several processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from chat import breaker
from monitoring import metrics
from tests.chat.helpers import recv, recv_until_done, send, send_frame
from tests.conftest import session_cookie_for
from tests.monitoring.helpers import TOKEN, parse, scrape, value

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _token(settings):
    settings.METRICS_TOKEN = TOKEN


def test_metrics_refuse_anonymous_wrong_token_and_non_staff(make_user):
    assert Client().get("/metrics").status_code == 401
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer nope").status_code == 403
    user_client = Client()
    user_client.force_login(make_user("bob"))
    assert user_client.get("/metrics").status_code == 403


def test_metrics_accept_the_token_and_staff(make_user):
    assert Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200
    staff = Client()
    staff.force_login(make_user("boss", staff=True))
    response = staff.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")


def test_empty_token_setting_never_matches(settings):
    settings.METRICS_TOKEN = ""
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 403


@pytest.mark.django_db(transaction=True)
async def test_scripted_replies_show_up_with_spec_names_and_labels(ws, make_user):
    before = await database_sync_to_async(scrape)()
    comm = await ws(await database_sync_to_async(lambda: session_cookie_for(make_user()))())
    for text in ("one", "two", "three"):
        await send(comm, send_frame(f"count me {text}"))
        await recv(comm)
        frames = await recv_until_done(comm)
        assert frames[-1]["finish_reason"] == "stop"
    after = await database_sync_to_async(scrape)()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ai_requests_total", model="demo:demo", outcome="stop") == 3
    assert delta("ai_request_duration_seconds_count", model="demo:demo") == 3
    assert delta("ai_time_to_first_token_seconds_count", model="demo:demo") == 3
    assert delta("ai_tokens_total", model="demo:demo", kind="completion") == 3 * 12
    assert delta("ai_tokens_total", model="demo:demo", kind="prompt") > 0
    assert delta("ai_errors_total", model="demo:demo", code="internal") == 0
    assert value(after, "ai_active_streams") == value(before, "ai_active_streams")
    # Resource use is exported too.
    assert value(after, "ai_process_resident_memory_bytes") > 1_000_000
    assert value(after, "ai_process_open_fds") > 0


def test_every_spec_metric_is_exposed(client, settings):
    metrics.cache_checked("hit")
    metrics.moderation_blocked("output", "violence")
    metrics.ratelimited("user")
    metrics.feedback_saved(-1)
    for _ in range(settings.CHAT_BREAKER_FAILURES):
        breaker.record_result(model="demo:demo", ok=False, now=time.time())
    metrics.queue_depth_changed(0)
    metrics.reply_observed(
        model="demo:demo",
        outcome="error",
        ttft_s=None,
        duration_s=0.2,
        prompt_tokens=1,
        completion_tokens=0,
        cost_usd=0.5,
        error_code="timeout",
    )
    samples = scrape()
    names = {name for name, _ in samples}
    for name in (
        "ai_requests_total",
        "ai_request_duration_seconds_bucket",
        "ai_time_to_first_token_seconds_bucket",
        "ai_errors_total",
        "ai_tokens_total",
        "ai_cost_usd_total",
        "ai_cache_requests_total",
        "ai_moderation_blocks_total",
        "ai_ratelimited_total",
        "ai_active_streams",
        "ai_queue_depth",
        "ai_feedback_total",
        "ai_circuit_open",
    ):
        assert name in names, name
    assert value(samples, "ai_circuit_open", model="demo:demo") == 1
    assert value(samples, "ai_errors_total", model="demo:demo", code="timeout") >= 1
    assert value(samples, "ai_moderation_blocks_total", stage="output", category="violence") >= 1


def test_labels_stay_bounded_whatever_the_callers_pass():
    for i in range(200):
        metrics.reply_observed(
            model=f"vendor:model-{i}",
            outcome=f"weird-{i}",
            ttft_s=0.1,
            duration_s=0.1,
            prompt_tokens=0,
            completion_tokens=0,
            cost_usd=0.0,
            error_code=f"code-{i}",
        )
        metrics.ratelimited(f"scope {i} with spaces and <html>")
    samples = scrape()
    models = {dict(labels).get("model") for name, labels in samples if name == "ai_requests_total"}
    assert len(models) <= 16 + 4
    assert "other" in models
    codes = {dict(labels)["code"] for name, labels in samples if name == "ai_errors_total"}
    assert not any(c.startswith("code-") for c in codes)
    outcomes = {dict(lab)["outcome"] for n, lab in samples if n == "ai_requests_total"}
    assert outcomes <= {"stop", "length", "cancelled", "moderated", "error", "other"}
    scopes = {dict(lab)["scope"] for n, lab in samples if n == "ai_ratelimited_total"}
    assert not any(" " in s for s in scopes)


def test_metric_functions_never_raise():
    metrics.reply_observed(
        model=None,  # type: ignore[arg-type]
        outcome=None,  # type: ignore[arg-type]
        ttft_s="x",  # type: ignore[arg-type]
        duration_s=None,  # type: ignore[arg-type]
        prompt_tokens=None,  # type: ignore[arg-type]
        completion_tokens=None,  # type: ignore[arg-type]
        cost_usd=None,  # type: ignore[arg-type]
        error_code=None,  # type: ignore[arg-type]
    )
    metrics.moderation_blocked(None, None)  # type: ignore[arg-type]
    metrics.queue_depth_changed("x")  # type: ignore[arg-type]


_RECORDER = textwrap.dedent(
    """
    import sys
    from monitoring import metrics
    for _ in range(int(sys.argv[1])):
        metrics.reply_observed(model="demo:demo", outcome="stop", ttft_s=0.1, duration_s=0.5,
            prompt_tokens=10, completion_tokens=20, cost_usd=0.25, error_code="")
    if sys.argv[2] == "fork":
        import os
        child = os.fork()
        if child == 0:  # a forked worker records into a file of its own
            for _ in range(4):
                metrics.reply_observed(model="demo:demo", outcome="stop", ttft_s=0.1,
                    duration_s=0.5, prompt_tokens=10, completion_tokens=20, cost_usd=0.25,
                    error_code="")
            os._exit(0)
        os.waitpid(child, 0)
        metrics.reply_observed(model="demo:demo", outcome="stop", ttft_s=0.1, duration_s=0.5,
            prompt_tokens=10, completion_tokens=20, cost_usd=0.25, error_code="")
    metrics.stream_started()
    metrics.process_sample()
    print("ready", flush=True)
    if sys.argv[2] in ("stay", "fork"):
        sys.stdin.readline()  # hold the stream open until the test says so
    """
)


def _recorder(directory: Path, count: int, mode: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
    }
    return subprocess.Popen(
        [sys.executable, "-c", "import django; django.setup();" + _RECORDER, str(count), mode],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_a_reply_samples_the_process_off_the_event_loop_and_at_most_every_10_s(
    monkeypatch,
):
    # The sample reads a link per open descriptor: with thousands of sockets
    # it would stall every stream of the process if it ran on the loop.
    sampled: list[threading.Thread] = []
    done = threading.Event()
    real = metrics.process_sample

    def spy() -> None:
        sampled.append(threading.current_thread())
        real()
        done.set()

    monkeypatch.setattr(metrics, "process_sample", spy)
    monkeypatch.setattr(metrics, "_last_process_sample", 0.0)  # a sample is due

    def reply() -> None:
        metrics.reply_observed(
            model="demo:demo",
            outcome="stop",
            ttft_s=0.1,
            duration_s=0.5,
            prompt_tokens=10,
            completion_tokens=20,
            cost_usd=0.0,
            error_code="",
        )

    reply()
    assert done.wait(10)
    assert sampled[0] is not threading.current_thread()
    reply()  # within 10 s of the last sample: none
    assert len(sampled) == 1


def test_metrics_add_up_across_processes_and_forget_dead_ones(tmp_path, monkeypatch, db):
    """Two real processes record into one multiprocess dir; /metrics sums them."""
    alive = _recorder(tmp_path, 3, "stay")
    finished = _recorder(tmp_path, 4, "exit")
    try:
        assert alive.stdout is not None and alive.stdout.readline().strip() == "ready"
        assert finished.wait(timeout=60) == 0
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        samples = scrape()
        assert value(samples, "ai_requests_total", model="demo:demo", outcome="stop") == 7
        assert value(samples, "ai_tokens_total", model="demo:demo", kind="completion") == 140
        assert value(samples, "ai_cost_usd_total", model="demo:demo") == pytest.approx(1.75)
        assert value(samples, "ai_request_duration_seconds_count", model="demo:demo") == 7
        # The exited process's open stream is not counted; the live one's is.
        assert value(samples, "ai_active_streams") == 1
        pids = {
            labels["pid"] for _, labels in _raw_labels(Client(), "ai_process_resident_memory_bytes")
        }
        assert str(alive.pid) in pids and str(finished.pid) not in pids
    finally:
        if alive.poll() is None:
            alive.communicate("\n", timeout=30)


def test_a_forked_process_counts_into_its_own_file(tmp_path, monkeypatch, db):
    parent = _recorder(tmp_path, 3, "fork")
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        # 3 + 1 in the parent, 4 in the child: none written over the other.
        assert value(scrape(), "ai_requests_total", model="demo:demo", outcome="stop") == 8
    finally:
        if parent.poll() is None:
            parent.communicate("\n", timeout=30)


def _raw_labels(client: Client, metric: str) -> list[tuple[str, dict[str, str]]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content.decode()
    return [
        (s.name, s.labels)
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == metric
    ]


def test_parse_helper_sums_pids():
    text = 'x_total{pid="1"} 2.0\nx_total{pid="2"} 3.0\n'
    assert value(parse("# TYPE x counter\n" + text), "x_total") == 5
