"""HTTP: `POST /api/feedback/` (SPEC), the same rules as the WebSocket `feedback` frame."""

from __future__ import annotations

import json

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from chat.errors import ChatError, Forbidden, InvalidInput
from chat.safety.errors import InvalidInput as TextRefused
from chat.safety.input import check_frame_size
from chat.views import error_response, owner_of
from feedback import services


@require_POST
def feedback_api(request: HttpRequest) -> JsonResponse:
    """Rate a reply: JSON {"message","rating","reasons","comment"} → feedback.saved or an error.

    The rate limit is the service's (`FEEDBACK_RATELIMIT`), shared with the
    WebSocket frame.
    """
    try:
        owner = owner_of(request)
        if owner is None:
            raise Forbidden("Your session has expired. Reload the page to rate replies.")
        body = _json_object(request)
        result = services.feedback_submit(
            owner=owner,
            client_ip=request.META.get("REMOTE_ADDR", ""),
            message_id=body.get("message"),
            rating=body.get("rating"),
            reasons=body.get("reasons"),
            comment=body.get("comment"),
        )
    except ChatError as exc:
        return error_response(exc)
    return JsonResponse(
        {"type": "feedback.saved", "message": result.message_id, "rating": result.rating}
    )


def _json_object(request: HttpRequest) -> dict[str, object]:
    try:
        check_frame_size(request.body, max_bytes=settings.CHAT_MAX_FRAME_BYTES)
    except TextRefused as exc:
        raise InvalidInput(exc.user_message) from None
    try:
        body = json.loads(request.body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidInput("The request body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise InvalidInput("The request body must be a JSON object.")
    return body
