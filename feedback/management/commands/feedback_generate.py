"""Fill the database with synthetic replies and feedback, to measure the desk at scale.

    manage.py feedback_generate --replies 1000000 --feedback 100000

Never run this against a database with real users' data: it adds a user
named `bench-user`, versions, conversations, messages and feedback.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.core.management.color import no_style
from django.db import connection, models, transaction
from django.db.models import Max
from django.utils import timezone

from chat.models import Conversation, Message
from feedback import rollups, versions
from feedback.models import Feedback, ModelVersion

TURNS_PER_CONVERSATION = 10
CONVERSATIONS_PER_CHUNK = 500
# (model, share of thumbs up, error rate, moderation rate, ttft ms, latency ms)
PROFILES = [
    ("demo:steady", 0.78, 0.01, 0.004, 350, 2400),
    ("demo:fast", 0.71, 0.02, 0.006, 180, 1500),
    ("demo:bold", 0.74, 0.015, 0.02, 420, 3100),
]
DOWN = ["inaccurate", "unhelpful", "unsafe", "too_slow", "badly_formatted", "other"]
UP = ["accurate", "helpful", "well_written", "fast"]
WORDS = [
    "the",
    "a",
    "model",
    "reply",
    "question",
    "answer",
    "data",
    "service",
    "latency",
    "token",
    "stream",
    "version",
    "prompt",
    "cache",
    "user",
    "staff",
    "review",
    "export",
    "rollback",
    "split",
    "score",
    "interval",
    "deploy",
    "queue",
    "worker",
]


@contextlib.contextmanager
def _stamps_as_given(*fields: models.DateTimeField) -> Iterator[None]:
    """Let bulk_create keep the timestamps we set instead of 'now' (synthetic history)."""
    saved = [(f, f.auto_now, f.auto_now_add) for f in fields]
    for f in fields:
        f.auto_now = f.auto_now_add = False
    try:
        yield
    finally:
        for f, auto_now, auto_now_add in saved:
            f.auto_now, f.auto_now_add = auto_now, auto_now_add


def _field(model: type[models.Model], name: str) -> models.DateTimeField:
    field = model._meta.get_field(name)
    assert isinstance(field, models.DateTimeField)
    return field


class Command(BaseCommand):
    help = "Generate synthetic replies and feedback (bulk, in batches) for scale measurements."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--replies", type=int, default=1_000_000)
        parser.add_argument("--feedback", type=int, default=100_000)
        parser.add_argument("--days", type=int, default=60)
        parser.add_argument("--seed", type=int, default=5)
        parser.add_argument("--no-rollup", action="store_true", help="skip the rollup rebuild")

    def handle(self, *args: Any, **options: Any) -> None:
        rng = random.Random(options["seed"])  # noqa: S311 - synthetic data
        replies, wanted_feedback = options["replies"], options["feedback"]
        user, _ = get_user_model().objects.get_or_create(username="bench-user")
        version_rows = self._versions()
        conversations = max(1, replies // TURNS_PER_CONVERSATION)
        feedback_every = max(1, replies // max(1, wanted_feedback))
        end = timezone.now() - dt.timedelta(minutes=5)
        start = end - dt.timedelta(days=options["days"])
        step = (end - start) / max(1, replies)
        started = time.perf_counter()
        made_replies = made_feedback = 0
        stamps = _stamps_as_given(
            _field(Conversation, "created_at"),
            _field(Conversation, "updated_at"),
            _field(Message, "created_at"),
            _field(Feedback, "created_at"),
            _field(Feedback, "updated_at"),
        )
        with stamps:
            for first in range(0, conversations, CONVERSATIONS_PER_CHUNK):
                count = min(CONVERSATIONS_PER_CHUNK, conversations - first)
                # One transaction per chunk: one disk sync per 10,000 messages.
                with transaction.atomic():
                    made = self._chunk(
                        rng=rng,
                        user_id=user.pk,
                        count=count,
                        versions=version_rows,
                        at=start + step * made_replies,
                        step=step,
                        feedback_every=feedback_every,
                        feedback_left=wanted_feedback - made_feedback,
                    )
                made_replies += made[0]
                made_feedback += made[1]
                if first // CONVERSATIONS_PER_CHUNK % 20 == 0:
                    self.stdout.write(
                        f"{made_replies:,} replies, {made_feedback:,} feedback "
                        f"({time.perf_counter() - started:.0f} s)"
                    )
        self.stdout.write(
            f"Generated {made_replies:,} replies and {made_feedback:,} feedback rows "
            f"in {time.perf_counter() - started:.1f} s."
        )
        with connection.cursor() as cursor:
            # PostgreSQL's id sequence must move past the ids given above.
            for sql in connection.ops.sequence_reset_sql(no_style(), [Message]):
                cursor.execute(sql)
        if not options["no_rollup"]:
            t = time.perf_counter()
            run = rollups.rollup_rebuild()
            self.stdout.write(
                f"Rollups rebuilt: {run.blocks} blocks, {run.rows} rows "
                f"in {time.perf_counter() - t:.1f} s."
            )

    def _versions(self) -> list[tuple[ModelVersion, tuple[Any, ...]]]:
        existing = {v.model: v for v in ModelVersion.objects.all()}
        rows = []
        for index, profile in enumerate(PROFILES):
            version = existing.get(profile[0]) or versions.version_create(
                actor_id=None,
                model=profile[0],
                fallbacks=[],
                system_prompt=f"You are a helpful assistant (profile {index + 1}).",
                temperature=0.2 * index,
                max_tokens=None,
                note="synthetic (feedback_generate)",
                activate=index == 0,
            )
            rows.append((version, profile))
        return rows

    def _chunk(
        self,
        *,
        rng: random.Random,
        user_id: int,
        count: int,
        versions: list[tuple[ModelVersion, tuple[Any, ...]]],
        at: dt.datetime,
        step: dt.timedelta,
        feedback_every: int,
        feedback_left: int,
    ) -> tuple[int, int]:
        conversations = Conversation.objects.bulk_create(
            [
                Conversation(
                    user_id=user_id,
                    title=" ".join(rng.choices(WORDS, k=4)),
                    created_at=at + step * TURNS_PER_CONVERSATION * i,
                    updated_at=at + step * TURNS_PER_CONVERSATION * (i + 1),
                )
                for i in range(count)
            ]
        )
        # Ids are given, not left to the database, so each reply follows its
        # question as in a real chat, while both go in one bulk insert.
        next_id = (Message.objects.aggregate(m=Max("id"))["m"] or 0) + 1
        questions: list[Message] = []
        plan: list[tuple[Conversation, dt.datetime, tuple[ModelVersion, tuple[Any, ...]]]] = []
        for i, conversation in enumerate(conversations):
            chosen = versions[rng.randrange(len(versions))]
            for turn in range(TURNS_PER_CONVERSATION):
                when = at + step * (TURNS_PER_CONVERSATION * i + turn)
                questions.append(
                    Message(
                        pk=next_id + 2 * len(questions),
                        conversation=conversation,
                        role=Message.Role.USER,
                        content=" ".join(rng.choices(WORDS, k=rng.randint(5, 25))) + "?",
                        created_at=when,
                    )
                )
                plan.append((conversation, when, chosen))
        replies: list[Message] = []
        for question, (conversation, when, (version, profile)) in zip(questions, plan, strict=True):
            _model, _up, error_rate, moderation_rate, ttft, latency = profile
            roll = rng.random()
            finish = (
                Message.FinishReason.ERROR
                if roll < error_rate
                else Message.FinishReason.MODERATED
                if roll < error_rate + moderation_rate
                else Message.FinishReason.STOP
            )
            replies.append(
                Message(
                    pk=question.pk + 1,
                    conversation=conversation,
                    role=Message.Role.ASSISTANT,
                    status=Message.Status.FINISHED,
                    finish_reason=finish,
                    reply_to=question,
                    content=" ".join(rng.choices(WORDS, k=rng.randint(20, 80))) + ".",
                    model=version.model,
                    version=version,
                    ttft_ms=int(rng.lognormvariate(0, 0.5) * ttft),
                    latency_ms=int(rng.lognormvariate(0, 0.4) * latency),
                    prompt_tokens=rng.randint(50, 1500),
                    completion_tokens=rng.randint(20, 400),
                    cost_usd=Decimal(rng.randint(10, 900)) / Decimal(1_000_000),
                    moderation=(
                        {"stage": "output", "category": "violence", "score": 0.9}
                        if finish == Message.FinishReason.MODERATED
                        else None
                    ),
                    created_at=when,
                    finished_at=when + dt.timedelta(milliseconds=latency),
                )
            )
        interleaved = [m for pair in zip(questions, replies, strict=True) for m in pair]
        Message.objects.bulk_create(interleaved, batch_size=2000)
        rows: list[Feedback] = []
        for n, reply in enumerate(replies):
            if len(rows) >= feedback_left or n % feedback_every != 0:
                continue
            profile = next(p for v, p in versions if v.pk == reply.version_id)
            up = rng.random() < profile[1]
            rows.append(
                Feedback(
                    message=reply,
                    owner_key=f"u:{user_id}",
                    user_id=user_id,
                    rating=1 if up else -1,
                    reasons=rng.sample(UP if up else DOWN, k=rng.randint(0, 2)),
                    comment=(
                        " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))
                        if rng.random() < 0.25
                        else ""
                    ),
                    model=reply.model,
                    version_id=reply.version_id,
                    review_status=rng.choice(list(Feedback.Status.values)) if n % 3 == 0 else "new",
                    created_at=reply.created_at + dt.timedelta(seconds=30),
                    updated_at=reply.created_at + dt.timedelta(seconds=30),
                )
            )
        Feedback.objects.bulk_create(rows, batch_size=2000)
        return len(replies), len(rows)
