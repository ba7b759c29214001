"""The review desk's list filters; each applies the shared rule in `selectors.feedback_filter`,
so the list and its exports always agree."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from feedback import selectors
from feedback.models import Feedback, ModelVersion


class _DeskFilter(admin.SimpleListFilter):
    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return selectors.feedback_filter(
            queryset, name=self.parameter_name or "", value=self.value() or ""
        )


class RatingFilter(_DeskFilter):
    title = "rating"
    parameter_name = "rating"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("1", "👍 up"), ("-1", "👎 down"), ("withdrawn", "withdrawn")]


class ReasonFilter(_DeskFilter):
    title = "reason"
    parameter_name = "reason"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        reasons = dict.fromkeys([*settings.FEEDBACK_REASONS_DOWN, *settings.FEEDBACK_REASONS_UP])
        return [(r, r.replace("_", " ")) for r in reasons]


class ModelFilter(_DeskFilter):
    title = "model"
    parameter_name = "model"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        # Distinct over an indexed column: read from the index, not the table.
        models = Feedback.objects.order_by("model").values_list("model", flat=True).distinct()
        return [(m, m) for m in models if m]


class VersionFilter(_DeskFilter):
    title = "version"
    parameter_name = "version"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        versions = ModelVersion.objects.order_by("-number").values_list("pk", "number", "model")
        return [(str(pk), f"v{n} · {m}") for pk, n, m in versions] + [("none", "no version")]


class StatusFilter(_DeskFilter):
    title = "review status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(Feedback.Status.choices)


class HasCommentFilter(_DeskFilter):
    title = "comment"
    parameter_name = "has_comment"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "has a comment"), ("no", "no comment")]


class AssigneeFilter(_DeskFilter):
    title = "assignee"
    parameter_name = "assignee"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        staff = get_user_model().objects.filter(is_staff=True).order_by("username")
        choices = [("none", "unassigned")]
        if request.user.is_authenticated:
            choices.append((str(request.user.pk), "me"))
        choices += [(str(u.pk), u.get_username()) for u in staff[:50] if u.pk != request.user.pk]
        return choices


class CreatedRangeFilter(admin.ListFilter):
    """Rated between two dates (inclusive), with quick ranges."""

    title = "date rated"
    template = "admin/feedback/date_range_filter.html"
    names = ("created_from", "created_to")

    def __init__(
        self, request: HttpRequest, params: dict[str, Any], model: Any, model_admin: Any
    ) -> None:
        super().__init__(request, params, model, model_admin)
        for name in self.names:
            if name in params:
                value = params.pop(name)
                self.used_parameters[name] = value[-1] if isinstance(value, list) else value

    def has_output(self) -> bool:
        return True

    def expected_parameters(self) -> list[str | None]:
        return list(self.names)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        for name, value in self.used_parameters.items():
            queryset = selectors.feedback_filter(queryset, name=name, value=str(value))
        return queryset

    def choices(self, changelist: Any) -> Iterator[Any]:
        today = timezone.localdate()
        current_from = self.used_parameters.get("created_from", "")
        current_to = self.used_parameters.get("created_to", "")
        yield {
            "selected": not self.used_parameters,
            "query_string": changelist.get_query_string(remove=list(self.names)),
            "display": "Any date",
        }
        for label, days in (("Today", 0), ("Past 7 days", 6), ("Past 30 days", 29)):
            start = (today - dt.timedelta(days=days)).isoformat()
            yield {
                "selected": current_from == start and not current_to,
                "query_string": changelist.get_query_string(
                    {"created_from": start}, remove=["created_to"]
                ),
                "display": label,
            }
        self.form = {
            "created_from": current_from,
            "created_to": current_to,
            "hidden": [
                (k, v) for k, v in changelist.params.items() if k not in self.names and k != "p"
            ],
        }
