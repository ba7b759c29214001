"""HTTP: `POST /api/feedback/` (SPEC), the same rules as the WebSocket `feedback` frame."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from chat.errors import ChatError, Forbidden
from chat.views import check_json_object, error_response, owner_of
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
        body = check_json_object(request)
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
