"""Parsing client frames (SPEC: WebSocket). Every refusal is a specific sentence."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from chat.errors import InvalidInput
from chat.pipeline import SendRequest


@dataclass(frozen=True, slots=True)
class StopRequest:
    message_id: int


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    message_id: int
    after: int


Request = SendRequest | StopRequest | ResumeRequest


def parse_frame(raw: str | None, data: bytes | None, *, max_bytes: int) -> dict[str, Any]:
    """Return the frame's JSON object or raise InvalidInput saying what is wrong."""
    if raw is None:
        raise InvalidInput("Binary frames are not supported; send JSON text frames.")
    if len(raw) > max_bytes or len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidInput(f"That frame is too large; the limit is {max_bytes:,} bytes.")
    try:
        frame = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput("That frame is not valid JSON.") from None
    if not isinstance(frame, dict):
        raise InvalidInput('A frame must be a JSON object with a "type".')
    return frame


def _int_field(frame: dict[str, Any], name: str, *, required: bool = True) -> int | None:
    value = frame.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**62:
        raise InvalidInput(f'"{name}" must be a whole number.')
    return value


def client_msg_id_of(frame: dict[str, Any]) -> str | None:
    """Return the frame's client_msg_id for echoing in errors, if it is sane.

    JSON's \\ud800 escapes decode to lone surrogates, which no frame can carry
    (a server writes UTF-8, and the send would raise and drop the socket), so
    such an id is not echoed.
    """
    value = frame.get("client_msg_id")
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def parse_send(frame: dict[str, Any]) -> SendRequest:
    raw_id = frame.get("client_msg_id")
    try:
        client_msg_id = uuid.UUID(raw_id) if isinstance(raw_id, str) and len(raw_id) <= 64 else None
    except ValueError:
        client_msg_id = None
    if client_msg_id is None:
        raise InvalidInput('"client_msg_id" must be a UUID chosen by the client.')
    regenerate_id = _int_field(frame, "regenerate", required=False)
    edit_id = _int_field(frame, "edit", required=False)
    if regenerate_id is not None and edit_id is not None:
        raise InvalidInput('A message can be "regenerate" or "edit", not both.')
    return SendRequest(
        content=frame.get("content"),
        client_msg_id=client_msg_id,
        client_msg_id_text=str(raw_id),
        conversation_id=_int_field(frame, "conversation", required=False),
        regenerate_id=regenerate_id,
        edit_id=edit_id,
    )


def parse_stop(frame: dict[str, Any]) -> StopRequest:
    message_id = _int_field(frame, "message")
    assert message_id is not None
    return StopRequest(message_id=message_id)


def parse_resume(frame: dict[str, Any]) -> ResumeRequest:
    message_id = _int_field(frame, "message")
    after = _int_field(frame, "after", required=False) or 0
    assert message_id is not None
    return ResumeRequest(message_id=message_id, after=after)
