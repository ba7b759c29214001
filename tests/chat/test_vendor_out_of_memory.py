"""A model that runs out of memory or is overloaded, as real vendors say it, through the WebSocket.

Self-hosted servers (vLLM, Ollama, text-generation-inference behind an OpenAI-compatible
API) and Anthropic each report it their own way: an HTTP status with a message, or an
error event inside a stream that already began. The user must see the same thing every
time: a retry, then the fallbacks, then a plain `unavailable`; never a hang, a traceback
or a restarted reply.
"""

from __future__ import annotations

import pytest

from chat.breaker import breaker_states
from tests.chat.callpath_support import *  # noqa: F403
from tests.chat.callpath_support import FALLBACK, PRIMARY, ask, cookie_for, reload
from tests.chat.helpers import delta_text, recv_until_done
from tests.fakevendor import Fault, reply_text

pytestmark = pytest.mark.django_db(transaction=True)

CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of "
    "23.68 GiB of which 1.12 GiB is free."
)

# (model, fault, HTTP status stored in the call path or None for an in-stream event)
OUT_OF_MEMORY = {
    # vLLM: an ErrorResponse object at the top level.
    "vllm-500": (
        PRIMARY,
        Fault.server_error(
            500,
            body={
                "object": "error",
                "message": CUDA_OOM,
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            },
        ),
        500,
    ),
    # Ollama: the error is a bare string.
    "ollama-500": (
        PRIMARY,
        Fault.server_error(
            500, body={"error": "model requires more system memory (12.3 GiB) than is available"}
        ),
        500,
    ),
    # A gateway in front of a model server.
    "gateway-503": (
        PRIMARY,
        Fault.server_error(
            503,
            body={"error": {"message": "upstream ran out of memory", "type": "server_error"}},
        ),
        503,
    ),
    # text-generation-inference: a failed generation is a 424, not a 5xx.
    "tgi-424": (
        PRIMARY,
        Fault.status(
            424,
            body={
                "error": f"Request failed during generation: Server error: {CUDA_OOM}",
                "error_type": "generation",
            },
        ),
        424,
    ),
    "anthropic-529": (FALLBACK, Fault.status(529), 529),
    # vLLM mid-stream: every error is sent as a "BadRequestError" with code 400.
    "vllm-event": (
        PRIMARY,
        Fault.stream_error(
            after=0,
            error_event={
                "error": {
                    "object": "error",
                    "message": CUDA_OOM,
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            },
        ),
        None,
    ),
    # An OpenAI-compatible server that labels it an invalid request.
    "invalid-request-event": (
        PRIMARY,
        Fault.stream_error(
            after=0,
            error_event={
                "error": {
                    "message": "llama runner process has terminated: cudaMalloc failed: "
                    "out of memory",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
        ),
        None,
    ),
    "tgi-event": (
        PRIMARY,
        Fault.stream_error(
            after=0,
            error_event={
                "error": f"Request failed during generation: Server error: {CUDA_OOM}",
                "error_type": "generation",
            },
        ),
        None,
    ),
    # Anthropic: an `overloaded_error` event inside a 200 stream.
    "anthropic-event": (FALLBACK, Fault.stream_error(after=0), None),
}


def errors_in(frames):
    return [f for f in frames if f["type"] == "chat.error"]


def failed_attempt(model: str, status: int | None, **extra):
    entry = {"model": model, "outcome": "server", **extra}
    if status is not None:
        entry["status"] = status
    return entry


@pytest.mark.parametrize("shape", OUT_OF_MEMORY)
async def test_out_of_memory_before_the_first_token_is_retried_and_answered(
    ws, make_user, wired, clock, settings, shape
):
    model, fault, status = OUT_OF_MEMORY[shape]
    settings.CHAT_MODEL = model
    wired.script([fault])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    frames = await recv_until_done(comm)

    assert errors_in(frames) == [] and delta_text(frames) == reply_text(20)
    assert (frames[-1]["finish_reason"], frames[-1]["model"]) == ("stop", model)
    assert len(wired.requests) == 2
    assert clock.sleeps == [0.5]  # backoff, not a tight loop
    reply = await reload(accepted["message"])
    assert reply.call_path == [
        failed_attempt(model, status, waited_s=0.5),
        {"model": model, "outcome": "ok"},
    ]


@pytest.mark.parametrize("shape", ["vllm-500", "tgi-424", "vllm-event"])
async def test_a_model_that_stays_out_of_memory_opens_its_breaker_and_the_fallback_answers(
    ws, make_user, wired, clock, settings, shape
):
    model, fault, _ = OUT_OF_MEMORY[shape]
    settings.CHAT_FALLBACK_MODELS = [FALLBACK]
    settings.CHAT_BREAKER_FAILURES = 3
    wired.script([fault] * 3)
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    frames = await recv_until_done(comm)

    assert errors_in(frames) == [] and delta_text(frames) == reply_text(20)
    assert frames[-1]["model"] == FALLBACK
    reply = await reload(accepted["message"])
    assert reply.model == FALLBACK
    assert [(e["model"], e["outcome"]) for e in reply.call_path] == [
        (model, "server"),
        (model, "server"),
        (model, "server"),
        (FALLBACK, "ok"),
    ]
    # Three failures in a row count against the model's health: the next
    # message does not wait on it again.
    assert breaker_states()[model] == "open"
    accepted = await ask(comm, "again")
    frames = await recv_until_done(comm)
    assert frames[-1]["model"] == FALLBACK and errors_in(frames) == []
    reply = await reload(accepted["message"])
    assert reply.call_path == [
        {"model": model, "outcome": "circuit_open"},
        {"model": FALLBACK, "outcome": "ok"},
    ]
    assert len(wired.requests) == 5


@pytest.mark.parametrize("shape", ["vllm-event", "tgi-event", "anthropic-event"])
async def test_out_of_memory_mid_reply_ends_it_with_the_text_kept(
    ws, make_user, wired, settings, shape
):
    model, fault, _ = OUT_OF_MEMORY[shape]
    settings.CHAT_MODEL = model
    settings.CHAT_FALLBACK_MODELS = [PRIMARY if model == FALLBACK else FALLBACK]
    wired.script([Fault.stream_error(after=4, error_event=fault.error_event)])
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    frames = await recv_until_done(comm)

    [error] = errors_in(frames)
    assert error["code"] == "unavailable"
    assert error["message"] == "The model is unavailable right now. Please try again shortly."
    assert delta_text(frames) == reply_text(4)
    assert frames[-1]["finish_reason"] == "error"
    reply = await reload(accepted["message"])
    assert (reply.content, reply.finish_reason, reply.error_code, reply.model) == (
        reply_text(4),
        "error",
        "unavailable",
        model,
    )
    assert reply.call_path == [failed_attempt(model, None, delivered=True)]
    assert len(wired.requests) == 1  # no silent restart, no fallback after text was shown


async def test_a_failed_generation_of_text_generation_inference_is_retried_like_a_5xx(
    ws, make_user, wired, clock, settings
):
    """TGI answers 424 for any failure during generation, not only running out of memory."""
    settings.CHAT_MODEL = PRIMARY
    wired.script(
        [
            Fault.status(
                424,
                body={
                    "error": "Request failed during generation: Server error: "
                    "Unexpected <class 'RuntimeError'>: shape mismatch",
                    "error_type": "generation",
                },
            )
        ]
    )
    comm = await ws(await cookie_for(make_user))
    accepted = await ask(comm)
    frames = await recv_until_done(comm)

    assert errors_in(frames) == [] and delta_text(frames) == reply_text(20)
    assert len(wired.requests) == 2
    reply = await reload(accepted["message"])
    assert reply.call_path == [
        failed_attempt(PRIMARY, 424, waited_s=0.5),
        {"model": PRIMARY, "outcome": "ok"},
    ]
