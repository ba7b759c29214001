"""Bulk-create synthetic finished replies (for measuring the dashboard), then roll them up."""

from __future__ import annotations

import datetime as dt
import random
import time
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from chat.models import Conversation, Message
from monitoring.services import rollups_rebuild

MODELS = ("demo:demo", "openai:gpt-4o-mini", "anthropic:claude-3-5-haiku")
ERROR_CODES = ("timeout", "unavailable", "internal")
CATEGORIES = ("violence", "self_harm", "hate")


class Command(BaseCommand):
    help = "Create N synthetic finished replies spread over the last D days, then roll them up."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("count", type=int)
        parser.add_argument("--days", type=int, default=30)
        parser.add_argument("--users", type=int, default=200)
        parser.add_argument("--batch", type=int, default=5000)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--no-rollup", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        rng = random.Random(options["seed"])  # noqa: S311 - synthetic data, not secrets
        count, days, batch = options["count"], options["days"], options["batch"]
        now = timezone.now()
        users = get_user_model()
        people = []
        for i in range(options["users"]):
            user, _ = users.objects.get_or_create(username=f"seed-user-{i}")
            people.append(user.pk)
        conversations = Conversation.objects.bulk_create(
            [Conversation(user_id=people[i % len(people)]) for i in range(max(1, count // 20))],
            batch_size=batch,
        )
        conversation_ids = [c.pk for c in conversations]
        # bulk_create would stamp every row "now"; seeded history needs its own times.
        created_at = Message._meta.get_field("created_at")
        created_at.auto_now_add = False
        started = time.perf_counter()
        try:
            made = 0
            while made < count:
                rows = [
                    self._reply(rng, now, days, conversation_ids)
                    for _ in range(min(batch, count - made))
                ]
                Message.objects.bulk_create(rows, batch_size=batch)
                made += len(rows)
        finally:
            created_at.auto_now_add = True
        self.stdout.write(f"created {count} replies in {time.perf_counter() - started:.1f} s")
        if not options["no_rollup"]:
            started = time.perf_counter()
            written = rollups_rebuild(start=now - dt.timedelta(days=days), end=now)
            self.stdout.write(
                f"rolled up into {written} hourly rows in {time.perf_counter() - started:.1f} s"
            )

    @staticmethod
    def _reply(
        rng: random.Random, now: dt.datetime, days: int, conversations: list[int]
    ) -> Message:
        at = now - dt.timedelta(seconds=rng.random() * days * 86400)
        roll = rng.random()
        finish = (
            "stop"
            if roll < 0.93
            else "error"
            if roll < 0.96
            else "length"
            if roll < 0.98
            else "moderated"
        )
        ttft = int(rng.lognormvariate(6, 0.6))
        completion = rng.randint(20, 600)
        prompt = rng.randint(20, 2000)
        model = MODELS[rng.randrange(len(MODELS))]
        return Message(
            conversation_id=conversations[rng.randrange(len(conversations))],
            role=Message.Role.ASSISTANT,
            status=Message.Status.FINISHED,
            finish_reason=finish,
            content="x" * (completion * 4 if finish != "error" else 0),
            model=model,
            ttft_ms=ttft if finish != "error" else None,
            latency_ms=ttft + completion * 30,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=Decimal(prompt * 15 + completion * 60) / Decimal(100_000_000),
            error_code=rng.choice(ERROR_CODES) if finish == "error" else "",
            cached=rng.random() < 0.05,
            moderation=(
                {"stage": "output", "category": rng.choice(CATEGORIES), "score": 0.9}
                if finish == "moderated"
                else None
            ),
            created_at=at,
            finished_at=at,
        )
