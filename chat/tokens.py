"""Token counting where the vendor does not count for us.

A documented heuristic: about four characters of English per token, which is
what OpenAI's and Anthropic's tokenizers average on prose. Replies whose usage
is estimated are marked as such.
"""

from __future__ import annotations

import math


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4)) if text else 0
