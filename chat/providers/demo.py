"""The built-in demo model: no key, no network, a deterministic reply.

It is a real provider in every other respect: it streams at a configured pace
after a configured delay, reports usage, and stops at once when cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Iterator

from .base import ChatMessage, StreamEvent, StreamOptions, Usage

_WORDS = [
    "the",
    "a",
    "an",
    "this",
    "that",
    "model",
    "reply",
    "answer",
    "question",
    "idea",
    "system",
    "team",
    "user",
    "data",
    "stream",
    "token",
    "message",
    "page",
    "server",
    "process",
    "test",
    "result",
    "value",
    "number",
    "time",
    "simple",
    "clear",
    "small",
    "quick",
    "careful",
    "useful",
    "good",
    "plain",
    "steady",
    "ready",
    "honest",
    "is",
    "are",
    "was",
    "can",
    "will",
    "should",
    "may",
    "helps",
    "shows",
    "makes",
    "keeps",
    "gives",
    "takes",
    "builds",
    "and",
    "or",
    "but",
    "so",
    "because",
    "while",
    "when",
    "then",
    "also",
    "still",
    "often",
    "every",
    "each",
    "in",
    "on",
    "at",
    "for",
    "with",
    "from",
    "about",
    "over",
    "under",
    "between",
    "through",
    "across",
]


def demo_reply_tokens(prompt: str, count: int) -> list[str]:
    """Return `count` tokens of plain sentences derived from the prompt alone."""
    return list(iter_demo_tokens(prompt, count))


def iter_demo_tokens(prompt: str, count: int) -> Iterator[str]:
    """Yield the same tokens one by one, made as they are needed."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    rng = random.Random(seed)  # noqa: S311 - demo text, not security
    head = " ".join(prompt.split()[:6])
    opening = ["Demo", " reply", " to", f" “{head}”", ":"] if head else []
    yield from opening[:count]
    sentence_left = 0
    for _ in range(count - min(count, len(opening))):
        if sentence_left == 0:
            sentence_left = rng.randint(6, 14)
            word = rng.choice(_WORDS).capitalize()
        else:
            word = rng.choice(_WORDS)
        sentence_left -= 1
        yield " " + word + ("." if sentence_left == 0 else "")


class DemoProvider:
    name = "demo"

    def __init__(self, *, ttft_ms: int, tokens_per_second: float, reply_tokens: int) -> None:
        self.ttft = max(0, ttft_ms) / 1000
        self.tps = max(0.0, tokens_per_second)
        self.reply_tokens = max(1, reply_tokens)

    async def stream(
        self, messages: list[ChatMessage], options: StreamOptions
    ) -> AsyncIterator[StreamEvent]:
        prompt = next((m.content for m in reversed(messages) if m.role == "user"), "")
        count = self.reply_tokens
        if options.max_tokens is not None:
            count = min(count, options.max_tokens)
        tokens = iter_demo_tokens(prompt, count)  # made as they are sent
        loop = asyncio.get_running_loop()
        start = loop.time() + self.ttft
        if self.ttft:
            await asyncio.sleep(self.ttft)
        sent = 0
        for index, token in enumerate(tokens):
            if self.tps:
                # Pace against the clock, not by sleeping a fixed gap, so a busy
                # loop does not make the demo drift slower and slower.
                delay = start + index / self.tps - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif index % 32 == 31:
                await asyncio.sleep(0)  # stay fair to other streams
            yield token
            sent += 1
        yield Usage(
            # estimate_tokens of each message, inlined: a long chat has hundreds.
            prompt_tokens=sum((len(m.content) + 3) // 4 for m in messages),
            completion_tokens=sent,
            estimated=False,
            finish_reason="length" if count < self.reply_tokens else "stop",
        )
