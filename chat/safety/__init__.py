"""Checks that untrusted text passes before it is stored, sent or logged.

`check_user_text` / `check_frame_size` gate what users send, `injection_score`
rates prompt-injection attempts, and `redact` / `redact_obj` take personal data
and secrets out of text before it reaches logs, Sentry or exports. Everything
here is plain Python with no Django import, so it runs anywhere in the
pipeline and in tests without settings.
"""

from chat.safety.errors import InvalidInput
from chat.safety.injection import (
    LIKELY_SCORE,
    SUSPICIOUS_SCORE,
    InjectionVerdict,
    injection_score,
)
from chat.safety.input import check_frame_size, check_user_text
from chat.safety.pii import PiiKind, PiiMatch, find_pii, redact, redact_obj

__all__ = [
    "LIKELY_SCORE",
    "SUSPICIOUS_SCORE",
    "InjectionVerdict",
    "InvalidInput",
    "PiiKind",
    "PiiMatch",
    "check_frame_size",
    "check_user_text",
    "find_pii",
    "injection_score",
    "redact",
    "redact_obj",
]
