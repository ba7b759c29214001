"""Staff pages for feedback: the review desk (`desk`) and versions with scorecards (`versions`)."""

from feedback.admin import desk, versions

__all__ = ["desk", "versions"]
