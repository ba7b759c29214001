"""The one exception the safety checks raise for input a user must fix."""

from __future__ import annotations


class InvalidInput(Exception):
    """Refuse user input with a sentence that tells the user what to change.

    `user_message` is shown to the user as is (it becomes the `message` of an
    `invalid_input` error frame), so it is a whole sentence in plain words and
    never echoes the offending text back. `reason` is a short stable slug for
    logs, metrics and tests; users never see it.
    """

    def __init__(self, user_message: str, *, reason: str = "invalid") -> None:
        super().__init__(user_message)
        self.user_message = user_message
        self.reason = reason

    def __repr__(self) -> str:
        return f"InvalidInput({self.user_message!r}, reason={self.reason!r})"
