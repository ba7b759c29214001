"""Added latency of the call path over a direct SDK call (TTFT p50/p99).

Not collected by pytest (no test_ prefix). Run:

    .venv/bin/python -m tests.bench_callpath [--requests 200]

Both sides stream from the same fake vendor over real HTTP on 127.0.0.1: the
direct side is the official OpenAI SDK (`AsyncOpenAI`, retries off, streaming
with usage); the call-path side is `chat.callpath.call_model` with everything
it does in production (breaker check and record through the cache, the fair
queue, per-read deadlines, the provider). The two alternate request by
request so machine noise hits both alike; each side warms up first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import aclosing

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.test")
os.environ.setdefault("CHAT_DATA_DIR", tempfile.mkdtemp(prefix="bench-callpath-"))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run(requests: int, tokens: int) -> None:
    from django.conf import settings
    from openai import AsyncOpenAI

    from chat.callpath import CallOutcome, ModelPlan, call_model
    from chat.providers import ChatMessage, providers_aclose
    from tests.fakevendor import FakeVendor

    with FakeVendor(tokens=tokens) as vendor:
        settings.OPENAI_BASE_URL = vendor.openai_base_url
        settings.OPENAI_API_KEY = "sk-bench"
        client = AsyncOpenAI(api_key="sk-bench", base_url=vendor.openai_base_url, max_retries=0)
        history = [ChatMessage("user", "How fast is the first token?")]
        plan = ModelPlan(model="openai:bench-model")

        async def on_queued(position: int) -> None:
            return None

        async def direct() -> float:
            start = time.perf_counter()
            ttft = None
            stream = await client.chat.completions.create(
                model="bench-model",
                messages=[{"role": "user", "content": history[0].content}],
                stream=True,
                stream_options={"include_usage": True},
            )
            async with stream:
                async for chunk in stream:
                    if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                        ttft = time.perf_counter() - start
            assert ttft is not None
            return ttft

        async def through_callpath() -> float:
            start = time.perf_counter()
            ttft = None
            events = call_model(plan, history, owner_key="u:bench", on_queued=on_queued)
            async with aclosing(events):
                async for event in events:
                    if ttft is None and not isinstance(event, CallOutcome):
                        ttft = time.perf_counter() - start
            assert ttft is not None
            return ttft

        for _ in range(20):
            await direct()
            await through_callpath()
        results: dict[str, list[float]] = {"direct SDK": [], "call path": []}
        for _ in range(requests):
            results["direct SDK"].append(await direct())
            results["call path"].append(await through_callpath())
        await client.close()
        await providers_aclose()

    print(f"TTFT over {requests} requests each, {tokens}-token replies, fake vendor on loopback")
    for name, values in results.items():
        ms = [v * 1000 for v in values]
        print(
            f"  {name:<11} p50 {pct(ms, 50):6.2f} ms   p99 {pct(ms, 99):6.2f} ms"
            f"   mean {statistics.fmean(ms):6.2f} ms"
        )
    direct_ms = [v * 1000 for v in results["direct SDK"]]
    path_ms = [v * 1000 for v in results["call path"]]
    print(
        f"  added       p50 {pct(path_ms, 50) - pct(direct_ms, 50):+6.2f} ms"
        f"   p99 {pct(path_ms, 99) - pct(direct_ms, 99):+6.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()
    import django

    django.setup()
    asyncio.run(run(args.requests, args.tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
