"""The closed set of errors a user can see (SPEC: error codes).

Each is its own type, raised where the problem is found, and turned into a
`chat.error` frame or an HTTP response in one place (`ChatError.frame`).
"""

from __future__ import annotations

from typing import Any, ClassVar


class ChatError(Exception):
    code: ClassVar[str] = "internal"
    default_message: ClassVar[str] = "Something went wrong on our side. Please try again."
    http_status: ClassVar[int] = 500

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        self.user_message = message or self.default_message
        self.retry_after = retry_after
        super().__init__(self.user_message)

    def frame(self, *, client_msg_id: str | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {
            "type": "chat.error",
            "code": self.code,
            "message": self.user_message,
        }
        if client_msg_id is not None:
            frame["client_msg_id"] = client_msg_id
        if self.retry_after is not None:
            frame["retry_after"] = max(1, round(self.retry_after))
        return frame


class InvalidInput(ChatError):
    code = "invalid_input"
    default_message = "That message could not be read. Please check it and send it again."
    http_status = 400


class RateLimited(ChatError):
    code = "rate_limited"
    default_message = "You are sending messages too quickly. Please wait a moment."
    http_status = 429


class BudgetExceeded(ChatError):
    code = "budget_exceeded"
    default_message = "You have reached today's usage limit."
    http_status = 429


class BlockedInput(ChatError):
    code = "blocked_input"
    default_message = "This message can't be sent because it breaks the usage policy."
    http_status = 400


class Timeout(ChatError):
    code = "timeout"
    default_message = "The model took too long to answer. Please try again."
    http_status = 504


class Unavailable(ChatError):
    code = "unavailable"
    default_message = "The model is unavailable right now. Please try again shortly."
    http_status = 503


class NotFound(ChatError):
    code = "not_found"
    default_message = "That conversation or message does not exist."
    http_status = 404


class Forbidden(ChatError):
    code = "forbidden"
    default_message = "You are not allowed to do that."
    http_status = 403


class Internal(ChatError):
    code = "internal"


# Seconds a user is asked to wait when a backing service is unreachable.
OUTAGE_RETRY_AFTER_S = 5.0


def outage_error(exc: BaseException) -> Unavailable | None:
    """Return what the user is told when `exc` says the database or Redis cannot be reached.

    A frame that fails because PostgreSQL or Redis is down (stopped, failing
    over, restarting) is `unavailable` with a `retry_after`, not `internal`:
    the user can retry (a send with its same `client_msg_id` is answered once),
    and the operator's Sentry is not flooded with one event per frame. Other
    failures return None.
    """
    from django.db import InterfaceError, OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(
        exc, OperationalError | InterfaceError | RedisConnectionError | RedisTimeoutError
    ):
        return Unavailable(
            "The service is briefly unavailable. Please try again shortly.",
            retry_after=OUTAGE_RETRY_AFTER_S,
        )
    return None
