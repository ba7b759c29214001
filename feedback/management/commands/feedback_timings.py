"""Measure how fast the review desk's pages render against the current database.

    manage.py feedback_timings [--runs 5]

Each page is fetched through the whole Django stack (middleware, admin,
templates) as a staff user; the first fetch warms caches and is not counted.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.test import Client

from feedback.models import Feedback


class Command(BaseCommand):
    help = "Time the feedback list, a detail page and the scorecards (median and worst, ms)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--runs", type=int, default=5)
        parser.add_argument("--host", default="localhost", help="an allowed host name")

    def handle(self, *args: Any, **options: Any) -> None:
        staff, created = get_user_model().objects.get_or_create(
            username="bench-staff", defaults={"is_staff": True, "is_superuser": True}
        )
        if created:
            staff.set_unusable_password()
            staff.save()
        client = Client(HTTP_HOST=options["host"])
        client.force_login(staff)
        newest = Feedback.objects.order_by("-id").values_list("pk", flat=True).first()
        if newest is None:
            raise CommandError("No feedback yet: run feedback_generate first.")
        pages = {
            "feedback list": "/admin/feedback/feedback/",
            "list: down + reason": "/admin/feedback/feedback/?rating=-1&reason=inaccurate",
            "list: status + has comment": "/admin/feedback/feedback/?status=new&has_comment=yes",
            "list: search comments": "/admin/feedback/feedback/?q=rollback",
            "detail page": f"/admin/feedback/feedback/{newest}/change/",
            "scorecards": "/admin/feedback/modelversion/scorecards/",
            "scorecards, 7 days": "/admin/feedback/modelversion/scorecards/?days=7",
            "versions": "/admin/feedback/modelversion/",
        }
        counts = Feedback.objects.count()
        self.stdout.write(
            f"{counts:,} feedback rows; {options['runs']} runs per page after warm-up"
        )
        for name, url in pages.items():
            response = client.get(url)
            if response.status_code != 200:
                raise CommandError(f"{url} answered {response.status_code}")
            times = []
            for _ in range(options["runs"]):
                t = time.perf_counter()
                client.get(url)
                times.append((time.perf_counter() - t) * 1000)
            self.stdout.write(
                f"{name:<30} median {statistics.median(times):7.1f} ms   worst {max(times):7.1f} ms"
            )
